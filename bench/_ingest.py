"""The ingestor alone: telemetry records per second into PostgreSQL and the rolling JSONL.

The ingestor queue of a fresh prefix is pre-filled (not timed) with the envelopes of N sessions
(:mod:`bench._sessions`), then ``python -m ingestor run`` starts with its default settings (batches of
``batch_max_messages`` records; the prefetch it chose is read from its log) on a fresh migrated database,
``INGESTOR_JSONL_DIR`` in a temp dir. t0 is the first poll (every 20 ms) where the queue holds fewer
messages than published: consumption started, so start-up is not timed; t1 is ``max(sessions.stored_at)``
once the queue is empty and every session is stored (``export_file`` set: complete in PostgreSQL and
assigned to a JSONL file). Then SIGTERM, and the finalised JSONL files must hold one line per session.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Final

import asyncpg
import orjson

from atlas_common import Topology
from bench._ceilings import copy_name
from bench._harness import Processes, QueueProbe, python_module, scratch_database, unique, wait_consumption
from bench._report import Result
from bench._sessions import RECORDS_PER_SESSION, publish_envelopes, sessions_for
from bench._stack import delete_topology, jsonl_stats
from ingestor import IngestorSettings
from migrations import apply_migrations


def prefetch_seen(log: Path) -> str:
    """The prefetch counts an ingestor logged (``broker.connected``, then each ``broker.prefetch_adapted``:
    it sizes its prefetch to the messages it sees), e.g. ``"64 msgs"`` or ``"64 -> 32 msgs"``."""
    counts = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("prefetch"), int):
            counts.append(entry["prefetch"])
    return " -> ".join(f"{n:,}" for n in counts) + " msgs" if counts else "not logged"


RECORDS_NAME: Final = "atlas ingestor alone, pre-filled queue: records"
SESSIONS_NAME: Final = "atlas ingestor alone, pre-filled queue: sessions"
_STORED: Final = "SELECT count(*) FROM sessions WHERE export_file IS NOT NULL"
TARGET_RECORDS_S: Final = 30_000
TARGET_COPY_SHARE: Final = 0.2
"""The issue's target: at least 30,000 records/s, at least 0.2x the ``COPY`` ceiling of the same run."""


async def ingestor_alone(
    amqp_url: str, admin_database_url: str, records: int, logdir: Path, *, timeout_s: float = 600.0
) -> list[Result]:
    """``records`` (rounded up to whole sessions) through one ingestor process; records/s and sessions/s."""
    n_sessions = sessions_for(records)
    prefix = unique("atlas-bench-ingest")
    topology = Topology(prefix=prefix)
    procs = Processes(logdir / prefix)
    async with scratch_database(admin_database_url) as database_url:
        await apply_migrations(database_url)
        conn = await asyncpg.connect(database_url)
        try:
            with tempfile.TemporaryDirectory(prefix="atlas-bench-jsonl-") as jsonl_dir:
                published = await publish_envelopes(amqp_url, topology, n_sessions, uuid.uuid4().hex[:8])
                messages, total = published.messages, published.records
                async with QueueProbe(amqp_url) as probe:
                    queue = topology.ingestor_queue
                    await probe.wait_depth(queue, messages)
                    env = {
                        "AMQP_URL": amqp_url,
                        "DATABASE_URL": database_url,
                        "ATLAS_PREFIX": prefix,
                        "INGESTOR_JSONL_DIR": jsonl_dir,
                        "LOG_FORMAT": "json",
                    }
                    procs.spawn("ingestor", python_module("ingestor", "run"), env)
                    t0 = await wait_consumption(probe, queue, messages, procs)
                    deadline = time.monotonic() + timeout_s
                    # The queue first: its depth costs the broker nothing, where counting the stored
                    # sessions every 50 ms took a tenth of a core from PostgreSQL (and so from the
                    # ingestor, on two cores). The queue is empty seconds before the end (the ingestor
                    # holds its prefetch, ~14,000 records), so the count is taken only every 0.5 s (it
                    # cost 8 ms of PostgreSQL a time at the end of 100,000 records); t1 is max(stored_at),
                    # so the polls do not blur it.
                    while True:
                        queued = await probe.depth(queue)
                        if not queued and await conn.fetchval(_STORED) >= n_sessions:
                            break
                        procs.check_running()
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"ingestor: not every session stored in {timeout_s}s")
                        await asyncio.sleep(0.05 if queued else 0.5)
                    t1 = (await conn.fetchval("SELECT max(stored_at) FROM sessions")).timestamp()
                    await asyncio.to_thread(procs.stop)
                    left = await probe.depth(queue)
                files, lines = jsonl_stats(Path(jsonl_dir))
                prefetch = prefetch_seen(procs.logdir / "ingestor.log")
        finally:
            await asyncio.to_thread(procs.stop)
            await conn.close()
            await delete_topology(amqp_url, topology)
    if lines != n_sessions or left:
        raise RuntimeError(
            f"ingestor: {lines} JSONL lines for {n_sessions} sessions, {left} messages left; logs in {logdir}"
        )
    seconds = t1 - t0
    notes = (
        f"python -m ingestor run (defaults: batches of {IngestorSettings().batch_max_messages:,} records; "
        f"prefetch {prefetch} from its log); "
        f"{total:,} records = {n_sessions:,} demo-shaped sessions x {RECORDS_PER_SESSION} (~1 KB each), "
        f"pre-filled as {messages:,} TelemetryBatch messages (one kind each, <= 500 records / 256 KiB; "
        f"~{published.records_per_message:.0f} records, {published.kib_per_message:.0f} KiB on average); "
        f"first consumption to queue empty + every session stored (export_file set) = {seconds:.1f}s; "
        f"{lines:,} lines in {files} JSONL file(s)"
    )
    return [
        Result(
            RECORDS_NAME,
            "records/s",
            total / seconds,
            baseline=copy_name(logged=True),
            at_least=TARGET_RECORDS_S,
            at_least_ratio=TARGET_COPY_SHARE,
            notes=notes,
        ),
        Result(
            SESSIONS_NAME, "sessions/s", n_sessions / seconds, notes=f"the same run: {n_sessions:,} sessions"
        ),
    ]
