"""The Celery side of the task-leg baseline: a no-op task on the same RabbitMQ.

``celery -A bench._celery_app worker`` reads ``BENCH_AMQP_URL`` and ``BENCH_CELERY_QUEUE`` (set by
:mod:`bench._baselines`). Late acks give Celery the durability class of ours (a task is acked after it
ran, so a killed worker's tasks are redelivered); the prefetch is sized like ours: prefetch multiplier x
concurrency = ``BENCH_PREFETCH`` (64, the atlas worker's ``--concurrency``, which is its prefetch).
"""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_process_shutdown

from bench._counts import count_run, write_count

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
TASK_NAME = "bench.noop"


def make_app(amqp_url: str, queue: str, *, prefetch: int, concurrency: int) -> Celery:
    app = Celery("atlas_bench", broker=amqp_url, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        task_default_exchange=queue,
        task_default_routing_key=queue,
        task_acks_late=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=max(1, prefetch // concurrency),
        worker_concurrency=concurrency,
        worker_enable_remote_control=False,  # no pidbox queue/exchange left behind
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    return app


app = make_app(
    os.environ.get("BENCH_AMQP_URL", DEFAULT_AMQP_URL),
    os.environ.get("BENCH_CELERY_QUEUE", "atlas-bench.celery"),
    prefetch=int(os.environ.get("BENCH_PREFETCH", "64")),
    concurrency=int(os.environ.get("BENCH_CONCURRENCY", "2")),
)


@app.task(name=TASK_NAME)  # type: ignore[untyped-decorator]  # celery ships no type hints: the decorator is untyped
def noop() -> None:
    """Does nothing but count itself (returns None, as the Dramatiq one must)."""
    count_run()


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _on_child_shutdown(**_: object) -> None:
    """Each prefork child writes how many tasks it ran (:mod:`bench._counts`)."""
    write_count()
