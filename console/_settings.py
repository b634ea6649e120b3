"""The console's settings: ``CONSOLE_*``, plus the shared ``AMQP_URL``, ``DATABASE_URL``, ``ATLAS_PREFIX``."""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from atlas_common import DEFAULT_DATABASE_URL, BrokerSettings, DatabaseUrl

DEFAULT_CONSOLE_HOST = "127.0.0.1"
DEFAULT_CONSOLE_PORT = 8070


class ConsoleSettings(BrokerSettings):
    """``CONSOLE_HOST``, ``CONSOLE_PORT``, ``CONSOLE_REQUEUE_ENABLED``, ``CONSOLE_PAGE_SIZE``,
    ``CONSOLE_REFRESH_S``, ``CONSOLE_DB_TIMEOUT_S``; the broker, database and prefix are shared."""

    model_config = SettingsConfigDict(env_prefix="CONSOLE_", validate_by_name=True, validate_by_alias=True)

    database_url: DatabaseUrl = Field(
        default=DEFAULT_DATABASE_URL, repr=False, validation_alias=AliasChoices("DATABASE_URL")
    )
    host: str = DEFAULT_CONSOLE_HOST
    """Loopback by default: the console shows every task's text and output. Expose it deliberately
    (``0.0.0.0`` in a container behind your own authentication); it has no login of its own."""
    port: int = Field(default=DEFAULT_CONSOLE_PORT, ge=0, le=65_535)
    """0 picks a free port (the URL is logged and printed)."""
    requeue_enabled: bool = False
    """Off unless set: the dead-letter page lists, but only requeues (after a confirmation) when on."""
    page_size: int = Field(default=50, ge=1, le=500)
    """Sessions per page of the list."""
    refresh_s: float = Field(default=5.0, ge=1.0, le=3600.0)
    """How often the overview refreshes itself, and the least time one overview reading is reused (longer
    when a reading is slow: ten times its duration); many open browsers cost the database one reading per
    interval, not one each, and no page waits for a renewal."""
    db_timeout_s: float = Field(default=10.0, gt=0)
    """Connect and statement timeout of the console's queries: a slow page fails, it never hangs."""
    dead_letter_limit: int = Field(default=100, ge=1, le=10_000)
    """Dead letters listed per queue (read from the head, left in place)."""
