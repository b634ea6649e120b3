"""Producer settings: one object, built in ``main`` and passed down."""

from __future__ import annotations

from pydantic import Field

from atlas_common import DEFAULT_DATABASE_URL, BrokerSettings, DatabaseUrl


class ProducerSettings(BrokerSettings):
    """Read from the environment (``AMQP_URL``, ``ATLAS_PREFIX`` ...); CLI flags override.

    A task's size limit is the wire contract's (``schemas.limits.MAX_TASK_BYTES``), not a setting: a
    larger task would be refused by every worker."""

    # repr=False: settings objects end up in logs, and this URL may hold a password.
    database_url: DatabaseUrl = Field(default=DEFAULT_DATABASE_URL, repr=False)
    publish_window: int = Field(default=1000, ge=1, le=65_535)
    """Publishes in flight awaiting their broker confirm."""
    connect_timeout_s: float = Field(default=10.0, gt=0)
