"""End to end: the whole stack as the main job runs it (:func:`bench.mainjob.run_stack`).

Per row: a fresh migrated scratch database and a topology prefix of its own; one ``python -m ingestor
run`` and W ``python -m worker --concurrency C --demo-latency-s L`` processes; once every process
consumes its queue, the producer publishes N demo tasks in one burst (publisher confirms, 1,000 in
flight), stamping each task's submit time as it publishes it. A task is stored when its succeeded
session is complete in PostgreSQL and assigned to a JSONL file (``sessions.stored_at``, set by the
ingestor). tasks/s = N / (last stored - first submit); latency = stored - submitted per task, so it
includes the time a task waits in the queue behind the burst. Afterwards the processes get SIGTERM (the
ingestor finalises its file), the finalised JSONL must hold one line per task, and the database, the
queues and the JSONL are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final, Literal

import asyncpg

from bench._harness import scratch_database
from bench._report import Result
from bench._stack import delete_topology, jsonl_stats, percentile
from bench.mainjob import Run, run_stack
from migrations import apply_migrations

Metric = Literal["throughput", "p50", "p99"]
CONCURRENCY: Final = 64
LATENCY_CONCURRENCY: Final = 100
"""Concurrency of the rows with a simulated LLM latency (more tasks in flight hide the waits)."""
_PERCENTILES: Final[tuple[tuple[Metric, int], ...]] = (("p50", 50), ("p99", 99))


def concurrency_for(latency_s: float) -> int:
    return LATENCY_CONCURRENCY if latency_s > 0 else CONCURRENCY


def e2e_name(workers: int, latency_s: float, metric: Metric) -> str:
    plural = "worker" if workers == 1 else "workers"
    what = {"throughput": "throughput", "p50": "p50 submit->stored", "p99": "p99 submit->stored"}[metric]
    return (
        f"atlas end to end, {workers} {plural} x {concurrency_for(latency_s)}, "
        f"demo {latency_s * 1000:g} ms: {what}"
    )


@contextlib.asynccontextmanager
async def stack_run(
    amqp_url: str,
    admin_database_url: str,
    logdir: Path,
    name: str,
    *,
    tasks: int,
    workers: int,
    concurrency: int,
    demo_latency_s: float,
) -> AsyncIterator[tuple[Run, asyncpg.Connection]]:
    """A :class:`bench.mainjob.Run` of its own (topology ``atlas-bench-<name>-<id>``, logs under
    ``logdir/<name>``) on a fresh migrated scratch database, with a connection to that database; on exit
    the connection is closed, the run's queues are deleted and the database is dropped."""
    async with scratch_database(admin_database_url) as database_url:
        await apply_migrations(database_url)
        run = Run(
            amqp_url=amqp_url,
            database_url=database_url,
            tasks=tasks,
            workers=workers,
            concurrency=concurrency,
            demo_latency_s=demo_latency_s,
            prefix_stem=f"atlas-bench-{name}",
            runs_dir=logdir / name,
        )
        conn = await asyncpg.connect(database_url)
        try:
            yield run, conn
        finally:
            await conn.close()
            await delete_topology(amqp_url, run.topology)


async def end_to_end(
    amqp_url: str,
    admin_database_url: str,
    n: int,
    logdir: Path,
    *,
    workers: int,
    latency_s: float,
    baseline_workers: int | None = None,
    target: str | None = None,
) -> list[Result]:
    """One run of ``n`` tasks: a tasks/s row, then p50 and p99 submit-to-stored rows (ms).

    ``baseline_workers``: the tasks/s row is compared with the row of that many workers (same latency);
    else with ``target``, the row it should be at least as fast as.
    """
    concurrency = concurrency_for(latency_s)
    stack = stack_run(
        amqp_url,
        admin_database_url,
        logdir,
        "e2e",
        tasks=n,
        workers=workers,
        concurrency=concurrency,
        demo_latency_s=latency_s,
    )
    async with stack as (run, conn):
        outcome = await run_stack(run, conn, progress=False, wait_ready=True)
        calls = await conn.fetchval(
            "SELECT coalesce(sum((adapter_usage->>'calls')::bigint), 0) FROM sessions "
            "WHERE status = 'succeeded'"
        )
    files, lines = await asyncio.to_thread(jsonl_stats, run.jsonl_dir)
    await asyncio.to_thread(shutil.rmtree, run.jsonl_dir, ignore_errors=True)
    if len(outcome.stored) != n or lines != n or any(outcome.exit_codes):
        raise RuntimeError(
            f"end to end: {len(outcome.stored)} stored, {lines} JSONL lines of {n} tasks, exit codes "
            f"{outcome.exit_codes}; logs in {run.workdir}"
        )
    latencies = outcome.latencies()
    setup = (
        f"1 ingestor + {workers} x python -m worker --concurrency {concurrency} --demo-latency-s "
        f"{latency_s:g}, {n:,} demo tasks submitted in one burst"
    )
    baseline, at_least_ratio = target, (1.0 if target is not None else None)
    if baseline_workers is not None and baseline_workers != workers:
        baseline, at_least_ratio = e2e_name(baseline_workers, latency_s, "throughput"), None
    return [
        Result(
            e2e_name(workers, latency_s, "throughput"),
            "tasks/s",
            outcome.throughput,
            baseline=baseline,
            at_least_ratio=at_least_ratio,
            notes=(
                f"{setup}; first submit to last stored (sessions.stored_at) = {outcome.seconds:.1f}s; "
                f"{calls / n:.1f} adapter calls per task; {lines:,} JSONL lines in {files} file(s)"
            ),
        ),
        *(
            Result(
                e2e_name(workers, latency_s, metric),
                "ms",
                percentile(latencies, pct) * 1000,
                notes=(
                    f"the same run: stored_at - publish time per task, nearest-rank p{pct} of {n:,}; "
                    "includes the wait in the queue behind the burst"
                ),
            )
            for metric, pct in _PERCENTILES
        ),
    ]
