"""``python -m producer status``: what the pipeline holds right now, from RabbitMQ and PostgreSQL.

Broker: every queue of the topology (tasks, each retry tier, the two dead-letter queues, the ingestor's
telemetry queue) with its ready messages and consumers, from a passive declare; a queue that does not
exist is reported as absent.

Ingestion lag is the age of the oldest telemetry the ingestor has not acked yet. It is read from the
head of the ingestor queue WITHOUT consuming it: ``basic.get`` without ack on a throwaway channel, the
smallest ``emitted_at`` among the records of that message (a ``{"schema_version", "kind", "records"}``
envelope, or a single record), then the channel is closed, which hands the message back to the queue.
The message is then marked redelivered (harmless: the ingestor drops duplicates by
``(adapter_session_id, seq)``); the ingestor queue has no delivery limit on RabbitMQ 3.x, so peeking never
dead-letters anything. Messages the ingestor already holds unacked (its prefetch) are not visible to
``basic.get``: the lag is that of the oldest message still waiting, so a busy ingestor reads low.

Database: sessions by status (rows with a ``task_id``, i.e. written by the pipeline), the task ledger by
state, and the newest finalized JSONL file. Whatever is missing (a table not migrated yet, the database
unreachable) is reported as missing; the broker part still counts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg
import orjson
from aio_pika.abc import AbstractConnection

from atlas_common import DB_ERRORS, Topology, redact_url, scrub_secrets
from producer._amqp import PASSIVE_MISSING, connect, queue_depth, throwaway_channel
from producer._audit import count_unaccounted

UNACCOUNTED_GRACE_S: Final = 600.0
"""How long a succeeded task may take to be stored and in a final JSONL file (files become final within
``JSONL_MAX_AGE_S``, 300 s by default) before ``status`` counts it."""


@dataclass(frozen=True, slots=True)
class QueueStatus:
    name: str
    role: str
    present: bool
    ready: int | None = None
    consumers: int | None = None


@dataclass(frozen=True, slots=True)
class IngestionLag:
    state: str
    """``ok`` (a message is waiting), ``empty`` (lag 0), ``absent`` (no ingestor queue), ``unreadable``."""
    seconds: float | None = None
    oldest_emitted_at: datetime | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class JsonlFile:
    name: str
    sessions: int
    finalized_at: datetime | None


@dataclass(frozen=True, slots=True)
class DatabaseStatus:
    url: str
    """Redacted: never the password."""
    reachable: bool
    error: str | None = None
    sessions_by_status: dict[str, int] | None = None
    ledger_by_state: dict[str, int] | None = None
    newest_jsonl_file: JsonlFile | None = None
    missing: list[str] = field(default_factory=list)
    unaccounted: int | None = None
    """Tasks the ledger calls succeeded whose session is not stored and exported after the grace period
    (``python -m producer audit`` lists them with reasons)."""
    unaccounted_grace_s: float = UNACCOUNTED_GRACE_S


@dataclass(frozen=True, slots=True)
class PipelineStatus:
    broker_url: str
    prefix: str
    queues: list[QueueStatus]
    ingestion_lag: IngestionLag
    database: DatabaseStatus

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types only (datetimes as ISO 8601 strings)."""
        db = self.database
        newest = db.newest_jsonl_file
        lag = self.ingestion_lag
        return {
            "broker": {
                "url": self.broker_url,
                "prefix": self.prefix,
                "queues": [
                    {
                        "name": q.name,
                        "role": q.role,
                        "present": q.present,
                        "ready": q.ready,
                        "consumers": q.consumers,
                    }
                    for q in self.queues
                ],
            },
            "ingestion_lag": {
                "state": lag.state,
                "seconds": lag.seconds,
                "oldest_emitted_at": _iso(lag.oldest_emitted_at),
                "detail": lag.detail,
            },
            "database": {
                "url": db.url,
                "reachable": db.reachable,
                "error": db.error,
                "sessions_by_status": db.sessions_by_status,
                "task_ledger_by_state": db.ledger_by_state,
                "newest_jsonl_file": None
                if newest is None
                else {
                    "name": newest.name,
                    "sessions": newest.sessions,
                    "finalized_at": _iso(newest.finalized_at),
                },
                "missing": db.missing,
                "succeeded_not_stored": db.unaccounted,
                "succeeded_not_stored_grace_s": db.unaccounted_grace_s,
            },
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def topology_queues(topology: Topology) -> list[tuple[str, str]]:
    """``(queue name, role)`` for every queue of the topology, in pipeline order."""
    queues = [(topology.tasks_queue, "tasks")]
    queues += [(topology.retry_queue(ms), f"retry tier {ms} ms") for ms in topology.retry_delays_ms()]
    queues += [
        (topology.dead_tasks_queue, "tasks dead-letter"),
        (topology.ingestor_queue, "telemetry (ingestor)"),
        (topology.dead_telemetry_queue, "telemetry dead-letter"),
    ]
    return queues


def oldest_emitted_at(body: bytes) -> datetime | None:
    """The smallest ``emitted_at`` in a telemetry body (batch envelope or single record); None if none."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    records = data.get("records")
    items: list[object] = records if isinstance(records, list) else [data]
    stamps: list[datetime] = []
    for item in items:
        raw = item.get("emitted_at") if isinstance(item, dict) else None
        if not isinstance(raw, str):
            continue
        with contextlib.suppress(ValueError):
            stamp = datetime.fromisoformat(raw)
            stamps.append(stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=UTC))
    return min(stamps, default=None)


async def collect_status(
    amqp_url: str,
    topology: Topology,
    database_url: str,
    *,
    connect_timeout_s: float = 10.0,
    db_timeout_s: float = 5.0,
) -> PipelineStatus:
    """Everything ``status`` shows; raises :class:`~producer.BrokerUnavailable` only for the broker."""
    connection = await connect(amqp_url, timeout_s=connect_timeout_s, name="atlas-producer-status")
    try:
        queues: list[QueueStatus] = []
        for name, role in topology_queues(topology):
            depth = await queue_depth(connection, name)
            queues.append(
                QueueStatus(name, role, present=False)
                if depth is None
                else QueueStatus(name, role, present=True, ready=depth.ready, consumers=depth.consumers)
            )
        lag = await peek_ingestion_lag(connection, topology.ingestor_queue)
    finally:
        await connection.close()
    database = await database_status(database_url, timeout_s=db_timeout_s)
    return PipelineStatus(redact_url(amqp_url), topology.prefix, queues, lag, database)


async def peek_ingestion_lag(
    connection: AbstractConnection, queue_name: str, *, now: datetime | None = None
) -> IngestionLag:
    """Age of the head message of ``queue_name``, read without consuming it (see the module doc).

    Not on RabbitMQ 4 or newer: there every quorum queue has a delivery limit (20 by default) and a peek
    handed back counts as a delivery, so peeking at a queue nobody drains (an ingestor down for a while,
    with a console refreshing) would end by dropping its head message. The lag is then reported as
    ``unreadable`` with the reason."""
    major = broker_major_version(connection)
    if major is None or major >= _COUNTS_PEEKS_FROM_MAJOR:
        return IngestionLag(
            "unreadable",
            detail="not peeked: RabbitMQ 4+ counts a peek as a delivery (quorum delivery limit)",
        )
    async with throwaway_channel(connection) as channel:
        try:
            queue = await channel.declare_queue(queue_name, passive=True)
        except PASSIVE_MISSING:
            return IngestionLag("absent", detail=f"queue {queue_name} does not exist")
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            return IngestionLag("empty", seconds=0.0)
        oldest = oldest_emitted_at(message.body)
        # Leaving the block closes the channel: the unacked message goes back to the queue.
    if oldest is None:
        return IngestionLag("unreadable", detail="the head message carries no emitted_at")
    age = ((now or datetime.now(UTC)) - oldest).total_seconds()
    return IngestionLag("ok", seconds=max(0.0, age), oldest_emitted_at=oldest)


_COUNTS_PEEKS_FROM_MAJOR: Final = 4


def broker_major_version(connection: AbstractConnection) -> int | None:
    """The broker's major version from its connection properties; None when it does not say."""
    try:
        props = connection.transport.connection.server_properties  # type: ignore[union-attr]
    except AttributeError:
        return None
    version = props.get("version") if isinstance(props, dict) else None
    if isinstance(version, bytes):
        version = version.decode(errors="replace")
    head = str(version or "").split(".", 1)[0]
    return int(head) if head.isdigit() else None


_DB_ERRORS = (*DB_ERRORS, ValueError)  # ValueError: a URL asyncpg refuses
_MIGRATE_HINT = "apply the migrations: atlas-migrate"


async def database_status(database_url: str, *, timeout_s: float = 5.0) -> DatabaseStatus:
    safe_url = redact_url(database_url)
    try:
        conn = await asyncpg.connect(database_url, timeout=timeout_s)
    except _DB_ERRORS as exc:
        detail = scrub_secrets(str(exc) or type(exc).__name__, database_url)
        return DatabaseStatus(safe_url, reachable=False, error=f"cannot reach PostgreSQL: {detail}")
    missing: list[str] = []
    try:
        sessions = await _counts(
            conn,
            "SELECT status, count(*) FROM sessions WHERE task_id IS NOT NULL GROUP BY status",
            "table sessions with column task_id",
            missing,
        )
        ledger = await _counts(
            conn, "SELECT state, count(*) FROM task_ledger GROUP BY state", "table task_ledger", missing
        )
        newest = await _newest_jsonl_file(conn, missing)
        unaccounted = None
        if not missing:
            unaccounted = await count_unaccounted(conn, UNACCOUNTED_GRACE_S)
    except _DB_ERRORS as exc:
        detail = scrub_secrets(str(exc) or type(exc).__name__, database_url)
        return DatabaseStatus(safe_url, reachable=False, error=f"PostgreSQL query failed: {detail}")
    finally:
        with contextlib.suppress(*_DB_ERRORS):
            await conn.close()
    if missing:
        missing.append(_MIGRATE_HINT)
    return DatabaseStatus(safe_url, True, None, sessions, ledger, newest, missing, unaccounted)


async def _counts(conn: Any, sql: str, what: str, missing: list[str]) -> dict[str, int] | None:
    try:
        rows = await conn.fetch(sql)
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError):
        missing.append(what)
        return None
    return {str(key): int(count) for key, count in sorted(rows, key=lambda r: (-r[1], str(r[0])))}


async def _newest_jsonl_file(conn: Any, missing: list[str]) -> JsonlFile | None:
    try:
        row = await conn.fetchrow(
            "SELECT name, sessions, finalized_at FROM jsonl_files WHERE state = 'final' "
            "ORDER BY finalized_at DESC NULLS LAST, name DESC LIMIT 1"
        )
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError):
        missing.append("table jsonl_files")
        return None
    if row is None:
        return None
    return JsonlFile(str(row["name"]), int(row["sessions"]), row["finalized_at"])
