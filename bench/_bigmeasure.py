"""What :mod:`bench.bigtable` measures at each fill level: the ingestor's batch transaction, the queries
that run outside it, and table sizes.

Writes go through the ingestor's own code: demo-shaped sessions (:func:`bench._sessions.template_session`,
fresh random ids, timestamps of now) are merged by ``ingestor._batch.merge_batch`` and written by
``ingestor._write.write_batch`` in one transaction, exactly as ``Store.write`` does, on a connection with
the ingestor's codecs; a thin wrapper times each statement by its name in ``ingestor._sql``. Two shapes:

- **whole**: every session complete in its batch (opened, 5 steps, close: 7 records), the backlog case;
- **split**: each session spread over two batches, A (opened + 2 steps) then B (3 steps + close): B reads
  the sessions back, counts their steps and completes them in ``UPDATE_SESSIONS``, the steady-state case.

Queries run as the services run them (prepared statements, their real parameters, median of 3 in ms),
once more under ``plan_cache_mode = force_generic_plan`` (a long-lived connection may switch a prepared
statement to its generic plan after five runs), and once under ``EXPLAIN (ANALYZE, BUFFERS)`` for the
plan; the ones that write run in a transaction that is rolled back.
"""

from __future__ import annotations

import re
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg

from bench._sessions import template_session
from ingestor import _sql
from ingestor._batch import merge_batch
from ingestor._files import make_file_name
from ingestor._prune import SELECT_BATCH as PRUNE_SELECT
from ingestor._store import _init_connection
from ingestor._write import FileTarget, write_batch
from producer import _audit
from schemas import SessionClosed, SessionOpened, StepRecorded, TelemetryMessage

INGESTOR_ID: Final = "bigtable"
FILE_OWNER: Final = "bigtable-owner"
_NAMES: Final = {text: name for name, text in vars(_sql).items() if name.isupper() and isinstance(text, str)}


class _Timed:
    """The connection methods ``write_batch`` calls, each timed under its statement's name."""

    def __init__(self, conn: asyncpg.Connection, into: dict[str, list[float]]) -> None:
        self._conn = conn
        self._into = into

    async def _timed(self, name: str, call: Awaitable[Any]) -> Any:
        started = time.perf_counter()
        try:
            return await call
        finally:
            self._into.setdefault(name, []).append((time.perf_counter() - started) * 1000)

    async def execute(self, sql: str, *args: Any) -> Any:
        return await self._timed(_NAMES.get(sql, "other"), self._conn.execute(sql, *args))

    async def fetch(self, sql: str, *args: Any) -> Any:
        return await self._timed(_NAMES.get(sql, "other"), self._conn.fetch(sql, *args))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._timed(_NAMES.get(sql, "other"), self._conn.fetchval(sql, *args))

    async def copy_records_to_table(self, table: str, **kwargs: Any) -> Any:
        return await self._timed("COPY_STEPS", self._conn.copy_records_to_table(table, **kwargs))


def _session_records(template: Sequence[TelemetryMessage], now: datetime) -> list[TelemetryMessage]:
    """One template session with fresh ids (``uuid4().hex``, as workers make them) and times of ``now``."""
    asid = uuid.uuid4().hex
    task_id = f"bigtable-{uuid.uuid4().hex[:20]}"
    shift = now - template[0].emitted_at
    out: list[TelemetryMessage] = []
    for record in template:
        update: dict[str, Any] = {
            "adapter_session_id": asid,
            "task_id": task_id,
            "emitted_at": record.emitted_at + shift,
        }
        if isinstance(record, SessionOpened):
            update["opened_at"] = record.opened_at + shift
        elif isinstance(record, StepRecorded):
            update["started_at"] = record.started_at + shift
            update["finished_at"] = record.finished_at + shift
        elif isinstance(record, SessionClosed):
            update["closed_at"] = record.closed_at + shift
        out.append(record.model_copy(update=update))
    return out


@dataclass
class WriteStats:
    """Per shape (``whole``, ``split A``, ``split B``): batch times in ms and records per batch."""

    batch_ms: dict[str, list[float]] = field(default_factory=dict)
    records: dict[str, int] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    statement_ms: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def median(self, shape: str) -> float:
        return statistics.median(self.batch_ms[shape])

    def p90(self, shape: str) -> float:
        values = sorted(self.batch_ms[shape])
        return values[min(len(values) - 1, round(0.9 * (len(values) - 1)))]


async def _write_one(
    conn: asyncpg.Connection,
    records: list[TelemetryMessage],
    target: FileTarget,
    stats: WriteStats,
    shape: str,
    *,
    keep: bool,
) -> None:
    batch = merge_batch(records)
    statements: dict[str, list[float]] = {}
    started = time.perf_counter()
    transaction = conn.transaction()
    await transaction.start()
    try:
        await write_batch(_Timed(conn, statements), batch, target, INGESTOR_ID)
    except BaseException:
        await transaction.rollback()
        raise
    committing = time.perf_counter()
    await transaction.commit()
    done = time.perf_counter()
    if not keep:  # a warm-up batch
        return
    statements["COMMIT"] = [(done - committing) * 1000]
    stats.batch_ms.setdefault(shape, []).append((done - started) * 1000)
    stats.records[shape] = len(records)
    stats.steps[shape] = len(batch.steps)
    per_shape = stats.statement_ms.setdefault(shape, {})
    for name, times in statements.items():
        per_shape.setdefault(name, []).append(sum(times))


async def measure_writes(
    database_url: str, *, level: int, batches: int, sessions_per_batch: int, warmup: int = 3
) -> WriteStats:
    """``batches`` whole batches and ``batches // 2`` split pairs (after ``warmup`` of each, not counted);
    the file they were assigned to is made final afterwards."""
    template = template_session()
    target = FileTarget(make_file_name(INGESTOR_ID, level), FILE_OWNER)
    stats = WriteStats()
    conn = await asyncpg.connect(database_url)
    try:
        await _init_connection(conn)
        for n in range(warmup + batches):
            now = datetime.now(UTC)
            records = [r for _ in range(sessions_per_batch) for r in _session_records(template, now)]
            await _write_one(conn, records, target, stats, "whole", keep=n >= warmup)
        for n in range(warmup + batches // 2):
            now = datetime.now(UTC)
            sessions = [_session_records(template, now) for _ in range(sessions_per_batch)]
            first = [r for s in sessions for r in s[:3]]
            rest = [r for s in sessions for r in s[3:]]
            await _write_one(conn, first, target, stats, "split A", keep=n >= warmup)
            await _write_one(conn, rest, target, stats, "split B", keep=n >= warmup)
        await conn.execute(
            "UPDATE jsonl_files SET state = 'final', finalized_at = now() WHERE name = $1", target.name
        )
    finally:
        await conn.close()
    return stats


# producer status (and the console's overview, on every refresh) counts these over the whole tables.
STATUS_SESSIONS: Final = "SELECT status, count(*) FROM sessions WHERE task_id IS NOT NULL GROUP BY status"
STATUS_LEDGER: Final = "SELECT state, count(*) FROM task_ledger GROUP BY state"


@dataclass(frozen=True, slots=True)
class Query:
    name: str
    who: str
    """Which code runs it, and when."""
    sql: str
    args: Callable[[Context], tuple[Any, ...]]
    writes: bool = False
    grows: bool = False
    """It reads the whole history by design (an audit of everything, a count of everything)."""
    jit: bool = True
    """False where the service runs it with JIT off (the batch transaction, ``Store.sweeping``)."""


@dataclass(frozen=True, slots=True)
class Context:
    """Real parameter values, read from the filled tables."""

    now: datetime
    recent_file: str
    file_ids: list[int]
    recent_ids: list[int]
    recent_asids: list[str]
    recent_tasks: list[str]
    horizon: datetime | None
    prune_before: datetime


_DAY: Final = timedelta(days=1)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_GRACE: Final = timedelta(seconds=300)

QUERIES: Final[list[Query]] = [
    Query("SUPERSEDED_TASKS", "ingestor sweep (30 s)", _sql.SUPERSEDED_TASKS, lambda _: (1000,), jit=False),
    Query(
        "ABANDON", "ingestor batch + sweep", _sql.ABANDON, lambda c: (c.recent_tasks,), writes=True, jit=False
    ),
    Query(
        "UNASSIGNED_COMPLETE", "ingestor sweep (30 s)", _sql.UNASSIGNED_COMPLETE, lambda _: (1000,), jit=False
    ),
    Query(
        "FLAG_NEVER_OPENED",
        "ingestor sweep (30 s)",
        _sql.FLAG_NEVER_OPENED,
        lambda _: (_GRACE, 1000, "bench"),
        writes=True,
        jit=False,
    ),
    Query(
        "INCOMPLETE_SESSIONS",
        "ingestor sweep (30 s)",
        _sql.INCOMPLETE_SESSIONS,
        lambda _: (_GRACE, 1000),
        jit=False,
    ),
    Query(
        "UNACCOUNTED_COUNT",
        "ingestor metric (30 s)",
        _sql.UNACCOUNTED_COUNT,
        lambda _: (timedelta(seconds=600), _DAY),
        jit=False,
    ),
    Query(
        "ASSIGN",
        "ingestor batch (late steps)",
        _sql.ASSIGN,
        lambda c: (c.recent_ids, "x"),
        writes=True,
        jit=False,
    ),
    Query("SESSION_OWNERS", "ingestor batch (ambiguous)", _sql.SESSION_OWNERS, lambda c: (c.recent_asids,)),
    Query("OPEN_FILES", "ingestor recovery (30 s)", _sql.OPEN_FILES, lambda _: ("someone-else",)),
    Query("FILE_SESSION_IDS", "ingestor recovery", _sql.FILE_SESSION_IDS, lambda c: (c.recent_file,)),
    Query("LINE_SESSIONS", "recovery, export", _sql.LINE_SESSIONS, lambda c: (c.file_ids,)),
    Query("LINE_STEPS", "recovery, export", _sql.LINE_STEPS, lambda c: (c.file_ids,)),
    Query(
        "EXPORT_PAGE",
        "export --since 1 day",
        _sql.EXPORT_PAGE,
        lambda c: (c.now - _DAY, None, c.now - _DAY, 0, 500),
    ),
    Query(
        "audit SUCCEEDED --since 1 day",
        "producer audit",
        _audit._SUCCEEDED,
        lambda c: (c.now - _DAY, c.horizon),
    ),
    Query(
        "audit SUCCEEDED, all",
        "producer audit (no --since)",
        _audit._SUCCEEDED,
        lambda c: (None, c.horizon),
        grows=True,
    ),
    Query(
        "audit PROBLEMS",
        "producer audit",
        _audit._PROBLEMS,
        lambda c: (c.recent_asids, c.recent_tasks),
    ),
    Query("audit FINAL_FILES", "producer audit --jsonl-dir", _audit._FINAL_FILES, lambda _: (), grows=True),
    Query(
        "status UNACCOUNTED",
        "producer status, console",
        _audit._UNACCOUNTED,
        lambda c: (timedelta(seconds=600), c.horizon),
        grows=True,
    ),
    Query("status sessions", "producer status, console", STATUS_SESSIONS, lambda _: (), grows=True),
    Query("status ledger", "producer status, console", STATUS_LEDGER, lambda _: (), grows=True),
    Query(
        "prune batch (dry)",
        "ingestor prune",
        PRUNE_SELECT,
        lambda c: (c.prune_before, _EPOCH, 0, 10_000),
        jit=False,
    ),
]

_BIG_TABLES: Final = ("sessions", "step_results", "plans", "task_ledger")
_SCAN: Final = re.compile(
    r"(Parallel Seq Scan|Seq Scan|Bitmap Index Scan|Bitmap Heap Scan|Parallel Index Only Scan|"
    r"Parallel Index Scan|Index Only Scan Backward|Index Only Scan|Index Scan Backward|Index Scan)"
    r"(?: using (\S+))? on (\S+)"
)
_BUFFERS: Final = re.compile(r"Buffers: shared(?: hit=(\d+))?(?: read=(\d+))?")
_EXEC: Final = re.compile(r"Execution Time: ([\d.]+) ms")


@dataclass
class QueryResult:
    ms: float
    generic_ms: float
    explain_ms: float
    hit: int
    read: int
    scans: list[str]
    seq_scans: list[str]
    plan: str


async def _rolled_back(conn: asyncpg.Connection, sql: str, args: tuple[Any, ...]) -> list[Any]:
    """Run ``sql`` in a transaction that is rolled back (what it writes is undone)."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        rows: list[Any] = await conn.fetch(sql, *args)
    finally:
        await transaction.rollback()
    return rows


async def _timed(conn: asyncpg.Connection, query: Query, args: tuple[Any, ...]) -> float:
    started = time.perf_counter()
    if query.writes:
        await _rolled_back(conn, query.sql, args)
    else:
        await conn.fetch(query.sql, *args)
    return (time.perf_counter() - started) * 1000


async def _explain(conn: asyncpg.Connection, query: Query, args: tuple[Any, ...]) -> str:
    rows = await _rolled_back(conn, "EXPLAIN (ANALYZE, BUFFERS) " + query.sql, args)
    return "\n".join(r[0] for r in rows)


def _summarise(plan: str) -> tuple[float, int, int, list[str], list[str]]:
    found = _EXEC.search(plan)
    explain_ms = float(found.group(1)) if found else float("nan")
    hit = read = 0
    buffers = _BUFFERS.search(plan)  # the first Buffers line is the top node's: the whole statement
    if buffers:
        hit, read = int(buffers.group(1) or 0), int(buffers.group(2) or 0)
    scans: list[str] = []
    seq: list[str] = []
    for kind, index, table in _SCAN.findall(plan):
        text = f"{kind} {index} on {table}" if index else f"{kind} on {table}"
        if text not in scans:
            scans.append(text)
        if "Seq Scan" in kind and table in _BIG_TABLES and table not in seq:
            seq.append(table)
    return explain_ms, hit, read, scans, seq


async def measure_queries(database_url: str, ctx: Context, *, runs: int = 3) -> dict[str, QueryResult]:
    conn = await asyncpg.connect(database_url, command_timeout=None)
    results: dict[str, QueryResult] = {}
    try:
        await _init_connection(conn)
        for query in QUERIES:
            args = query.args(ctx)
            await conn.execute("SET jit = on" if query.jit else "SET jit = off")
            times = [await _timed(conn, query, args) for _ in range(runs)]
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            try:
                generic = await _timed(conn, query, args)
            finally:
                await conn.execute("RESET plan_cache_mode")
            plan = await _explain(conn, query, args)
            await conn.execute("RESET jit")
            explain_ms, hit, read, scans, seq = _summarise(plan)
            results[query.name] = QueryResult(
                statistics.median(times), generic, explain_ms, hit, read, scans, seq, plan
            )
    finally:
        await conn.close()
    return results


SIZE_TABLES: Final = ("step_results", "sessions", "plans", "task_ledger", "jsonl_files")

_SIZES: Final = """
SELECT c.relname AS name, c.reltuples::bigint AS rows, pg_relation_size(c.oid) AS heap,
       pg_indexes_size(c.oid) AS indexes, pg_total_relation_size(c.oid) AS total
FROM pg_class AS c WHERE c.relname = ANY($1::text[]) AND c.relkind = 'r'
"""
_INDEX_SIZES: Final = """
SELECT i.relname AS name, t.relname AS table_name, pg_relation_size(i.oid) AS size
FROM pg_index AS x JOIN pg_class AS i ON i.oid = x.indexrelid JOIN pg_class AS t ON t.oid = x.indrelid
WHERE t.relname = ANY($1::text[])
ORDER BY t.relname, i.relname
"""


@dataclass(frozen=True, slots=True)
class Sizes:
    tables: dict[str, dict[str, int]]
    indexes: dict[str, int]
    database: int


async def measure_sizes(conn: asyncpg.Connection) -> Sizes:
    tables = {r["name"]: dict(r) for r in await conn.fetch(_SIZES, list(SIZE_TABLES))}
    indexes = {r["name"]: r["size"] for r in await conn.fetch(_INDEX_SIZES, ["step_results", "sessions"])}
    database = await conn.fetchval("SELECT pg_database_size(current_database())")
    return Sizes(tables, indexes, int(database))


async def context(
    conn: asyncpg.Connection, *, recent_first: int, recent_count: int, prune_before: datetime
) -> Context:
    """Parameters from the recent day: a final file of it, its sessions, 142 sessions and their tasks."""
    now = await conn.fetchval("SELECT now()")
    recent_file = await conn.fetchval(
        "SELECT export_file FROM sessions WHERE id >= $1 AND export_file IS NOT NULL ORDER BY id LIMIT 1",
        recent_first + recent_count // 4,
    )
    file_ids = [r["id"] for r in await conn.fetch(_sql.FILE_SESSION_IDS, recent_file)]
    rows = await conn.fetch(
        "SELECT id, adapter_session_id, task_id FROM sessions WHERE id >= $1 ORDER BY id LIMIT 142",
        recent_first + recent_count // 2,
    )
    return Context(
        now=now,
        recent_file=recent_file,
        file_ids=file_ids,
        recent_ids=[r["id"] for r in rows],
        recent_asids=[r["adapter_session_id"] for r in rows],
        recent_tasks=sorted({r["task_id"] for r in rows}),
        horizon=await _audit.pruned_before(conn),
        prune_before=prune_before,
    )
