"""The Postgres writer: a pool, the batch transaction, line data, and the error classification."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

import asyncpg
import orjson
import structlog

from atlas_common import Resource, connect_options, pool_options, redact_url, scrub_secrets
from ingestor import _sql
from ingestor._batch import MergedBatch, Problem, RecordKey, key_of, task_lock_key
from ingestor._errors import (
    DatabaseUnavailable,
    IngestorError,
    MessageRejected,
    RecordsRejected,
)
from ingestor._linecache import Assigned, LineCache
from ingestor._lines import build_line
from ingestor._rows import unstorable
from ingestor._settings import IngestorSettings
from ingestor._write import BatchTransaction, FileTarget, assign

_log = structlog.get_logger("ingestor.store")

# SQLSTATE classes that say "not now" (connection, rollback/deadlock, resources, operator, system) or
# "not this schema" (undefined object, privileges): retried, never blamed on a message.
_HOLD_CLASSES: Final = frozenset({"08", "40", "53", "55", "57", "58", "42", "3D", "3F", "28", "0A", "XX"})
DB_ERRORS: Final = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
_ID_CHUNK: Final = 1000

Record = Any  # asyncpg.Record (asyncpg ships no type information)


@dataclass(frozen=True, slots=True)
class ProblemRow:
    """One ``telemetry_problems`` row: which record (``seq`` -1: the whole session) and why."""

    adapter_session_id: str
    task_id: str | None
    seq: int
    kind: str | None
    problem: Problem


def _unstorable_records(batch: MergedBatch) -> dict[RecordKey, Problem]:
    culprits: dict[RecordKey, Problem] = {}
    for change in batch.sessions:
        for message in (change.opened, change.closed):
            if message is not None and (problem := unstorable(message)) is not None:
                culprits[key_of(message)] = problem
    for step in batch.steps:
        if (problem := unstorable(step)) is not None:
            culprits[key_of(step)] = problem
    return culprits


def _missing(rec: Record) -> str:
    expected = int(rec["steps_expected"])
    stored = {int(s) for s in rec["seqs"] if s is not None}
    missing = sorted(set(range(1, expected + 1)) - stored)
    shown = ", ".join(str(s) for s in missing[:20]) + (" ..." if len(missing) > 20 else "")
    return f"its close announced {expected} step(s); {len(stored)} stored; missing seq {shown or '-'}"


def classify(err: BaseException, url: str = "") -> IngestorError:
    """A data error becomes MessageRejected (bisect); everything else DatabaseUnavailable (hold, retry). The
    text never holds a secret of ``url`` (the URL connected to): it goes to logs, dead letters and
    ``telemetry_problems``, and a driver's message may quote its URL."""
    if isinstance(err, asyncpg.PostgresError):
        sqlstate = str(getattr(err, "sqlstate", "") or "")
        if sqlstate[:2] not in _HOLD_CLASSES:
            return MessageRejected(scrub_secrets(f"postgres {sqlstate}: {err}", url), sqlstate)
    return DatabaseUnavailable(scrub_secrets(f"{type(err).__name__}: {err}", url))


def _encode_jsonb(value: object) -> bytes:
    return b"\x01" + orjson.dumps(value)  # jsonb's binary form: a version byte, then the JSON text


def _decode_jsonb(data: bytes) -> object:
    return orjson.loads(memoryview(data)[1:])


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Binary codecs, because COPY (the steps go in by COPY) takes no type with a text codec.
    await conn.set_type_codec(
        "jsonb", encoder=_encode_jsonb, decoder=_decode_jsonb, schema="pg_catalog", format="binary"
    )
    await conn.set_type_codec(
        "json", encoder=orjson.dumps, decoder=orjson.loads, schema="pg_catalog", format="binary"
    )


async def connect(settings: IngestorSettings, url: str | None = None) -> asyncpg.Connection:
    """One connection with the pool's codecs to ``url`` (default DATABASE_URL, through its pooler)."""
    if url is None:
        url, options = settings.database_url, connect_options(settings.db_pooler)
    else:  # the liveness URL: direct or session-pooled by contract, so the statement cache is safe
        options = {}
    conn = await asyncpg.connect(
        url,
        timeout=settings.db_connect_timeout_s,
        command_timeout=settings.db_command_timeout_s,
        **options,
    )
    await _init_connection(conn)
    return conn


async def fetch_line_map(conn: asyncpg.Connection, ids: Sequence[int]) -> dict[int, bytes]:
    """The JSONL lines of sessions ``ids`` built from Postgres, by session id (a missing id: no such row).
    ``conn`` decodes ``json`` / ``jsonb`` columns to Python values (a type codec, as the ingestor's own
    connections do)."""
    lines: dict[int, bytes] = {}
    for start in range(0, len(ids), _ID_CHUNK):
        chunk = list(ids[start : start + _ID_CHUNK])
        sessions = await conn.fetch(_sql.LINE_SESSIONS, chunk)
        steps: dict[int, list[Record]] = {}
        for rec in await conn.fetch(_sql.LINE_STEPS, chunk):
            steps.setdefault(rec["session_id"], []).append(rec)
        for s in sessions:
            lines[s["id"]] = build_line(s, steps.get(s["id"], []))
    return lines


async def fetch_lines(conn: asyncpg.Connection, ids: Sequence[int]) -> list[bytes]:
    """The JSONL lines of sessions ``ids`` (in id order per chunk of ids), built from Postgres: what
    recovery and ``export`` write."""
    return list((await fetch_line_map(conn, ids)).values())


class Store(Resource):
    """The connection pool. Every method raises DatabaseUnavailable or MessageRejected, never asyncpg's."""

    def __init__(self, settings: IngestorSettings) -> None:
        self._settings = settings
        self._pool: asyncpg.Pool | None = None
        self._lines = LineCache(settings.line_cache_max_bytes)

    async def open(self) -> None:
        if self._pool is not None:
            return
        # min_size=0: creating the pool never connects, so a start while Postgres is down does not fail.
        self._pool = await asyncpg.create_pool(
            self._settings.database_url,
            min_size=0,
            # A connection per batch in flight, and two for the rest (problems, owners, sweeps, lines).
            max_size=self._settings.batches_in_flight + 2,
            init=_init_connection,
            timeout=self._settings.db_connect_timeout_s,
            command_timeout=self._settings.db_command_timeout_s,
            **pool_options(self._settings.db_pooler),
        )

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=5)
            except (TimeoutError, *DB_ERRORS):
                pool.terminate()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; database errors inside come out classified."""
        if self._pool is None:
            raise DatabaseUnavailable("the store is closed")
        try:
            async with self._pool.acquire(timeout=self._settings.db_connect_timeout_s) as conn:
                yield conn
        except DB_ERRORS as err:
            raise classify(err, self._settings.database_url) from err

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with self.connection() as conn, conn.transaction():
            yield conn

    @asynccontextmanager
    async def sweeping(self) -> AsyncIterator[asyncpg.Connection]:
        """A transaction with JIT off, for the periodic sweeps and the metric (see ``_sql.JIT_OFF``)."""
        async with self.transaction() as conn:
            await conn.execute(_sql.JIT_OFF)
            yield conn

    async def check_schema(self) -> bool:
        async with self.connection() as conn:
            found = await conn.fetchval(_sql.SCHEMA_CHECK)
        return int(found) == _sql.SCHEMA_CHECK_EXPECTED

    async def write(self, batch: MergedBatch, target: FileTarget) -> list[Assigned]:
        """One batch transaction; returns the sessions it assigned to ``target``, with their lines where
        memory holds them (:class:`LineCache`). A batch that fails on its data raises RecordsRejected naming
        the records at fault when they can be told (MessageRejected otherwise: the caller bisects)."""
        try:
            # Its rows are built first, outside the transaction (see BatchTransaction: its locks are held
            # only while its statements run).
            transaction = await BatchTransaction.prepare(batch)
            async with self.transaction() as conn:
                written = await transaction.run(conn, target, self._settings.ingestor_id)
        except MessageRejected as err:
            culprits = _unstorable_records(batch)
            if culprits:
                raise RecordsRejected(culprits) from err
            raise
        except (TypeError, ValueError, OverflowError) as err:  # a row the encoder cannot build
            culprits = _unstorable_records(batch)
            if culprits:
                raise RecordsRejected(culprits) from err
            raise MessageRejected(f"cannot build rows: {err}") from err
        return await self._lines.committed(written)  # only now: what a rolled-back attempt wrote is not kept

    async def owners(self, adapter_session_ids: Iterable[str]) -> dict[str, str]:
        """The stored task of each of these sessions that the database holds."""
        async with self.connection() as conn:
            rows = await conn.fetch(_sql.SESSION_OWNERS, sorted(adapter_session_ids))
        return {r["adapter_session_id"]: r["task_id"] for r in rows if r["task_id"] is not None}

    async def record_problems(self, problems: Sequence[ProblemRow]) -> None:
        """Keep what could not be stored, and why, where ``producer audit`` finds it."""
        unique = {(p.adapter_session_id, p.seq, p.problem.code): p for p in problems}
        if not unique:
            return
        rows = list(unique.values())
        async with self.connection() as conn:
            await conn.execute(
                _sql.RECORD_PROBLEMS,
                [p.adapter_session_id for p in rows],
                [p.task_id for p in rows],
                [p.seq for p in rows],
                [p.kind for p in rows],
                [p.problem.code for p in rows],
                [p.problem.reason[:4000] for p in rows],
            )

    async def flag_incomplete(self, grace_s: float, limit: int = 1000) -> int:
        """Flag stubs that never opened and closed sessions still missing steps after ``grace_s``."""
        grace = timedelta(seconds=grace_s)
        never = f"no session.opened arrived within {grace_s:g}s of the session's first record"
        async with self.sweeping() as conn:
            stubs = await conn.fetch(_sql.FLAG_NEVER_OPENED, grace, limit, never)
        async with self.sweeping() as conn:
            incomplete = await conn.fetch(_sql.INCOMPLETE_SESSIONS, grace, limit)
        rows = [
            ProblemRow(r["adapter_session_id"], r["task_id"], -1, None, Problem("missing_steps", _missing(r)))
            for r in incomplete
        ]
        await self.record_problems(rows)
        for rec in (*stubs, *incomplete):
            _log.warning("session.flagged_incomplete", adapter_session_id=rec["adapter_session_id"])
        return len(stubs) + len(rows)

    async def unaccounted(self, grace_s: float, lookback_s: float) -> int:
        """Tasks the worker's ledger calls succeeded (within ``lookback_s``) whose session is not stored and
        in a final JSONL file ``grace_s`` after they succeeded."""
        async with self.sweeping() as conn:
            found = await conn.fetchval(
                _sql.UNACCOUNTED_COUNT, timedelta(seconds=grace_s), timedelta(seconds=lookback_s)
            )
        return int(found)

    async def lines(self, ids: Sequence[int]) -> dict[int, bytes]:
        """The lines of sessions ``ids`` read from Postgres, by session id."""
        async with self.connection() as conn:
            return await fetch_line_map(conn, ids)

    async def sweep_abandoned(self, limit: int = 1000) -> int:
        """Apply the abandonment rule to every task that needs it (normally already done per batch)."""
        async with self.sweeping() as conn:
            tasks = [r["task_id"] for r in await conn.fetch(_sql.SUPERSEDED_TASKS, limit)]
        if not tasks:
            return 0
        async with self.sweeping() as conn:
            await conn.execute(_sql.LOCK_TASKS, sorted({task_lock_key(t) for t in tasks}))
            rows = await conn.fetch(_sql.ABANDON, sorted(tasks))
        for rec in rows:
            _log.info(
                "session.abandoned",
                adapter_session_id=rec["adapter_session_id"],
                superseded_by=rec["attempt"],
            )
        return len(rows)

    async def sweep_unassigned(self, target: FileTarget, limit: int = 1000) -> list[Assigned]:
        """Assign complete sessions no file holds (there should be none: the batch assigns them)."""
        async with self.sweeping() as conn:
            found = await conn.fetch(_sql.UNASSIGNED_COMPLETE, limit)
        if not found:
            return []
        async with self.sweeping() as conn:
            await conn.execute(_sql.LOCK_TASKS, sorted({task_lock_key(r["task_id"]) for r in found}))
            ids = await assign(conn, [r["id"] for r in found], target, self._settings.ingestor_id)
        if ids:
            _log.warning("sweep.assigned_unexported_sessions", count=len(ids), file=target.name)
        return [(i, None) for i in ids]

    def describe(self) -> str:
        return redact_url(self._settings.database_url)
