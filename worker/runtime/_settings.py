"""Worker settings: one object, built in ``main`` and passed down."""

from __future__ import annotations

import os
import socket

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from atlas_common import DEFAULT_DATABASE_URL, BrokerSettings, DatabaseUrl, DbPooler


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(BrokerSettings):
    """Read from the environment (``AMQP_URL``, ``DATABASE_URL``, ``ATLAS_*``, and ``WORKER_<NAME>`` for
    each of its own, e.g. ``WORKER_CONCURRENCY``); CLI flags override."""

    model_config = SettingsConfigDict(env_prefix="WORKER_")

    # repr=False: settings objects end up in logs, and this URL may hold a password.
    database_url: DatabaseUrl = Field(
        default=DEFAULT_DATABASE_URL, repr=False, validation_alias="DATABASE_URL"
    )
    db_pooler: DbPooler = "none"
    """``transaction`` when DATABASE_URL goes through a transaction pooler (PgBouncer ``pool_mode =
    transaction``): the ledger then keeps no session state between transactions (no prepared-statement
    cache, no reset query). ``none`` for a direct or session-pooled connection."""
    concurrency: int = Field(default=16, ge=1, le=10_000)
    adapters: tuple[str, ...] = Field(default=())
    """``name=module:attr`` specs; the first is the default. Empty: the built-in demo adapter."""
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    task_timeout_s: float = Field(default=1500.0, gt=0)
    """Must stay below RabbitMQ's ``consumer_timeout`` (30 min by default); see the README."""
    demo_latency_s: float = Field(default=0.0, ge=0)
    worker_id: str = Field(default_factory=default_worker_id, validation_alias="WORKER_ID")
    telemetry_linger_s: float = Field(default=0.002, ge=0, le=1)
    """How long a telemetry record may wait for others to share its broker message."""
    ledger_pool_size: int = Field(default=2, ge=1, le=100)
    """Most PostgreSQL connections the ledger opens (it commits one group at a time: one is busy at once,
    the second serves the start-up privilege check and a commit that overlaps a reconnect)."""
    ledger_heartbeat_s: float = Field(default=5.0, gt=0, le=300)
    """How often the worker marks the tasks it runs as alive in the task ledger."""
    ledger_stale_after_s: float = Field(default=60.0, gt=0)
    """A running task not marked alive for this long belongs to a dead run: another delivery takes it over.
    At least three heartbeats; longer database outages than this may make a live run stand down."""
    ledger_timeout_s: float = Field(default=60.0, gt=0)
    """Deadline of one ledger call; past it the task is handed back to the queue."""
    metrics_port: int | None = Field(default=None, ge=1, le=65_535)
    metrics_host: str = Field(default="127.0.0.1", min_length=1)
    """Address the metrics server binds: loopback unless set (compose sets 0.0.0.0 inside its network)."""

    @model_validator(mode="after")
    def _stale_after_three_heartbeats(self) -> WorkerSettings:
        # A claim must survive a missed heartbeat or two (a slow commit) before anyone may take it over.
        if self.ledger_stale_after_s < 3 * self.ledger_heartbeat_s:
            raise ValueError("WORKER_LEDGER_STALE_AFTER_S must be at least three WORKER_LEDGER_HEARTBEAT_S")
        return self
