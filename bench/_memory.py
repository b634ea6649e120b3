"""Peak memory: the RSS high-water mark (``VmHWM`` in ``/proc/<pid>/status``) of one process under load.

- worker: ``python -m worker --concurrency C --demo-latency-s 0.05`` on a queue pre-filled with more demo
  tasks than it can finish in the window (checked: the queue is not empty at the end), so C tasks are in
  flight the whole time; no ingestor (the telemetry waits in its queue).
- ingestor: ``python -m ingestor run`` (defaults) on a backlog of N records pre-filled as envelopes
  (:mod:`bench._sessions`). It need not drain the backlog: the point is that memory is bounded by the
  prefetch window, not by the backlog.

Each process is sampled (``VmRSS``) every 0.25 s for the window, timed from its first consumption; then
``VmHWM`` is read and the process stopped with SIGTERM.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import time
import uuid
from pathlib import Path
from typing import Final

import asyncpg

from atlas_common import Topology
from bench._harness import (
    Processes,
    QueueProbe,
    proc_status_kib,
    python_module,
    scratch_database,
    unique,
    wait_consumption,
)
from bench._ingest import prefetch_seen
from bench._report import Result
from bench._sessions import RECORDS_PER_SESSION, publish_envelopes, sessions_for
from bench._stack import delete_topology
from migrations import apply_migrations
from producer import Producer, demo_tasks

SAMPLE_S: Final = 0.25
CALLS_PER_TASK: Final = 5
"""The demo adapter's plan has 2-4 steps: plan + executes + synthesis is 4-6 calls, 5 on average."""


def worker_rss_name(concurrency: int, latency_s: float) -> str:
    return f"peak RSS: atlas worker, concurrency {concurrency}, demo {latency_s * 1000:g} ms"


def ingestor_rss_name(records: int) -> str:
    return f"peak RSS: atlas ingestor, {records:,}-record backlog"


async def _sample(procs: Processes, pid: int, seconds: float) -> list[int]:
    """``VmRSS`` (KiB) every ``SAMPLE_S`` for ``seconds``."""
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        procs.check_running()
        samples.append(proc_status_kib(pid)["VmRSS"])
        await asyncio.sleep(SAMPLE_S)
    return samples


def _mib(kib: int) -> float:
    return kib / 1024


async def worker_peak_rss(
    amqp_url: str,
    admin_database_url: str,
    logdir: Path,
    *,
    concurrency: int,
    latency_s: float,
    seconds: float,
) -> Result:
    """One worker, ``concurrency`` tasks in flight for ``seconds``; its peak RSS in MiB."""
    per_task_s = CALLS_PER_TASK * latency_s
    tasks = math.ceil(2 * concurrency * seconds / per_task_s) if per_task_s else 50 * concurrency
    prefix = unique("atlas-bench-rss-worker")
    topology = Topology(prefix=prefix)
    procs = Processes(logdir / prefix)
    async with scratch_database(admin_database_url) as database_url:
        await apply_migrations(database_url)
        try:
            async with Producer(amqp_url, topology) as producer:
                await producer.submit_many(demo_tasks(tasks, run_id=uuid.uuid4().hex[:8]))
            async with QueueProbe(amqp_url) as probe:
                await probe.wait_depth(topology.tasks_queue, tasks)
                argv = python_module(
                    "worker", "--concurrency", str(concurrency), "--demo-latency-s", str(latency_s)
                )
                proc = procs.spawn("worker", argv, {"DATABASE_URL": database_url, **_env(amqp_url, prefix)})
                await wait_consumption(probe, topology.tasks_queue, tasks, procs)
                samples = await _sample(procs, proc.pid, seconds)
                peak = proc_status_kib(proc.pid)["VmHWM"]
                left = await probe.depth(topology.tasks_queue)
            await asyncio.to_thread(procs.stop)
            done = await _succeeded(database_url)
        finally:
            await asyncio.to_thread(procs.stop)
            await delete_topology(amqp_url, topology)
    if left == 0:
        raise RuntimeError(f"worker RSS: the {tasks:,} tasks ran out within {seconds}s; queue more")
    return Result(
        worker_rss_name(concurrency, latency_s),
        "MiB",
        _mib(peak),
        notes=(
            f"VmHWM of python -m worker --concurrency {concurrency} --demo-latency-s {latency_s:g} after "
            f"{seconds:g}s with {concurrency} tasks in flight throughout ({tasks:,} queued, {done:,} done, "
            f"{left:,} still queued at the end); VmRSS {_mib(samples[0]):.0f} MiB at first consumption, "
            f"max sampled {_mib(max(samples)):.0f} MiB"
        ),
    )


async def ingestor_peak_rss(
    amqp_url: str, admin_database_url: str, logdir: Path, *, records: int, seconds: float
) -> Result:
    """One ingestor consuming a backlog of ``records`` records for ``seconds``; its peak RSS in MiB."""
    prefix = unique("atlas-bench-rss-ingestor")
    topology = Topology(prefix=prefix)
    procs = Processes(logdir / prefix)
    async with scratch_database(admin_database_url) as database_url:
        await apply_migrations(database_url)
        try:
            with tempfile.TemporaryDirectory(prefix="atlas-bench-jsonl-") as jsonl_dir:
                published = await publish_envelopes(
                    amqp_url, topology, sessions_for(records), uuid.uuid4().hex[:8]
                )
                messages = published.messages
                async with QueueProbe(amqp_url) as probe:
                    await probe.wait_depth(topology.ingestor_queue, messages, timeout_s=300)
                    env = {
                        "DATABASE_URL": database_url,
                        "INGESTOR_JSONL_DIR": jsonl_dir,
                        **_env(amqp_url, prefix),
                    }
                    proc = procs.spawn("ingestor", python_module("ingestor", "run"), env)
                    await wait_consumption(probe, topology.ingestor_queue, messages, procs)
                    samples = await _sample(procs, proc.pid, seconds)
                    peak = proc_status_kib(proc.pid)["VmHWM"]
                    stored = await _stored(database_url)
                    await asyncio.to_thread(procs.stop)
        finally:
            await asyncio.to_thread(procs.stop)
            await delete_topology(amqp_url, topology)
    per_message = published.records_per_message
    prefetch = prefetch_seen(procs.logdir / "ingestor.log")
    return Result(
        ingestor_rss_name(records),
        "MiB",
        _mib(peak),
        notes=(
            f"VmHWM of python -m ingestor run (defaults) after {seconds:g}s on a backlog of "
            f"{published.records:,} records in {messages:,} envelopes (~{per_message:.0f} records, "
            f"{published.kib_per_message:.0f} KiB each; published in {published.seconds:.0f}s); prefetch "
            f"{prefetch} (from its log); {stored * RECORDS_PER_SESSION:,} "
            f"records ({stored:,} sessions) stored in the window; VmRSS {_mib(samples[0]):.0f} MiB at "
            f"first consumption, max sampled {_mib(max(samples)):.0f} MiB, last {_mib(samples[-1]):.0f} MiB"
        ),
    )


def _env(amqp_url: str, prefix: str) -> dict[str, str]:
    return {"AMQP_URL": amqp_url, "ATLAS_PREFIX": prefix, "LOG_FORMAT": "json"}


async def _count(database_url: str, query: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(query))
    finally:
        await conn.close()


async def _succeeded(database_url: str) -> int:
    return await _count(database_url, "SELECT count(*) FROM task_ledger WHERE state = 'succeeded'")


async def _stored(database_url: str) -> int:
    return await _count(database_url, "SELECT count(*) FROM sessions WHERE export_file IS NOT NULL")
