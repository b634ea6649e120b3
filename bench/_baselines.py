"""Baselines: the task leg of Celery and of Dramatiq, each running a no-op task on the same broker.

Method (:mod:`bench._harness`): pre-fill a queue of its own with N tasks (not timed), start the
framework's worker as a subprocess, time the drain by polling the queue depth. What is measured is a
framework's own cost per task: receive, decode, dispatch to a pool, run nothing, ack.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from bench._celery_app import TASK_NAME, make_app
from bench._counts import total_runs
from bench._dramatiq_app import ACTOR_NAME
from bench._harness import Drain, Processes, QueueProbe, delete_queues, measure_drain, python_module, unique
from bench._report import Result

PREFETCH: Final = 64
"""Messages in flight per worker process: the atlas worker's ``--concurrency 64`` is its prefetch."""
CELERY_CONCURRENCY: Final = 2
DRAMATIQ_PROCESSES: Final = 2
DRAMATIQ_THREADS: Final = 8

CELERY_NAME: Final = "baseline: celery task leg"
DRAMATIQ_NAME: Final = "baseline: dramatiq task leg"


def celery_worker(
    app_module: str, amqp_url: str, queue: str, *, concurrency: int
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a Celery worker of ``app_module`` (made by ``make_app``) on
    ``queue``: prefork x ``concurrency``, prefetch ``PREFETCH`` in all, no heartbeat/gossip/mingle."""
    argv = python_module(
        "celery",
        "-A",
        app_module,
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        str(concurrency),
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
        "BENCH_CONCURRENCY": str(concurrency),
    }
    return argv, env


def dramatiq_worker(app_module: str, amqp_url: str, queue: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of Dramatiq's worker for ``app_module``'s actors on ``queue``:
    ``DRAMATIQ_PROCESSES`` x ``DRAMATIQ_THREADS``, prefetch ``PREFETCH`` per process."""
    argv = python_module(
        "dramatiq", app_module, "--processes", str(DRAMATIQ_PROCESSES), "--threads", str(DRAMATIQ_THREADS)
    )
    env = {
        "BENCH_AMQP_URL": amqp_url,
        "BENCH_DRAMATIQ_QUEUE": queue,
        "dramatiq_queue_prefetch": str(PREFETCH),
    }
    return argv, env


def celery_send(amqp_url: str, queue: str, task_name: str, args: Sequence[tuple[Any, ...]]) -> float:
    """Send one ``task_name`` task per ``args`` to ``queue`` with Celery's own client (no publisher
    confirms); returns the time of the first send (the pool connects on it)."""
    app = make_app(amqp_url, queue, prefetch=PREFETCH, concurrency=CELERY_CONCURRENCY)
    try:
        with app.producer_pool.acquire(block=True) as producer:
            first = time.time()
            for one in args:
                app.send_task(task_name, args=one, producer=producer)
    finally:
        app.close()
    return first


def dramatiq_send(amqp_url: str, queue: str, actor_name: str, args: Sequence[tuple[Any, ...]]) -> float:
    """Enqueue one ``actor_name`` message per ``args`` on ``queue`` with Dramatiq's own client (the
    messages are built first); returns the time of the first enqueue (the broker connects on it)."""
    import dramatiq
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    messages: list[dramatiq.Message[Any]] = [
        dramatiq.Message(queue_name=queue, actor_name=actor_name, args=one, kwargs={}, options={})
        for one in args
    ]
    broker = RabbitmqBroker(url=amqp_url)
    try:
        first = time.time()
        for message in messages:
            broker.enqueue(message)
    finally:
        broker.close()
    return first


def _checked(name: str, drain: Drain, logdir: Path) -> Drain:
    """The drain, once every task was consumed and really ran (the no-op tasks count themselves)."""
    ran = total_runs(logdir / "counts")
    if drain.consumed != drain.total or ran != drain.total:
        raise RuntimeError(
            f"{name}: {drain.consumed} of {drain.total} tasks consumed, {ran} ran; logs in {logdir}"
        )
    return drain


async def celery_task_leg(amqp_url: str, n: int, logdir: Path, *, poll_s: float = 0.05) -> Result:
    """Celery, prefork pool x 2, acks_late, prefetch 64, no heartbeat/gossip/mingle."""
    queue = unique("atlas-bench-celery")
    procs = Processes(logdir / queue)
    (procs.logdir / "counts").mkdir(parents=True)
    argv, env = celery_worker("bench._celery_app", amqp_url, queue, concurrency=CELERY_CONCURRENCY)
    env["BENCH_COUNT_DIR"] = str(procs.logdir / "counts")
    try:
        await asyncio.to_thread(celery_send, amqp_url, queue, TASK_NAME, [()] * n)
        async with QueueProbe(amqp_url) as probe:
            await probe.wait_depth(queue, n)
            procs.spawn("celery", argv, env)
            drain = _checked(
                CELERY_NAME, await measure_drain(probe, queue, n, procs, poll_s=poll_s), procs.logdir
            )
    finally:
        await asyncio.to_thread(procs.stop)
        await delete_queues(amqp_url, [queue], [queue])
    return Result(
        CELERY_NAME,
        "tasks/s",
        drain.rate,
        notes=(
            f"celery worker, prefork --concurrency {CELERY_CONCURRENCY}, acks_late, prefetch "
            f"{PREFETCH}, no-op task, classic queue; {drain.delivered:,} of {n:,} timed"
        ),
    )


async def dramatiq_task_leg(amqp_url: str, n: int, logdir: Path, *, poll_s: float = 0.05) -> Result:
    """Dramatiq, 2 processes x 8 threads, RabbitmqBroker, prefetch 64 per process."""
    queue = unique("atlas-bench-dramatiq")
    procs = Processes(logdir / queue)
    (procs.logdir / "counts").mkdir(parents=True)
    argv, env = dramatiq_worker("bench._dramatiq_app", amqp_url, queue)
    env["BENCH_COUNT_DIR"] = str(procs.logdir / "counts")
    try:
        await asyncio.to_thread(dramatiq_send, amqp_url, queue, ACTOR_NAME, [()] * n)
        async with QueueProbe(amqp_url) as probe:
            await probe.wait_depth(queue, n)
            procs.spawn("dramatiq", argv, env)
            drain = _checked(
                DRAMATIQ_NAME, await measure_drain(probe, queue, n, procs, poll_s=poll_s), procs.logdir
            )
    finally:
        await asyncio.to_thread(procs.stop)
        await delete_queues(amqp_url, [queue, f"{queue}.DQ", f"{queue}.XQ"])
    return Result(
        DRAMATIQ_NAME,
        "tasks/s",
        drain.rate,
        notes=(
            f"dramatiq, {DRAMATIQ_PROCESSES} processes x {DRAMATIQ_THREADS} threads, prefetch {PREFETCH} "
            f"per process, no-op actor, classic queue; {drain.delivered:,} of {n:,} timed"
        ),
    )
