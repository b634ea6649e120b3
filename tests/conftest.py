"""Service fixtures shared by every test.

Service URLs come from ``AMQP_URL`` / ``DATABASE_URL`` when set (this machine and CI run real services on
loopback); otherwise a testcontainers RabbitMQ / PostgreSQL is started for the whole test session. Each
test session works in a database of its own (created here, dropped at the end), and tests that need an
empty database ask ``make_database`` for one, so tests run in any order.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from atlas_common import Topology
from bench._stack import delete_topology
from tests._pgfixtures import pg_server  # noqa: F401
from tests._pipeline import PipelineStack


def _dsn_with_database(dsn: str, database: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{database}"


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A RabbitMQ URL: $AMQP_URL, else a testcontainers broker for this session."""
    url = os.environ.get("AMQP_URL")
    if url:
        yield url
        return
    from testcontainers.rabbitmq import RabbitMqContainer

    with RabbitMqContainer("rabbitmq:3.13-management") as container:
        params = container.get_connection_params()
        yield f"amqp://guest:guest@{params.host}:{params.port}/"


@pytest.fixture(scope="session")
def admin_database_url() -> Iterator[str]:
    """A PostgreSQL URL with rights to create databases: $DATABASE_URL, else a testcontainers server."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:16-alpine", driver=None) as container:
        yield container.get_connection_url()


MakeDatabase = Callable[[], Awaitable[str]]


@pytest.fixture(scope="session")
async def make_database(admin_database_url: str) -> AsyncIterator[MakeDatabase]:
    """Create empty databases on demand; every one is dropped when the test session ends."""
    created: list[str] = []

    async def make() -> str:
        name = f"atlas_test_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(admin_database_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        created.append(name)
        return _dsn_with_database(admin_database_url, name)

    yield make
    conn = await asyncpg.connect(admin_database_url)
    try:
        for name in created:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def database_url(make_database: MakeDatabase) -> str:
    """The test session's own database (empty, no migrations applied)."""
    return await make_database()


@pytest.fixture
async def migrated_database(make_database: MakeDatabase) -> str:
    """A fresh database with every migration applied."""
    from migrations import apply_migrations

    url = await make_database()
    await apply_migrations(url)
    return url


@pytest.fixture
async def cleanup(amqp_url: str) -> AsyncIterator[list[Topology]]:
    """Topologies a test used: every queue and exchange of each is deleted afterwards."""
    topologies: list[Topology] = []
    yield topologies
    for topology in topologies:
        await delete_topology(amqp_url, topology)


@pytest.fixture
async def pipeline(amqp_url: str, migrated_database: str, tmp_path: Path) -> AsyncIterator[PipelineStack]:
    """A pipeline of its own: unique topology prefix, fresh migrated database; processes and queues
    are removed afterwards."""
    stack = PipelineStack(
        amqp_url=amqp_url,
        database_url=migrated_database,
        prefix=f"t{uuid.uuid4().hex[:10]}",
        workdir=tmp_path,
    )
    try:
        yield stack
    finally:
        stack.stop_all(signal.SIGTERM, timeout_s=15)  # SIGTERM first (coverage is written), SIGKILL after
        await stack.delete_topology()
