"""Same-work baselines: Celery and Dramatiq running the task body of :mod:`bench._samework`.

Method (the atlas end-to-end rows' own): a fresh migrated scratch database and a queue of its own; the
framework's worker starts, and once it consumes the queue (its consumers seen on it, so start-up is not
timed) N demo tasks (the producer's ``demo_tasks``, each as the task body's one argument) are published in
one burst from the bench process, while the worker runs them. tasks/s = N / (last ``stored_at`` - first
publish). Then the worker stops, and the database must hold N sessions with every step and the JSONL files
N lines.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import asyncpg

from bench._baselines import (
    DRAMATIQ_PROCESSES,
    DRAMATIQ_THREADS,
    PREFETCH,
    celery_send,
    celery_worker,
    dramatiq_send,
    dramatiq_worker,
)
from bench._harness import (
    Processes,
    QueueProbe,
    delete_queues,
    scratch_database,
    unique,
)
from bench._report import Result
from bench._samework import (
    CELERY_TASK_NAME,
    DATABASE_URL_ENV,
    DRAMATIQ_ACTOR_NAME,
    FILE_PREFIX,
    JSONL_DIR_ENV,
)
from migrations import apply_migrations
from producer import demo_tasks

CELERY_SAME_NAME: Final = "baseline: celery, the same work end to end"
DRAMATIQ_SAME_NAME: Final = "baseline: dramatiq, the same work end to end"
CELERY_CONCURRENCY: Final = 8
"""Prefork processes: the task body waits on PostgreSQL's commit; 4 and 8 measured the same (~585 tasks/s
on this 2-core VM, from a pre-filled queue), 2 (the no-op baseline's) 27 % less."""
_WORK: Final = (
    "runs the task's demo session (the atlas worker's Student and DemoAdapter), then one PostgreSQL "
    "transaction (sessions row, step_results rows, plan; stored_at = now()), then appends its JSONL line "
    "(ingestor.build_line, no fsync); no ledger, no telemetry"
)


def _payloads(n: int) -> list[dict[str, object]]:
    return [t.model_dump(mode="json") for t in demo_tasks(n, run_id=uuid.uuid4().hex[:8])]


def _celery_burst(amqp_url: str, queue: str, n: int) -> float:
    return celery_send(amqp_url, queue, CELERY_TASK_NAME, [(p,) for p in _payloads(n)])


def _dramatiq_burst(amqp_url: str, queue: str, n: int) -> float:
    return dramatiq_send(amqp_url, queue, DRAMATIQ_ACTOR_NAME, [(p,) for p in _payloads(n)])


def _jsonl_lines(directory: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in directory.glob(f"{FILE_PREFIX}*.jsonl"))


@dataclass(frozen=True, slots=True)
class _Framework:
    """One framework's worker for a same-work run, on a queue of its own."""

    name: str
    queue: str
    burst: Callable[[str, str, int], float]
    """Publishes N tasks to the queue (in a thread: the frameworks' clients block); returns the time of
    the first publish."""
    consumers: int
    """Consumers on the queue once the worker is ready."""
    argv: list[str]
    env: dict[str, str]
    queues: list[str]
    """What the run leaves on the broker (deleted afterwards), exchanges in ``exchanges``."""
    exchanges: list[str]


async def _wait_consumers(
    probe: QueueProbe, queue: str, want: int, procs: Processes, *, timeout_s: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while await probe.consumers(queue) < want:
        procs.check_running()
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{queue}: fewer than {want} consumers after {timeout_s}s; logs in {procs.logdir}"
            )
        await asyncio.sleep(0.05)


async def _same_work(
    amqp_url: str,
    admin_database_url: str,
    n: int,
    logdir: Path,
    framework: _Framework,
    *,
    timeout_s: float = 600.0,
) -> float:
    """One run: the tasks/s of the framework's worker over a burst of ``n`` tasks."""
    queue = framework.queue
    procs = Processes(logdir / queue)
    try:
        async with scratch_database(admin_database_url) as database_url:
            await apply_migrations(database_url)
            conn = await asyncpg.connect(database_url)
            try:
                with tempfile.TemporaryDirectory(prefix="atlas-bench-samework-") as jsonl_dir:
                    async with QueueProbe(amqp_url) as probe:
                        env = {**framework.env, DATABASE_URL_ENV: database_url, JSONL_DIR_ENV: jsonl_dir}
                        procs.spawn(framework.name, framework.argv, env)
                        await _wait_consumers(probe, queue, framework.consumers, procs)
                    t0 = await asyncio.to_thread(framework.burst, amqp_url, queue, n)
                    deadline = time.monotonic() + timeout_s
                    while await conn.fetchval("SELECT count(*) FROM sessions") < n:
                        procs.check_running()
                        if time.monotonic() > deadline:
                            raise TimeoutError(
                                f"{queue}: not all stored in {timeout_s}s; logs in {procs.logdir}"
                            )
                        await asyncio.sleep(0.2)
                    t1 = (await conn.fetchval("SELECT max(stored_at) FROM sessions")).timestamp()
                    await asyncio.to_thread(procs.stop)
                    steps = await conn.fetchval("SELECT count(*) FROM step_results")
                    expected = await conn.fetchval("SELECT sum(steps_expected) FROM sessions")
                    lines = await asyncio.to_thread(_jsonl_lines, Path(jsonl_dir))
            finally:
                await asyncio.to_thread(procs.stop)
                await conn.close()
    finally:
        await delete_queues(amqp_url, framework.queues, framework.exchanges)
    if lines != n or steps != expected:
        raise RuntimeError(
            f"{queue}: {lines} JSONL lines for {n} sessions, {steps} of {expected} steps; "
            f"logs in {procs.logdir}"
        )
    return float(n / (t1 - t0))


async def celery_same_work(amqp_url: str, admin_database_url: str, n: int, logdir: Path) -> Result:
    """Celery, prefork x ``CELERY_CONCURRENCY``, acks_late, prefetch 64, the same-work task body."""
    queue = unique("atlas-bench-celery-samework")
    argv, env = celery_worker("bench._celery_samework", amqp_url, queue, concurrency=CELERY_CONCURRENCY)
    celery = _Framework("celery", queue, _celery_burst, 1, argv, env, [queue], [queue])
    rate = await _same_work(amqp_url, admin_database_url, n, logdir, celery)
    notes = (
        f"celery worker, prefork --concurrency {CELERY_CONCURRENCY}, acks_late, prefetch {PREFETCH}, "
        f"classic queue; {n:,} tasks published in one burst once it consumed; each task {_WORK}"
    )
    return Result(CELERY_SAME_NAME, "tasks/s", rate, notes=notes)


async def dramatiq_same_work(amqp_url: str, admin_database_url: str, n: int, logdir: Path) -> Result:
    """Dramatiq, 2 processes x 8 threads, prefetch 64 per process, the same-work actor."""
    queue = unique("atlas-bench-dramatiq-samework")
    argv, env = dramatiq_worker("bench._dramatiq_samework", amqp_url, queue)
    queues = [queue, f"{queue}.DQ", f"{queue}.XQ"]
    dramatiq = _Framework("dramatiq", queue, _dramatiq_burst, DRAMATIQ_PROCESSES, argv, env, queues, [])
    rate = await _same_work(amqp_url, admin_database_url, n, logdir, dramatiq)
    notes = (
        f"dramatiq, {DRAMATIQ_PROCESSES} processes x {DRAMATIQ_THREADS} threads, prefetch {PREFETCH} per "
        f"process, classic queue; {n:,} tasks published in one burst once it consumed; each task {_WORK}"
    )
    return Result(DRAMATIQ_SAME_NAME, "tasks/s", rate, notes=notes)
