"""Finding RabbitMQ and PostgreSQL for the main job: the given URLs, else compose, else say what to do."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import aio_pika
import asyncpg

from atlas_common import BROKER_ERRORS, redact_url

ROOT = Path(__file__).resolve().parent.parent


async def broker_answers(url: str) -> str | None:
    """None when RabbitMQ accepts a login at ``url``; else why not."""
    try:
        connection = await aio_pika.connect(url, timeout=5)
    except BROKER_ERRORS as exc:
        return f"RabbitMQ at {redact_url(url)} does not answer ({type(exc).__name__}: {exc})"
    await connection.close()
    return None


async def database_answers(url: str) -> str | None:
    """None when PostgreSQL accepts a connection at ``url``; else why not."""
    try:
        conn = await asyncpg.connect(url, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"PostgreSQL at {redact_url(url)} does not answer ({type(exc).__name__}: {exc})"
    await conn.close()
    return None


def docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "info"], capture_output=True, check=False, timeout=20)
    return probe.returncode == 0


def start_compose_services() -> None:
    subprocess.run(
        ["docker", "compose", "up", "-d", "--wait", "rabbitmq", "postgres"],
        cwd=ROOT,
        check=True,
    )


async def ensure_services(amqp_url: str, database_url: str) -> list[str]:
    """Problems that remain after trying; empty when both services answer."""
    problems = [
        p for p in await asyncio.gather(broker_answers(amqp_url), database_answers(database_url)) if p
    ]
    if not problems:
        return []
    if docker_compose_available():
        print("services not reachable; starting rabbitmq and postgres from compose.yaml ...", flush=True)
        await asyncio.to_thread(start_compose_services)
        problems = [
            p for p in await asyncio.gather(broker_answers(amqp_url), database_answers(database_url)) if p
        ]
    return problems


HOW_TO_GET_SERVICES = """\
The main job needs RabbitMQ and PostgreSQL. Either:
  - point AMQP_URL and DATABASE_URL at running servers (e.g. amqp://guest:guest@127.0.0.1:5672/ and
    postgresql://postgres@127.0.0.1:5432/postgres), or
  - install Docker and re-run: the job then starts both from compose.yaml
    (docker compose up -d rabbitmq postgres), or
  - on Debian/Ubuntu: apt-get install rabbitmq-server postgresql, then rabbitmq-server -detached and
    pg_ctlcluster <version> main start."""
