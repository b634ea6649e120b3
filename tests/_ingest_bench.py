"""Ingestor throughput on a pre-filled queue: ``python -m tests._ingest_bench [sessions] [envelope_max]``.

Needs AMQP_URL and DATABASE_URL (a server where it may create a database). Publishes the telemetry of
``sessions`` sessions (about 6 messages each), then runs one ingestor with default batching and reports
messages per second into Postgres and the rolling JSONL, from start to fully drained.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

from atlas_common import configure_logging
from ingestor import IngestorSettings
from tests._ingest_env import delete_topology, exported_counts, running, wait_drained
from tests._ingest_gen import bodies, generate, publish


async def _bench(n_sessions: int, envelope_max: int) -> None:
    configure_logging(level="WARNING", log_format="console")
    admin = os.environ["DATABASE_URL"]
    amqp_url = os.environ["AMQP_URL"]
    name = f"atlas_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    database_url = f"{admin.rpartition('/')[0]}/{name}"
    from migrations import apply_migrations

    await apply_migrations(database_url)
    gen = generate(n_sessions, seed=99)
    items = bodies(gen.in_order(), envelope_max=envelope_max)
    records = len(gen.in_order())
    with tempfile.TemporaryDirectory() as tmp:
        settings = IngestorSettings(
            amqp_url=amqp_url,
            database_url=database_url,
            prefix=f"bench{uuid.uuid4().hex[:8]}",
            jsonl_dir=Path(tmp),
            log_level="WARNING",
        )
        try:
            started = time.monotonic()
            await publish(amqp_url, settings.topology(), items)
            published = time.monotonic() - started
            started = time.monotonic()
            async with running(settings) as ingestor:
                await wait_drained(settings, gen, within=600)
                elapsed = time.monotonic() - started
            exported = sum(exported_counts(settings.jsonl_dir).values())
        finally:
            await delete_topology(amqp_url, settings.topology())
            conn = await asyncpg.connect(admin)
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.close()
    sys.stdout.write(
        f"{records} records in {len(items)} AMQP messages (envelopes of <= {envelope_max}; {n_sessions} "
        f"sessions, {exported} exported) published in {published:.1f}s; ingested in {elapsed:.1f}s = "
        f"{records / elapsed:.0f} records/s, {len(items) / elapsed:.0f} AMQP messages/s "
        f"({ingestor.stats['batches']} batches)\n"
    )


if __name__ == "__main__":
    asyncio.run(
        _bench(int(sys.argv[1]) if len(sys.argv) > 1 else 3300, int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    )
