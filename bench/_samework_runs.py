"""Same-work baselines: Celery and Dramatiq running the task body of :mod:`bench._samework`.

Method (the ingestor-alone rows' way of timing): a fresh migrated scratch database and a queue of its own;
the queue is pre-filled with N demo tasks (the producer's ``demo_tasks``, each as the task body's one
argument; not timed) and seen full; the framework's worker starts; t0 is the first poll (every 20 ms)
where the queue holds fewer than N (consumption started, so start-up is not timed); t1 is
``max(sessions.stored_at)`` once every task's session is stored. tasks/s = N / (t1 - t0). Then the
workers stop, and the database must hold N sessions with their steps and the JSONL files N lines.

The atlas end-to-end rows this is compared with publish their burst while the stack runs (the producer
shares the two cores with it) and count the wait behind the burst: the pre-filled queue here spares the
baseline both.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Final

import asyncpg

from bench._celery_app import make_app
from bench._harness import (
    Processes,
    QueueProbe,
    delete_queues,
    python_module,
    scratch_database,
    unique,
    wait_consumption,
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
here), 2 (the no-op baseline's) 27 % less."""
DRAMATIQ_PROCESSES: Final = 2
DRAMATIQ_THREADS: Final = 8
PREFETCH: Final = 64
_WORK: Final = (
    "runs the task's demo session (the atlas worker's Student and DemoAdapter), then one PostgreSQL "
    "transaction (sessions row, step_results rows, plan; stored_at = now()), then appends its JSONL line "
    "(ingestor.build_line, no fsync); no ledger, no telemetry"
)


def _payloads(n: int) -> list[dict[str, object]]:
    return [t.model_dump(mode="json") for t in demo_tasks(n, run_id=uuid.uuid4().hex[:8])]


def _celery_fill(amqp_url: str, queue: str, n: int) -> None:
    app = make_app(amqp_url, queue, prefetch=PREFETCH, concurrency=CELERY_CONCURRENCY)
    try:
        with app.producer_pool.acquire(block=True) as producer:
            for payload in _payloads(n):
                app.send_task(CELERY_TASK_NAME, args=(payload,), producer=producer)
    finally:
        app.close()


def _dramatiq_fill(amqp_url: str, queue: str, n: int) -> None:
    import dramatiq
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=amqp_url)
    try:
        for payload in _payloads(n):
            broker.enqueue(
                dramatiq.Message(
                    queue_name=queue, actor_name=DRAMATIQ_ACTOR_NAME, args=(payload,), kwargs={}, options={}
                )
            )
    finally:
        broker.close()


def _jsonl_lines(directory: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in directory.glob(f"{FILE_PREFIX}*.jsonl"))


async def _same_work(
    amqp_url: str,
    admin_database_url: str,
    n: int,
    logdir: Path,
    *,
    name: str,
    queue: str,
    fill: Callable[[str, str, int], None],
    argv: list[str],
    env: dict[str, str],
    timeout_s: float,
) -> float:
    """One run: the tasks/s of ``argv`` (the framework's worker) over ``n`` pre-filled tasks."""
    procs = Processes(logdir / queue)
    async with scratch_database(admin_database_url) as database_url:
        await apply_migrations(database_url)
        conn = await asyncpg.connect(database_url)
        try:
            with tempfile.TemporaryDirectory(prefix="atlas-bench-samework-") as jsonl_dir:
                await asyncio.to_thread(fill, amqp_url, queue, n)
                async with QueueProbe(amqp_url) as probe:
                    await probe.wait_depth(queue, n)
                    env = {**env, DATABASE_URL_ENV: database_url, JSONL_DIR_ENV: jsonl_dir}
                    procs.spawn(name, argv, env)
                    t0 = await wait_consumption(probe, queue, n, procs)
                    deadline = time.monotonic() + timeout_s
                    while await conn.fetchval("SELECT count(*) FROM sessions") < n:
                        procs.check_running()
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"{queue}: not every session stored in {timeout_s}s")
                        await asyncio.sleep(0.2)
                    t1 = (await conn.fetchval("SELECT max(stored_at) FROM sessions")).timestamp()
                await asyncio.to_thread(procs.stop)
                steps = await conn.fetchval("SELECT count(*) FROM step_results")
                expected = await conn.fetchval("SELECT sum(steps_expected) FROM sessions")
                lines = await asyncio.to_thread(_jsonl_lines, Path(jsonl_dir))
        finally:
            await asyncio.to_thread(procs.stop)
            await conn.close()
    if lines != n or steps != expected:
        raise RuntimeError(
            f"{queue}: {lines} JSONL lines for {n} sessions, {steps} of {expected} steps; "
            f"logs in {procs.logdir}"
        )
    return float(n / (t1 - t0))


async def celery_same_work(amqp_url: str, admin_database_url: str, n: int, logdir: Path) -> Result:
    """Celery, prefork x ``CELERY_CONCURRENCY``, acks_late, prefetch 64, the same-work task body."""
    queue = unique("atlas-bench-celery-samework")
    argv = python_module(
        "celery",
        "-A",
        "bench._celery_samework",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        str(CELERY_CONCURRENCY),
        "--without-heartbeat",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        "WARNING",
        "-Q",
        queue,
        "-n",
        f"{queue}@%h",
    )
    env = {
        "BENCH_AMQP_URL": amqp_url,
        "BENCH_CELERY_QUEUE": queue,
        "BENCH_PREFETCH": str(PREFETCH),
        "BENCH_CONCURRENCY": str(CELERY_CONCURRENCY),
    }
    try:
        rate = await _same_work(
            amqp_url,
            admin_database_url,
            n,
            logdir,
            name="celery",
            queue=queue,
            fill=_celery_fill,
            argv=argv,
            env=env,
            timeout_s=600.0,
        )
    finally:
        await delete_queues(amqp_url, [queue], [queue])
    return Result(
        CELERY_SAME_NAME,
        "tasks/s",
        rate,
        notes=(
            f"celery worker, prefork --concurrency {CELERY_CONCURRENCY}, acks_late, prefetch {PREFETCH}, "
            f"classic queue; {n:,} tasks pre-filled; each task {_WORK}"
        ),
    )


async def dramatiq_same_work(amqp_url: str, admin_database_url: str, n: int, logdir: Path) -> Result:
    """Dramatiq, 2 processes x 8 threads, prefetch 64 per process, the same-work actor."""
    queue = unique("atlas-bench-dramatiq-samework")
    argv = python_module(
        "dramatiq",
        "bench._dramatiq_samework",
        "--processes",
        str(DRAMATIQ_PROCESSES),
        "--threads",
        str(DRAMATIQ_THREADS),
    )
    env = {
        "BENCH_AMQP_URL": amqp_url,
        "BENCH_DRAMATIQ_QUEUE": queue,
        "dramatiq_queue_prefetch": str(PREFETCH),
    }
    try:
        rate = await _same_work(
            amqp_url,
            admin_database_url,
            n,
            logdir,
            name="dramatiq",
            queue=queue,
            fill=_dramatiq_fill,
            argv=argv,
            env=env,
            timeout_s=600.0,
        )
    finally:
        await delete_queues(amqp_url, [queue, f"{queue}.DQ", f"{queue}.XQ"])
    return Result(
        DRAMATIQ_SAME_NAME,
        "tasks/s",
        rate,
        notes=(
            f"dramatiq, {DRAMATIQ_PROCESSES} processes x {DRAMATIQ_THREADS} threads, prefetch {PREFETCH} per "
            f"process, classic queue; {n:,} tasks pre-filled; each task {_WORK}"
        ),
    )
