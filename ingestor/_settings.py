"""The ingestor's settings: one object, built once in ``main`` and passed down to every part."""

from __future__ import annotations

import os
import re
import secrets
import socket
from pathlib import Path
from typing import Final, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from atlas_common import DEFAULT_DATABASE_URL, BrokerSettings, DatabaseUrl, DbPooler

Compression = Literal["none", "gzip", "zstd"]

INGESTOR_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
"""Ids go into file names: no path separators, no ``..``, nothing a shell or a log would mangle."""

_MAX_PREFETCH: Final = 65_535  # AMQP's prefetch-count is a short


def default_ingestor_id() -> str:
    """``<host>-<pid>-<random>``: unique per process, readable in file names and logs."""
    host = re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname()).strip("-")[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class IngestorSettings(BrokerSettings):
    """Every knob of ``atlas-ingestor``: each reads ``INGESTOR_<NAME>`` (``INGESTOR_JSONL_DIR``,
    ``INGESTOR_BATCH_MAX_MESSAGES``, ...); the unprefixed names of earlier versions still work, with a
    deprecation warning. ``AMQP_URL``, ``DATABASE_URL``, ``ATLAS_*`` and ``LOG_*`` are shared by every
    service."""

    model_config = SettingsConfigDict(env_prefix="INGESTOR_", validate_by_name=True, validate_by_alias=True)
    # The one service whose variables were bare (JSONL_DIR ...) before it got its prefix.
    legacy_unprefixed_env = True

    # repr=False: settings objects end up in logs, and this URL may hold a password.
    database_url: DatabaseUrl = Field(
        default=DEFAULT_DATABASE_URL, repr=False, validation_alias="DATABASE_URL"
    )
    db_pooler: DbPooler = "none"
    """``transaction`` when DATABASE_URL goes through a transaction pooler (PgBouncer ``pool_mode =
    transaction``): no prepared-statement cache, no reset query, and then ``liveness_database_url`` is
    required. ``none`` for a direct or session-pooled connection."""
    liveness_database_url: DatabaseUrl | None = Field(default=None, repr=False)
    """The one connection that holds this process's owner lock (a session-level advisory lock) for the
    process's life: must be a direct or session-pooled connection to the same database (behind a
    transaction pooler the lock would stay with a shared server connection after this process died).
    Default: DATABASE_URL."""
    ingestor_id: str = Field(default_factory=default_ingestor_id, pattern=INGESTOR_ID_PATTERN)

    batch_max_messages: int = Field(default=2500, ge=1, le=_MAX_PREFETCH // 2)
    """Records per batch at most; a batch is also cut ``flush_interval_s`` after its first delivery, which
    comes first below 12,500 records/s (2,500 per 200 ms). Each batch pays ~10 statements, a commit and an
    fsync whatever its size: from a 100,000-record backlog, 2,500 stored ~15% more records/s than 1,000
    for ~15 MiB more peak RSS; 5,000 a few percent more again for ~60 MiB more."""
    flush_interval_s: float = Field(default=0.2, gt=0, le=60)
    batches_in_flight: int = Field(default=5, ge=1, le=8)
    """Batches worked on at once: their transactions run side by side, each on its own pooled connection,
    while their finishes (append, dead letters, ack) run one at a time in batch order. A transaction waits
    on PostgreSQL statement by statement, so one alone leaves the ingestor idle a quarter of the time; 1
    writes and finishes each batch before the next. From a 100,000-record backlog, 5 stored ~13 % more
    records/s than 3 (8 of 8 alternating runs, bench-shaped and worker-made telemetry alike; 8 no more
    than 5) for ~65 MiB more peak RSS and two more pooled connections; at a steady load a batch is rarely
    more than one flush interval behind the next, so it changes nothing there."""
    prefetch: int | None = Field(default=None, ge=1, le=_MAX_PREFETCH)
    """Unacked deliveries the broker may send ahead; default ``batches_in_flight`` times
    ``batch_max_messages`` (at least twice), so the next batch fills while the others are written. It also
    bounds memory while Postgres is down."""
    max_in_flight_bytes: int = Field(default=16 * 1024 * 1024, ge=64 * 1024)
    """Unacked delivery bytes to aim for: the prefetch count adapts to the average message size, so a
    backlog of large envelopes cannot fill memory (the count never exceeds ``prefetch``)."""

    line_cache_max_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    """Step rows kept in memory (about this many bytes) until their session completes, so its JSONL line is
    built without reading the session back from Postgres; 0 reads every line back."""

    jsonl_dir: Path = Path("var/jsonl")
    jsonl_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    jsonl_max_age_s: float = Field(default=300.0, gt=0)
    jsonl_compression: Compression = "none"

    stream_enabled: bool = True
    """Publish every session made final (its JSONL line) to the ``<prefix>.sessions`` stream (the feed)."""
    stream_max_age_s: int = Field(default=7 * 86_400, ge=1)
    """The stream keeps sessions this long (RabbitMQ drops whole segments past it)."""
    stream_max_bytes: int = Field(default=20 * 1024**3, ge=1024 * 1024)
    """... and at most this many bytes, whichever limit comes first."""
    stream_max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=64 * 1024)
    """A line larger than this goes to the stream as a pointer (session ids, its JSONL file) instead: the
    broker refuses messages past its own limit (128 MiB by default) and one session must never stop the
    feed."""

    metrics_port: int | None = Field(default=None, ge=1, le=65_535)
    """Serve Prometheus metrics on this port (off when unset)."""
    metrics_host: str = Field(default="127.0.0.1", min_length=1)
    """Address the metrics server binds: loopback unless set (compose sets 0.0.0.0 inside its network)."""
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    db_connect_timeout_s: float = Field(default=5.0, gt=0)
    db_command_timeout_s: float = Field(default=60.0, gt=0)
    db_retry_backoff_s: float = Field(default=0.2, gt=0)
    db_retry_backoff_max_s: float = Field(default=5.0, gt=0)
    db_down_log_interval_s: float = Field(default=30.0, gt=0)
    recovery_interval_s: float = Field(default=30.0, gt=0)
    sweep_interval_s: float = Field(default=30.0, gt=0)
    incomplete_after_s: float = Field(default=300.0, gt=0)
    """A session still missing its opened, or steps its close announced, this long after it was last
    written is flagged in ``telemetry_problems`` (and a never-opened stub stops being ``running``)."""
    accounting_grace_s: float = Field(default=600.0, gt=0)
    """How long after its success a task may take to be stored and in a final JSONL file before it counts
    in ``atlas_tasks_unaccounted`` (above ``jsonl_max_age_s``: files become final within that)."""
    accounting_lookback_s: float = Field(default=86_400.0, gt=0)
    """How far back ``atlas_tasks_unaccounted`` looks (``producer audit`` checks any period)."""

    @field_validator("ingestor_id")
    @classmethod
    def _no_dot_dot(cls, value: str) -> str:
        if ".." in value:
            raise ValueError("ingestor_id must not contain '..'")
        return value

    @model_validator(mode="after")
    def _liveness_not_transaction_pooled(self) -> IngestorSettings:
        if self.db_pooler == "transaction" and self.liveness_database_url is None:
            raise ValueError(
                "INGESTOR_DB_POOLER=transaction needs INGESTOR_LIVENESS_DATABASE_URL: a direct or "
                "session-pooled connection to the same database (the owner lock is session state)"
            )
        return self

    @model_validator(mode="after")
    def _zstd_available(self) -> IngestorSettings:
        if self.jsonl_compression == "zstd":
            try:
                import zstandard  # noqa: F401
            except ImportError:
                raise ValueError(
                    "jsonl_compression=zstd needs the optional 'zstandard' package: "
                    "pip install 'atlas-pipeline[zstd]'"
                ) from None
        return self

    @property
    def liveness_url(self) -> str:
        """Where the owner lock's connection goes (see ``liveness_database_url``)."""
        return self.liveness_database_url or self.database_url

    @property
    def prefetch_count(self) -> int:
        if self.prefetch is not None:
            return self.prefetch
        return min(max(2, self.batches_in_flight) * self.batch_max_messages, _MAX_PREFETCH)
