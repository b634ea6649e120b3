"""SIGKILL the ingestor process at random moments and restart it: still exactly once everywhere."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from feed import FeedSettings, follow_sessions
from ingestor import IngestorSettings
from tests._ingest_env import (
    check_against_generated,
    db_counts,
    delete_topology,
    exported_counts,
    fresh_settings,
    open_files,
    ready_count,
    reference_snapshot,
    snapshot,
    wait_drained,
    wait_for,
)
from tests._ingest_gen import bodies, generate, publish

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _start(settings: IngestorSettings, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "AMQP_URL": settings.amqp_url,
        "DATABASE_URL": settings.database_url,
        "ATLAS_PREFIX": settings.prefix,
        "INGESTOR_JSONL_DIR": str(settings.jsonl_dir),
        "INGESTOR_BATCH_MAX_MESSAGES": "100",
        "INGESTOR_FLUSH_INTERVAL_S": "0.05",
        "INGESTOR_JSONL_MAX_BYTES": "100000",
        "INGESTOR_JSONL_MAX_AGE_S": "0.5",
        "INGESTOR_RECOVERY_INTERVAL_S": "0.5",
        "INGESTOR_SWEEP_INTERVAL_S": "1",
        "LOG_LEVEL": "WARNING",
        "LOG_FORMAT": "json",
    }
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "ingestor"], env=env, stdout=out, stderr=out)


@pytest.mark.timeout(240)
async def test_sigkill_and_restart(make_database, amqp_url: str, tmp_path: Path) -> None:
    """Six random SIGKILLs + restarts over 1,100 sessions: exact tables, each session once, no leftovers."""
    rng = random.Random(21)
    gen = generate(1100, seed=21)
    settings = await fresh_settings(make_database, amqp_url, tmp_path / "jsonl")
    items = bodies(gen.in_order(), rng=rng, duplicate_share=0.3)
    chunks = [items[i::6] for i in range(6)]
    log = tmp_path / "ingestor.log"
    try:
        for chunk in chunks:
            proc = _start(settings, log)
            await publish(amqp_url, settings.topology(), chunk)
            before = await db_counts(settings.database_url)

            async def progressed(before: tuple[int, int, int] = before) -> bool:
                return await db_counts(settings.database_url) != before

            await wait_for(progressed, within=30, what="the ingestor to write something")
            await asyncio.sleep(rng.uniform(0.0, 0.6))
            proc.send_signal(signal.SIGKILL)
            assert await asyncio.to_thread(proc.wait, 10) == -signal.SIGKILL
        proc = _start(settings, log)

        async def consuming() -> bool:
            return await ready_count(amqp_url, settings.topology(), consumers=True) == 1

        await wait_for(consuming, within=30, what="the last ingestor to consume")
        await wait_drained(settings, gen, within=90)
        await wait_for(lambda: _no_open_files(settings), within=30, what="dead owners' files recovered")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0, log.read_text()[-3000:]
        streamed = await _stream_ids(settings)
    finally:
        if proc.poll() is None:
            proc.kill()
        await delete_topology(amqp_url, settings.topology())
    got = await snapshot(settings.database_url)
    assert got == await reference_snapshot(make_database, gen)
    check_against_generated(got, gen)
    counts = exported_counts(settings.jsonl_dir)
    assert set(counts) == gen.exported()
    assert set(counts.values()) == {1}
    assert await open_files(settings.database_url) == []
    assert [p.name for p in settings.jsonl_dir.iterdir() if p.name.startswith(".")] == []
    # The sessions stream holds every exported session (a crash may publish one again: at-least-once);
    # the feed API hands each out once.
    assert set(streamed) == gen.exported()
    assert set(Counter(streamed).values()) == {1}


async def _stream_ids(settings: IngestorSettings) -> list[str]:
    feed = FeedSettings(amqp_url=settings.amqp_url, prefix=settings.prefix, cursor_dir=settings.jsonl_dir)
    ids: list[str] = []
    async with follow_sessions(feed, start="first") as sessions:
        iterator = aiter(sessions)
        with contextlib.suppress(TimeoutError):
            while True:
                ids.append((await asyncio.wait_for(anext(iterator), 3.0)).adapter_session_id)
    return ids


async def _no_open_files(settings: IngestorSettings) -> bool:
    """Only the live process's own current file may still be open."""
    return len(await open_files(settings.database_url)) <= 1
