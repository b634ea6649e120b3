"""The web console at a million sessions: p50 / p95 of its pages against a generated, realistic database.

A fresh migrated scratch database is filled server-side (``INSERT ... SELECT FROM generate_series``, no
row crosses the wire) with N sessions shaped like the ingestor's: ids in creation order over the last
``SPAN_DAYS`` days, ~97.5% succeeded, 2% failed, 0.3% abandoned, the newest few still running; three
adapters (``demo`` 70%, ``openai-agents`` 29%, ``langgraph`` 1%); attempt 1 for 96.5%, else 2 or 3; a
unique task id and adapter session id each; metadata / usage / events jsonb, a final answer, a JSONL file
name per 5,000 sessions (a ``jsonl_files`` row each). ``STEPS`` step rows per session (2 for a running
one) with a trace, an output and the step metadata the console's timeline reads; a plan for every other
session; a ledger row per task (``succeeded`` / ``dead`` / ``running`` after its session); a problem
row per 1,000 sessions. Then ``VACUUM ANALYZE`` (the visibility map a freshly loaded table lacks, and
the statistics). The load uses ``session_replication_role = replica`` (no foreign-key trigger per step
row): the rows are consistent by construction.

The console then runs in this process (``console.create_app`` behind an ``AppRunner`` on 127.0.0.1, port
0) and an aiohttp client sends each page's requests one at a time, after a warm-up: wall time per
request, status 200 checked. Each row is a page's p95 (ms) against the target p95 <= ``TARGET_MS``
(the issue's "pages stay fast at a million sessions"), with its p50 in the notes. Random values (ids,
task ids, days) are drawn anew for every request, so most requests miss the previous one's pages in
PostgreSQL's buffers.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final
from urllib.parse import urlencode

import aiohttp
import asyncpg
from aiohttp import web

from bench._harness import scratch_database, unique
from bench._report import Result
from bench._stack import percentile
from console import ConsoleSettings, create_app
from console._overview import read_overview
from console._queries import init_connection
from migrations import apply_migrations

TARGET_MS: Final = 100.0
"""A page meets its target when its p95 is at most this."""
SPAN_DAYS: Final = 30
STEPS: Final = 5
FILE_SESSIONS: Final = 5_000
"""Sessions per generated JSONL file."""
RARE_ADAPTER: Final = "langgraph"
WARMUP: Final = 10
"""Requests per page before the timed ones (connections opened, templates compiled)."""

_SESSIONS: Final = """
INSERT INTO sessions (task, status, metadata, final_answer, created_at, completed_at, stored_at,
                      adapter_session_id, adapter_usage, adapter_events, task_id, attempt, steps_expected,
                      export_file)
SELECT
    'Research topic ' || g || ', compare two approaches and recommend one (case ' || g % 1000 || ').',
    status,
    jsonb_build_object(
        'adapter', adapter, 'attempt', attempt, 'task_id', task_id, 'reason', NULL,
        'execution_mode', 'stepwise',
        'task_metadata', jsonb_build_object('n', g, 'run_id', 'bench', 'source', 'bench'),
        'close_metadata', jsonb_build_object('steps', 5, 'turns', 5, 'notes', g % 4, 'reason', NULL,
                                             'final_attempt', true, 'adapter_session_id', asid)),
    CASE WHEN status = 'running' THEN NULL ELSE
        'Answer to ''Research topic ' || g || ''': 3 steps in 5 turns. step 1: calculator found '
        || g % 97 || ' items; step 2: notes found ' || g % 89 || ' items; step 3: calculator found '
        || g % 83 || ' items.' END,
    created_at,
    CASE WHEN status = 'running' THEN NULL ELSE created_at + duration END,
    CASE WHEN status IN ('succeeded', 'failed') THEN created_at + duration + interval '150 ms' END,
    asid,
    jsonb_build_object('calls', 5, 'total_tokens', 600 + g % 200, 'prompt_tokens', 420 + g % 150,
                       'completion_tokens', 180 + g % 50),
    jsonb_build_array(
        jsonb_build_object('type', 'tool_call', 'tool', 'calculator',
                           'arguments', jsonb_build_object('query', 'Research: topic ' || g)),
        jsonb_build_object('type', 'tool_result', 'tool', 'calculator',
                           'result', 'calculator found ' || g % 97 || ' items')),
    task_id,
    attempt,
    CASE WHEN status = 'running' THEN NULL ELSE 5 END,
    CASE WHEN status IN ('succeeded', 'failed')
         THEN 'sessions-bench-' || lpad((g / $3)::text, 6, '0') || '.jsonl' END
FROM (
    SELECT g,
           CASE WHEN g > $1 - 25 THEN 'running'
                WHEN abs(hashint4extended(g, 1) % 1000) < 20 THEN 'failed'
                WHEN abs(hashint4extended(g, 1) % 1000) < 23 THEN 'abandoned'
                ELSE 'succeeded' END AS status,
           CASE WHEN abs(hashint4extended(g, 2) % 100) < 1 THEN $4
                WHEN abs(hashint4extended(g, 2) % 100) < 30 THEN 'openai-agents'
                ELSE 'demo' END AS adapter,
           CASE WHEN abs(hashint4extended(g, 3) % 1000) < 10 THEN 3
                WHEN abs(hashint4extended(g, 3) % 1000) < 35 THEN 2
                ELSE 1 END AS attempt,
           'bench-' || lpad(g::text, 8, '0') AS task_id,
           md5(g::text) AS asid,
           now() - make_interval(days => $2) + (g - 1) * (make_interval(days => $2) / $1) AS created_at,
           make_interval(secs => 0.2 + abs(hashint4extended(g, 4) % 30000) / 1000.0) AS duration
    FROM generate_series(1, $1) AS g
    OFFSET 0  -- each of these once per row, not once per use above
) AS x
"""
_STEPS: Final = """
INSERT INTO step_results (session_id, step_id, trace, output, attempts, metadata, adapter_session_id,
                          adapter_usage, adapter_events)
SELECT s.id, k,
       'Task: ' || s.task || E'\n\nOutputs of earlier steps:\n'
           || repeat('Step (Research: earlier output of the topic, with its notes) ', k + 2)
           || E'\n\nNow do step ' || k || '.',
       'Step ' || k || ' via calculator: calculator found ' || (s.id + k) % 97 || ' items (turn '
           || k + 1 || ', ' || k || ' notes)',
       1,
       jsonb_build_object(
           'seq', k + 1, 'error', NULL, 'status', 'ok', 'duration_ms', 0,
           'phase', CASE k WHEN 0 THEN 'plan' WHEN $1 - 1 THEN 'synthesize' ELSE 'execute' END,
           'description', CASE k WHEN 0 THEN 'Plan the steps for the task'
                                 WHEN $1 - 1 THEN 'Synthesize the final answer'
                                 ELSE 'Research: part ' || k END,
           'started_at', s.created_at + k * interval '30 ms',
           'finished_at', s.created_at + k * interval '30 ms' + interval '25 ms'),
       s.adapter_session_id,
       jsonb_build_object('calls', 1, 'total_tokens', 74 + k * 30, 'prompt_tokens', 57 + k * 30,
                          'completion_tokens', 17),
       NULL
FROM sessions AS s
CROSS JOIN LATERAL generate_series(0, CASE WHEN s.status = 'running' THEN 1 ELSE $1 - 1 END) AS k
"""
_PLANS: Final = """
INSERT INTO plans (session_id, plan)
SELECT id, jsonb_build_object('steps', jsonb_build_array(
    jsonb_build_object('id', 1, 'depends_on', '[]'::jsonb, 'description', 'Research: part 1'),
    jsonb_build_object('id', 2, 'depends_on', '[1]'::jsonb, 'description', 'Compare: part 2'),
    jsonb_build_object('id', 3, 'depends_on', '[2]'::jsonb, 'description', 'Check: part 3')))
FROM sessions WHERE id % 2 = 0
"""
_LEDGER: Final = """
INSERT INTO task_ledger (task_id, state, attempts, adapter_session_id, close_message, worker_id,
                         last_error, created_at, updated_at, claim_token)
SELECT task_id,
       CASE status WHEN 'succeeded' THEN 'succeeded' WHEN 'running' THEN 'running' ELSE 'dead' END,
       attempt, adapter_session_id, convert_to(repeat('closed ' || task_id || ' ', 8), 'UTF8'),
       'bench-w' || id % 4,
       CASE WHEN status IN ('failed', 'abandoned') THEN 'AdapterError: the model refused (bench)' END,
       created_at, coalesce(completed_at, created_at), md5(task_id)
FROM sessions
"""
_FILES: Final = """
INSERT INTO jsonl_files (name, ingestor_id, owner_token, state, sessions, created_at, finalized_at)
SELECT export_file, 'bench-ingestor', 'bench-ingestor/1', 'final', count(*), min(stored_at),
       max(stored_at) + interval '1 s'
FROM sessions WHERE export_file IS NOT NULL GROUP BY export_file
"""
_OPEN_FILE: Final = """
UPDATE jsonl_files SET state = 'open', finalized_at = NULL
WHERE name = (SELECT max(name) FROM jsonl_files)
"""
_PROBLEMS: Final = """
INSERT INTO telemetry_problems (adapter_session_id, task_id, seq, kind, problem, reason, first_seen,
                                last_seen)
SELECT adapter_session_id, task_id, 3, 'step', 'rejected', 'value too long for type (bench)', created_at,
       created_at
FROM sessions WHERE id % 1000 = 0
"""


@dataclass(frozen=True, slots=True)
class Generated:
    sessions: int
    steps: int
    plans: int
    ledger: int
    files: int
    problems: int
    seconds: float
    size: str
    """The database's size (pg_size_pretty)."""

    def notes(self) -> str:
        return (
            f"{self.sessions:,} sessions, {self.steps:,} step rows, {self.plans:,} plans, {self.ledger:,} "
            f"ledger rows, {self.files:,} JSONL files, {self.problems:,} problem rows ({self.size}): "
            "INSERT ... SELECT FROM generate_series into UNLOGGED tables, secondary indexes rebuilt after, "
            "then VACUUM ANALYZE"
        )


_COUNTS: Final = """
SELECT (SELECT count(*) FROM step_results) AS steps, (SELECT count(*) FROM plans) AS plans,
       (SELECT count(*) FROM task_ledger) AS ledger, (SELECT count(*) FROM jsonl_files) AS files,
       (SELECT count(*) FROM telemetry_problems) AS problems,
       pg_size_pretty(pg_database_size(current_database())) AS size
"""
_UNLOGGED: Final = ("step_results", "plans", "sessions", "task_ledger", "jsonl_files", "telemetry_problems")
"""In this order (a logged table cannot reference an unlogged one)."""
_LOADED: Final = ("sessions", "step_results", "plans", "task_ledger")
_SECONDARY: Final = """
SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS definition
FROM pg_index AS i
WHERE i.indrelid = ANY($1::regclass[]) AND NOT i.indisprimary
  AND NOT EXISTS (SELECT 1 FROM pg_constraint AS c WHERE c.conindid = i.indexrelid)
"""


async def generate(conn: asyncpg.Connection, n: int) -> Generated:
    """Fill a migrated, empty database with ``n`` sessions and everything around them (see the module doc).

    Fast path, same end state as the migrations': the tables are made UNLOGGED while empty (no WAL; reads
    are unchanged, and the database is dropped afterwards), their secondary indexes are dropped and
    rebuilt from their own definitions after the load (one sort each instead of a random insert per row).
    """
    started = time.monotonic()
    await conn.execute("SET session_replication_role = replica")
    await conn.execute("SET maintenance_work_mem = '256MB'")
    for table in _UNLOGGED:
        await conn.execute(f"ALTER TABLE {table} SET UNLOGGED")
    indexes = await conn.fetch(_SECONDARY, list(_LOADED))
    for index in indexes:
        await conn.execute(f"DROP INDEX {index['name']}")
    await conn.execute(_SESSIONS, n, SPAN_DAYS, FILE_SESSIONS, RARE_ADAPTER)
    await conn.execute(_STEPS, STEPS)
    await conn.execute(_PLANS)
    await conn.execute(_LEDGER)
    await conn.execute(_FILES)
    await conn.execute(_OPEN_FILE)
    await conn.execute(_PROBLEMS)
    for index in indexes:
        await conn.execute(index["definition"])
    await conn.execute("RESET session_replication_role")
    await conn.execute("VACUUM ANALYZE")
    seconds = time.monotonic() - started
    counts = await conn.fetchrow(_COUNTS)
    assert counts is not None
    return Generated(
        n,
        counts["steps"],
        counts["plans"],
        counts["ledger"],
        counts["files"],
        counts["problems"],
        seconds,
        counts["size"],
    )


def console_name(sessions: int, page: str) -> str:
    return f"atlas console, {sessions:,} sessions: {page} p95"


def generated_name(sessions: int) -> str:
    return f"atlas console bench data: {sessions:,} sessions generated"


UNCACHED: Final = "overview reading, uncached"


def row_names(sessions: int) -> list[str]:
    """The names of the rows :func:`console_pages` returns, in order."""
    labels = [page.label for page in pages(sessions, datetime.now(UTC))]
    return [
        generated_name(sessions),
        *(console_name(sessions, label) for label in labels),
        console_name(sessions, UNCACHED),
    ]


Draw = Callable[[random.Random], str]


@dataclass(frozen=True, slots=True)
class Page:
    label: str
    """In the row's name."""
    what: str
    """In the row's notes: what was requested."""
    draw: Draw
    """A request's path and query, drawn anew each time."""


def pages(n: int, first_day: datetime) -> list[Page]:
    """The pages timed, in order, over a database of ``n`` sessions whose first is of ``first_day``."""

    def day(rng: random.Random) -> str:
        since = first_day + timedelta(days=rng.randrange(1, SPAN_DAYS - 1))
        until = since + timedelta(days=1)
        return "/sessions?" + urlencode({"since": since.isoformat(), "until": until.isoformat()})

    return [
        Page("sessions list, first page", "GET /sessions", lambda _: "/sessions"),
        Page(
            "sessions list, deep keyset page",
            f"GET /sessions?before=<random id in {n // 3:,}..{2 * n // 3:,}>",
            lambda rng: f"/sessions?before={rng.randint(n // 3, 2 * n // 3)}",
        ),
        Page(
            "sessions list, status=failed",
            "GET /sessions?status=failed (2%)",
            lambda _: "/sessions?status=failed",
        ),
        Page(
            f"sessions list, adapter={RARE_ADAPTER}",
            f"GET /sessions?adapter={RARE_ADAPTER} (1% of the sessions)",
            lambda _: f"/sessions?adapter={RARE_ADAPTER}",
        ),
        Page(
            "sessions list, q=<task id>",
            "GET /sessions?q=<random task id>",
            lambda rng: f"/sessions?q=bench-{rng.randint(1, n):08d}",
        ),
        Page("sessions list, one day", "GET /sessions?since=<random day>&until=<a day later>", day),
        Page("one session page", "GET /sessions/<random id>", lambda rng: f"/sessions/{rng.randint(1, n)}"),
        Page(
            "overview body, cached",
            "GET /overview/body (refresh_s=3600: the reading of the warm-up is reused)",
            lambda _: "/overview/body",
        ),
    ]


def overview_readings(requests: int) -> int:
    """Uncached overview readings timed: fewer than requests (each reads the whole tables' counts)."""
    return max(3, requests // 20)


def _notes(times_ms: list[float], what: str, n_requests: int, *, warmup: int = WARMUP) -> str:
    p50 = percentile(times_ms, 50)
    return (
        f"p50 {p50:.1f} ms, max {times_ms[-1]:.0f} ms; {what}; {n_requests} requests one at a time after "
        f"{warmup} warm-up"
    )


async def _get(client: aiohttp.ClientSession, url: str) -> None:
    async with client.get(url) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"console bench: {url} answered {response.status}")


async def _timed(call: Callable[[], Awaitable[None]], n: int, warmup: int = WARMUP) -> list[float]:
    """``call()`` ``warmup`` times, then ``n`` times timed: the sorted wall times in ms."""
    for _ in range(warmup):
        await call()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)


async def _time_pages(
    settings: ConsoleSettings, timed: list[Page], n: int, rng: random.Random
) -> list[list[float]]:
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as client:

            def request(page: Page) -> Callable[[], Awaitable[None]]:
                return lambda: _get(client, base + page.draw(rng))

            return [await _timed(request(page), n) for page in timed]
    finally:
        await runner.cleanup()


async def _time_overview_reading(settings: ConsoleSettings, n: int) -> list[float]:
    """The reading the overview's cache wraps (broker status, database status, rates, newest files)."""
    pool = await asyncpg.create_pool(
        settings.database_url, min_size=1, max_size=4, statement_cache_size=0, init=init_connection
    )
    try:

        async def read() -> None:
            overview = await read_overview(settings, pool)
            if overview.db_error or overview.broker_error or overview.status is None:
                raise RuntimeError(f"console bench: the overview read {overview}")
            if not overview.status.database.reachable:
                raise RuntimeError(f"console bench: {overview.status.database.error}")

        return await _timed(read, n, warmup=1)
    finally:
        await pool.close()


async def console_pages(
    amqp_url: str, admin_database_url: str, *, sessions: int, requests: int
) -> list[Result]:
    """A database of ``sessions`` generated sessions; ``requests`` timed requests per page."""
    async with scratch_database(admin_database_url) as database_url:
        await apply_migrations(database_url)
        conn = await asyncpg.connect(database_url)
        try:
            generated = await generate(conn, sessions)
            first_day: datetime = await conn.fetchval("SELECT min(created_at) FROM sessions")
        finally:
            await conn.close()
        settings = ConsoleSettings(
            database_url=database_url,
            amqp_url=amqp_url,
            prefix=unique("atlas-bench-console"),
            port=0,
            refresh_s=3600.0,
        )
        rng = random.Random(13)
        timed = pages(sessions, first_day)
        times = await _time_pages(settings, timed, requests, rng)
        readings = overview_readings(requests)
        overview = await _time_overview_reading(settings, readings)
    rows = [
        Result(
            generated_name(sessions),
            "s",
            generated.seconds,
            notes=generated.notes(),
        )
    ]
    for page, page_times in zip(timed, times, strict=True):
        rows.append(
            Result(
                console_name(sessions, page.label),
                "ms",
                percentile(page_times, 95),
                notes=_notes(page_times, page.what, requests),
                at_most=TARGET_MS,
            )
        )
    rows.append(
        Result(
            console_name(sessions, UNCACHED),
            "ms",
            percentile(overview, 95),
            # No page target: no page waits for a reading after the first one (OverviewCache renews it in
            # the background, no sooner than ten times its duration): this row is its cost.
            notes=_notes(
                overview,
                "console._overview.read_overview called directly (what the overview's background renewal "
                "costs, at most once per max(refresh_s, 10 x its duration); no page waits for it: "
                "RabbitMQ queue depths, sessions by status, ledger by state, "
                "succeeded-not-stored, rates, newest files; a new broker and database connection each)",
                readings,
                warmup=1,
            ),
        )
    )
    return rows
