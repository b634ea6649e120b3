"""The private PostgreSQL of ``tests/_pgserver.py`` starts, stops, crashes and comes back with its data,
and never touches the shared server (``$DATABASE_URL``, else 127.0.0.1:5432) that other tests use."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import pytest

from tests._pgserver import PgServer

pytestmark = pytest.mark.integration

SHARED_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

# What a client sees when the server it was talking to shuts down under it.
DROPPED = (
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    ConnectionError,
)


@dataclass
class SharedServer:
    """One connection to the shared server, opened before these tests and checked after each."""

    conn: Any
    backend_pid: int
    started_at: datetime
    port: int

    async def assert_untouched(self) -> None:
        assert not self.conn.is_closed(), "the connection to the shared server was dropped"
        assert await self.conn.fetchval("SELECT pg_backend_pid()") == self.backend_pid
        assert await self.conn.fetchval("SELECT pg_postmaster_start_time()") == self.started_at


@pytest.fixture
def pg(pg_server: PgServer) -> Iterator[PgServer]:
    """The session's private server, running before each test and again after it, however it ended."""
    pg_server.start()
    yield pg_server
    pg_server.start()


@pytest.fixture(scope="module")
async def shared_server() -> AsyncIterator[SharedServer | None]:
    try:
        conn = await asyncpg.connect(SHARED_URL, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        yield None  # no shared server here: nothing to protect
        return
    try:
        yield SharedServer(
            conn,
            await conn.fetchval("SELECT pg_backend_pid()"),
            await conn.fetchval("SELECT pg_postmaster_start_time()"),
            int(await conn.fetchval("SELECT setting FROM pg_settings WHERE name = 'port'")),
        )
    finally:
        await conn.close()


@pytest.fixture(autouse=True)
async def _shared_server_untouched(shared_server: SharedServer | None) -> AsyncIterator[None]:
    yield
    if shared_server is not None:
        await shared_server.assert_untouched()


async def fetchval(url: str, query: str) -> Any:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def test_a_connection_reaches_the_private_server(pg: PgServer) -> None:
    assert pg.is_running()
    conn = await asyncpg.connect(pg.url(), timeout=10)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SHOW port") == str(pg.port)
        assert await conn.fetchval("SHOW data_directory") == str(pg.data_dir)
        assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
        assert await conn.fetchval("SHOW max_connections") == "200"
        assert await conn.fetchval("SHOW fsync") == "off"
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
    finally:
        await conn.close()
    # The unix socket lives in the server's own directory.
    via_socket = await asyncpg.connect(host=str(pg.socket_dir), port=pg.port, user="postgres", timeout=10)
    await via_socket.close()
    # create_database works from sync code (even with this event loop running) and returns its URL.
    url = pg.create_database("atlas pgserver test")
    assert url == pg.url("atlas pgserver test")
    assert await fetchval(url, "SELECT current_database()") == "atlas pgserver test"


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_stop_refuses_connections_and_start_brings_the_data_back(pg: PgServer, mode: str) -> None:
    url = await pg.acreate_database()
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute("CREATE TABLE t (x int)")
        await conn.execute("INSERT INTO t SELECT generate_series(1, 100)")
    finally:
        await conn.close()

    pg.stop(mode)  # type: ignore[arg-type]
    assert not pg.is_running()
    with pytest.raises(ConnectionRefusedError):
        await asyncpg.connect(url, timeout=10)

    pg.start()
    assert pg.is_running()
    assert await fetchval(url, "SELECT count(*) FROM t") == 100


async def test_restart_drops_open_connections(pg: PgServer) -> None:
    conn = await asyncpg.connect(pg.url(), timeout=10)
    try:
        started_at = await conn.fetchval("SELECT pg_postmaster_start_time()")
        pg.restart(mode="fast")
        assert pg.is_running()
        with pytest.raises(DROPPED):
            await conn.fetchval("SELECT 1")
        assert conn.is_closed()
    finally:
        await conn.close()
    assert await fetchval(pg.url(), "SELECT pg_postmaster_start_time()") > started_at


async def test_stop_for_is_an_outage_of_that_long_without_blocking_the_loop(
    pg: PgServer,
) -> None:
    url = pg.url()
    gaps: list[float] = []

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    began = time.monotonic()
    outage = asyncio.create_task(pg.stop_for(2))
    try:
        async with asyncio.timeout(10):
            while pg.is_running():  # noqa: ASYNC110 - waiting for the server process to exit
                await asyncio.sleep(0.01)
        with pytest.raises(ConnectionRefusedError):
            await asyncpg.connect(url, timeout=10)
        await asyncio.sleep(1)
        with pytest.raises(ConnectionRefusedError):
            await asyncpg.connect(url, timeout=10)
        await asyncio.wait_for(outage, timeout=30)
    finally:
        ticker.cancel()
        if not outage.done():
            outage.cancel()
    assert time.monotonic() - began >= 2
    assert pg.is_running()
    assert await fetchval(url, "SELECT 1") == 1
    assert max(gaps) < 0.5, f"the event loop was blocked for {max(gaps):.2f} s"


def test_an_unknown_stop_mode_is_refused(pg: PgServer) -> None:
    with pytest.raises(ValueError, match="stop mode"):
        pg.stop("graceful")  # type: ignore[arg-type]
    assert pg.is_running()


async def test_context_manager_removes_its_server() -> None:
    with PgServer() as pg:
        root, url = pg.root, pg.url()
        assert pg.is_running()
        assert await fetchval(url, "SELECT 1") == 1
    assert not pg.is_running()
    assert not root.exists()
    with pytest.raises(ConnectionRefusedError):
        await asyncpg.connect(url, timeout=10)


async def test_the_shared_server_is_untouched(pg: PgServer, shared_server: SharedServer | None) -> None:
    if shared_server is None:
        pytest.skip(f"no shared PostgreSQL at {SHARED_URL}")
    assert pg.port != shared_server.port
    pg.restart(mode="immediate")
    await shared_server.assert_untouched()
    assert await fetchval(SHARED_URL, "SELECT 1") == 1
