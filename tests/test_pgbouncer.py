"""The worker ledger and the ingestor through a real PgBouncer in transaction pooling mode (Debian's
pgbouncer 1.18: no prepared statements in that mode), restarted and its connections killed mid-run.

Connections are counted while the pipeline runs: server side in ``pg_stat_activity`` (what counts against
``max_connections``) and client side on PgBouncer's admin console (``SHOW CLIENTS``, by application_name).
The counts are printed (``pytest -s``) and are the numbers the README's sizing advice uses."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import asyncpg
import pytest

from schemas import TaskMessage
from tests._pgbouncer import PgBouncer
from tests._pipeline import PipelineStack
from tests.test_end_to_end import _check_tables_and_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

_POOL_SIZE = 4
_WORKERS = 3
_TASKS = 1500
_FAST = {
    "WORKER_DB_POOLER": "transaction",
    "WORKER_LEDGER_HEARTBEAT_S": "1",
    "WORKER_LEDGER_STALE_AFTER_S": "30",
    "WORKER_DEMO_LATENCY_S": "0.02",
}
_MONITOR = "test-monitor"
"""The application_name of this test's own connections, which the counts leave out."""
_EXPORTED = "SELECT count(*) FROM sessions WHERE status = 'succeeded' AND export_file IS NOT NULL"


@pytest.fixture
async def bouncer(pipeline: PipelineStack) -> AsyncIterator[PgBouncer]:
    """A PgBouncer (transaction pooling, ``_POOL_SIZE`` server connections) in front of the stack's
    PostgreSQL."""
    parts = urlsplit(pipeline.database_url)
    pgb = PgBouncer(
        upstream_host=parts.hostname or "127.0.0.1", upstream_port=parts.port or 5432, pool_size=_POOL_SIZE
    )
    try:
        pgb.start()
        yield pgb
    finally:
        pgb.close()


def _named(url: str, application_name: str) -> str:
    """``url`` with an application_name, so each process's connections can be told apart."""
    return f"{url}{'&' if '?' in url else '?'}application_name={application_name}"


@dataclass
class _Peaks:
    """Most connections seen at once while sampling."""

    server: int = 0
    """Backends of the test database (PgBouncer's server connections plus direct ones)."""
    server_by_app: Counter[str] = field(default_factory=Counter)
    clients_by_app: Counter[str] = field(default_factory=Counter)
    """Client connections PgBouncer holds, per application_name."""
    liveness_locks: int = 0
    paused: bool = False
    """Set around a PgBouncer restart or KILL: the old server connections' backends take a moment to
    exit while the new pool connects, which is not what a process holds."""

    def merge(self, server: int, by_app: Counter[str], clients: Counter[str], locks: int) -> None:
        if self.paused:
            return
        self.server = max(self.server, server)
        self.liveness_locks = max(self.liveness_locks, locks)
        for app, n in by_app.items():
            self.server_by_app[app] = max(self.server_by_app[app], n)
        for app, n in clients.items():
            self.clients_by_app[app] = max(self.clients_by_app[app], n)


def _show_clients(port: int) -> Counter[str]:
    """``SHOW CLIENTS`` by application_name (psql: the console speaks only the simple query protocol)."""
    try:
        argv = ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-XA", "-F", "\t"]
        out = subprocess.run(
            [*argv, "-P", "footer=off", "-c", "SHOW CLIENTS", "pgbouncer"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return Counter()  # PgBouncer is restarting
    header, *rows = out.splitlines() or [""]
    names = header.split("\t")
    if "application_name" not in names:
        return Counter()
    app, db = names.index("application_name"), names.index("database")
    return Counter(
        cols[app] for row in rows if len(cols := row.split("\t")) == len(names) and cols[db] != "pgbouncer"
    )


async def _sample(url: str, db: str, port: int, peaks: _Peaks, stop: asyncio.Event) -> None:
    admin = await asyncpg.connect(_named(url, _MONITOR))
    try:
        await _sample_until(admin, db, port, peaks, stop)
    finally:
        await admin.close()


async def _sample_until(
    admin: asyncpg.Connection, db: str, port: int, peaks: _Peaks, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        rows = await admin.fetch(
            "SELECT application_name, count(*) AS n FROM pg_stat_activity"
            " WHERE datname = $1 AND application_name <> $2 GROUP BY 1",
            db,
            _MONITOR,
        )
        locks = await admin.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            " WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = 'ingestor-liveness'"
        )
        clients = await asyncio.to_thread(_show_clients, port)
        by_app = Counter({r["application_name"]: int(r["n"]) for r in rows})
        peaks.merge(sum(by_app.values()), by_app, clients, int(locks))
        await asyncio.sleep(0.3)


async def _until(conn: asyncpg.Connection, query: str, want: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while int(await conn.fetchval(query)) < want:
        assert time.monotonic() < deadline, f"timed out waiting for {want}: {query}"
        await asyncio.sleep(0.25)


async def test_pipeline_through_pgbouncer_transaction_pooling(
    pipeline: PipelineStack, bouncer: PgBouncer, record_property: Callable[[str, object], None]
) -> None:
    """Workers' ledgers and the ingestor through PgBouncer (transaction mode), restarted and KILLed
    mid-run: every task succeeded exactly once, every session stored and in exactly one JSONL line, no
    prepared-statement error, and PostgreSQL saw at most the pool's connections plus the liveness one."""
    direct = pipeline.database_url
    pooled = bouncer.url(direct)
    db = urlsplit(direct).path.lstrip("/")
    ids = await pipeline.submit(
        TaskMessage(task_id=f"pgb-{i}", task=f"pooled task {i}") for i in range(_TASKS)
    )
    pipeline.start_ingestor(
        DATABASE_URL=_named(pooled, "ingestor"),
        INGESTOR_DB_POOLER="transaction",
        INGESTOR_LIVENESS_DATABASE_URL=_named(direct, "ingestor-liveness"),
    )
    for n in range(1, _WORKERS + 1):
        pipeline.start_worker(f"w{n}", "--concurrency", "24", DATABASE_URL=_named(pooled, f"w{n}"), **_FAST)

    admin = await asyncpg.connect(_named(direct, _MONITOR))
    peaks, stop_sampling = _Peaks(), asyncio.Event()
    sampler = asyncio.create_task(_sample(direct, db, bouncer.port, peaks, stop_sampling))
    try:
        await _until(admin, _EXPORTED, 150, 120)
        peaks.paused = True
        bouncer.stop()  # every client connection dropped, mid-transaction for some
        await asyncio.sleep(3)
        bouncer.start()
        await asyncio.sleep(2)
        peaks.paused = False
        await _until(admin, _EXPORTED, 600, 120)
        peaks.paused = True
        await bouncer.admin(f'KILL "{db}"')  # server and client connections of the database, at once
        await bouncer.admin(f'RESUME "{db}"')
        await asyncio.sleep(2)
        peaks.paused = False
        await _until(admin, _EXPORTED, _TASKS, 240)
    finally:
        stop_sampling.set()
        await sampler
    pipeline.stop_all(signal.SIGTERM, timeout_s=60)
    logs = {n: pipeline.log_of(n) for n in ["ingestor", *(f"w{i}" for i in range(1, _WORKERS + 1))]}
    assert [p.returncode for p in pipeline.procs] == [0] * (_WORKERS + 1), {
        k: v[-2000:] for k, v in logs.items()
    }
    for name, log in logs.items():
        assert "prepared statement" not in log, (name, log[-3000:])
    # The restart and the KILL reached the services (they are what this test is about).
    assert all("ledger.unreachable_retrying" in logs[f"w{i}"] for i in range(1, _WORKERS + 1))
    assert "postgres.unavailable" in logs["ingestor"]

    states = dict(await admin.fetch("SELECT state, count(*) FROM task_ledger GROUP BY state"))
    assert states == {"succeeded": _TASKS}
    await _check_tables_and_jsonl(pipeline, admin, ids)
    await admin.close()

    # A measurement for the README's sizing advice: shown with ``pytest -s``, and kept in the junit report.
    record_property(
        "connections", {"server": dict(peaks.server_by_app), "clients": dict(peaks.clients_by_app)}
    )
    sys.stderr.write(
        f"\npostgres backends (peak {peaks.server}) by application: {dict(peaks.server_by_app)}\n"
        f"pgbouncer clients (peak) by application: {dict(peaks.clients_by_app)}\n"
    )
    # PostgreSQL only ever saw PgBouncer's pool and the ingestor's direct liveness connection.
    assert peaks.server <= _POOL_SIZE + 1, peaks
    assert peaks.server_by_app["ingestor-liveness"] == 1
    assert peaks.liveness_locks >= 1, "the owner lock is held on the direct liveness connection"
