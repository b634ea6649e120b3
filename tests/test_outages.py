"""Outages are survived, always: PostgreSQL stopped and restarted under load, and the services' database
connections cut mid-commit, end with every task stored and exported exactly once and nothing stuck.

The database of the first test lives on a private PostgreSQL (tests/_pgserver.py) that the test stops and
restarts; the shared server is never touched. The second cuts connections with a TCP proxy."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from migrations import apply_migrations
from schemas import TaskMessage
from tests._pgserver import PgServer
from tests._pipeline import PipelineStack
from tests._proxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

_FAST = {
    "WORKER_LEDGER_HEARTBEAT_S": "1",
    "WORKER_LEDGER_STALE_AFTER_S": "30",
    "WORKER_DEMO_LATENCY_S": "0.02",
}


@pytest.fixture
async def private_stack(amqp_url: str, pg_server: PgServer, tmp_path: Path) -> AsyncIterator[PipelineStack]:
    """A pipeline whose database lives on the private PostgreSQL."""
    pg_server.start()
    url = await pg_server.acreate_database(f"outage_{uuid.uuid4().hex[:8]}")
    await apply_migrations(url)
    stack = PipelineStack(
        amqp_url=amqp_url, database_url=url, prefix=f"t{uuid.uuid4().hex[:10]}", workdir=tmp_path
    )
    try:
        yield stack
    finally:
        stack.stop_all(signal.SIGTERM, timeout_s=15)  # SIGTERM first (coverage is written), SIGKILL after
        await stack.delete_topology()
        pg_server.start()  # the server is shared by the test session: leave it running


async def _count(url: str, query: str) -> int:
    try:
        conn = await asyncpg.connect(url, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return -1
    try:
        return int(await conn.fetchval(query))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return -1
    finally:
        await conn.close()


_EXPORTED = (
    "SELECT count(*) FROM task_ledger l JOIN sessions s ON s.adapter_session_id = l.adapter_session_id"
    " WHERE l.state = 'succeeded' AND s.export_file IS NOT NULL"
)


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.5)


async def _exactly_once(stack: PipelineStack, ids: list[str], database_url: str) -> None:
    """Ledger all succeeded, nothing running; one succeeded session per task, each in exactly one
    finalised JSONL line (the audit reads the files); nothing unexplained."""
    report = await stack.audit()
    assert (report.checked, report.exported) == (len(ids), len(ids)), report.to_json()["findings"][:10]
    conn = await asyncpg.connect(database_url)
    try:
        states = dict(await conn.fetch("SELECT state, count(*) FROM task_ledger GROUP BY state"))
        succeeded = await conn.fetchval(
            "SELECT count(DISTINCT task_id) FROM sessions WHERE status = 'succeeded' AND task_id = ANY($1)",
            ids,
        )
        doubles = await conn.fetchval(
            "SELECT count(*) FROM (SELECT task_id FROM sessions WHERE status = 'succeeded'"
            " GROUP BY task_id HAVING count(*) > 1) AS d"
        )
    finally:
        await conn.close()
    assert states == {"succeeded": len(ids)}
    assert (succeeded, doubles) == (len(ids), 0)


async def test_postgres_stopped_and_restarted_under_load(
    private_stack: PipelineStack, pg_server: PgServer
) -> None:
    """Two workers and an ingestor under load; PostgreSQL stopped for 20 s, restarted fast twice, stopped
    for 20 s again: every task lands exactly once, and every process still stops cleanly on SIGTERM (none
    hangs on a ledger or store loop that died)."""
    stack = private_stack
    ids = await stack.submit(TaskMessage(task_id=f"pg-{i}", task=f"outage task {i}") for i in range(1500))
    stack.start_ingestor()
    stack.start_worker("w1", "--concurrency", "24", **_FAST)
    stack.start_worker("w2", "--concurrency", "24", **_FAST)
    url = stack.database_url
    await _until(lambda: _gt(url, _EXPORTED, 100), 120, "the first sessions")
    await pg_server.stop_for(20)
    await asyncio.sleep(3)
    await pg_server.arestart(mode="fast")
    await asyncio.sleep(3)
    await pg_server.arestart(mode="fast")
    await asyncio.sleep(3)
    await pg_server.stop_for(20)
    await _until(lambda: _gt(url, _EXPORTED, len(ids) - 1), 240, "every task exported")
    stack.stop_all(signal.SIGTERM, timeout_s=60)
    assert [p.returncode for p in stack.procs] == [0, 0, 0], [stack.log_of(n)[-3000:] for n in ("w1", "w2")]
    await _exactly_once(stack, ids, url)


async def _gt(url: str, query: str, value: int) -> bool:
    return await _count(url, query) > value


async def test_database_connections_cut_mid_commit(pipeline: PipelineStack) -> None:
    """The workers' and the ingestor's PostgreSQL connections cut by a proxy for 10 s, twice, mid-run: no
    task is lost as a "duplicate of a running task" (claim replies lost), none runs twice."""
    parts = urlsplit(pipeline.database_url)
    async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        proxied = proxy.proxied_url(pipeline.database_url)
        ids = await pipeline.submit(
            TaskMessage(task_id=f"cut-{i}", task=f"cut task {i}") for i in range(1200)
        )
        pipeline.start_ingestor(DATABASE_URL=proxied)
        pipeline.start_worker("w1", "--concurrency", "24", DATABASE_URL=proxied, **_FAST)
        pipeline.start_worker("w2", "--concurrency", "24", DATABASE_URL=proxied, **_FAST)
        url = pipeline.database_url
        await _until(lambda: _gt(url, _EXPORTED, 100), 120, "the first sessions")
        for _ in range(2):
            proxy.cut()
            await asyncio.sleep(10)
            proxy.restore()
            await asyncio.sleep(4)
        await _until(lambda: _gt(url, _EXPORTED, len(ids) - 1), 240, "every task exported")
        # In a thread: this event loop runs the proxy, and the services need it to shut down.
        await asyncio.to_thread(pipeline.stop_all, signal.SIGTERM, 60)
        assert [p.returncode for p in pipeline.procs] == [0, 0, 0]
    await _exactly_once(pipeline, ids, pipeline.database_url)
