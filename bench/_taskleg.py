"""Ours: the atlas worker's full task leg, measured exactly like the baselines (:mod:`bench._harness`).

Per task the worker runs the whole leg: decode, claim in the task ledger (PostgreSQL), one demo adapter
session (plan, one execute per step, synthesize; zero latency), telemetry batched, published and
confirmed, success recorded in the ledger, the close published and confirmed, then the ack. Each run gets
a fresh migrated database and a topology prefix of its own; no ingestor runs, so the telemetry stays in
``<prefix>.telemetry.ingestor`` and its depth at the end is the number of telemetry messages published.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Final, Literal

import asyncpg

from atlas_common import Topology
from bench._harness import Processes, QueueProbe, measure_drain, python_module, scratch_database, unique
from bench._report import Result
from bench._stack import delete_topology
from migrations import apply_migrations
from producer import Producer, demo_tasks

CONCURRENCY: Final = 64
BUSY_CONCURRENCY: Final = 256
"""Enough tasks in flight to keep one worker process busy on this kind of machine (measured: 128 and 256 both
~2,000 tasks/s where 64 gave ~1,800, the process then ~90 % busy instead of ~80 %)."""


def taskleg_name(
    workers: int, queue_type: Literal["quorum", "classic"] = "quorum", concurrency: int = CONCURRENCY
) -> str:
    plural = "worker" if workers == 1 else "workers"
    suffix = ", classic queue" if queue_type == "classic" else ""
    return f"atlas task leg, {workers} {plural} x {concurrency}{suffix}"


def telemetry_name(workers: int) -> str:
    plural = "worker" if workers == 1 else "workers"
    return f"atlas telemetry messages per task, {workers} {plural}"


async def atlas_task_leg(
    amqp_url: str,
    admin_database_url: str,
    n: int,
    logdir: Path,
    *,
    workers: int = 1,
    queue_type: Literal["quorum", "classic"] = "quorum",
    concurrency: int = CONCURRENCY,
    baseline: str | None = None,
    target_ratio: float | None = None,
    poll_s: float = 0.05,
) -> list[Result]:
    """``n`` demo tasks through ``workers`` x ``python -m worker --concurrency <concurrency>``: the rate row
    (with ``target_ratio``: the rate it should reach against ``baseline``), then (quorum runs at the default
    concurrency) the telemetry-messages-per-task row."""
    prefix = unique("atlas-bench")
    topology = Topology(prefix=prefix, queue_type=queue_type)
    procs = Processes(logdir / prefix)
    async with scratch_database(admin_database_url) as database_url:
        await apply_migrations(database_url)
        ledger = await asyncpg.connect(database_url)

        async def all_succeeded() -> bool:
            done: int = await ledger.fetchval("SELECT count(*) FROM task_ledger WHERE state = 'succeeded'")
            return done >= n

        env = {
            "AMQP_URL": amqp_url,
            "DATABASE_URL": database_url,
            "ATLAS_PREFIX": prefix,
            "ATLAS_QUEUE_TYPE": queue_type,
            "LOG_FORMAT": "json",
        }
        try:
            async with Producer(amqp_url, topology) as producer:
                await producer.submit_many(demo_tasks(n, run_id=uuid.uuid4().hex[:8]))
            async with QueueProbe(amqp_url) as probe:
                await probe.wait_depth(topology.tasks_queue, n)
                for k in range(workers):
                    worker_id = f"{prefix}-w{k + 1}"
                    argv = python_module("worker", "--concurrency", str(concurrency))
                    procs.spawn(worker_id, argv, {**env, "WORKER_ID": worker_id})
                drain = await measure_drain(
                    probe, topology.tasks_queue, n, procs, poll_s=poll_s, finished=all_succeeded
                )
                telemetry = await probe.depth(topology.ingestor_queue)
            succeeded = await ledger.fetchval("SELECT count(*) FROM task_ledger WHERE state = 'succeeded'")
        finally:
            procs.stop()
            await ledger.close()
            await delete_topology(amqp_url, topology)
    if drain.consumed != n or succeeded != n:
        raise RuntimeError(
            f"atlas: {drain.consumed} consumed, {succeeded} succeeded of {n}; logs in {logdir}"
        )
    name = taskleg_name(workers, queue_type, concurrency)
    results = [
        Result(
            name,
            "tasks/s",
            drain.rate,
            baseline=baseline,
            at_least_ratio=target_ratio,
            notes=(
                f"python -m worker --concurrency {concurrency} x {workers} process(es), demo adapter, "
                f"ledger + telemetry confirmed before ack, {queue_type} queue; "
                f"{drain.delivered:,} of {n:,} timed"
            ),
        )
    ]
    if queue_type == "quorum" and concurrency == CONCURRENCY:
        results.append(
            Result(
                telemetry_name(workers),
                "msgs/task",
                telemetry / n,
                notes=(
                    f"{telemetry:,} TelemetryBatch messages for {n:,} tasks (plus the task message itself); "
                    "depth of the ingestor queue with no ingestor running"
                ),
            )
        )
    return results
