"""The Celery side of the same-work baseline: the task body of :mod:`bench._samework` as a Celery task.

``celery -A bench._celery_samework worker`` needs ``BENCH_AMQP_URL`` and ``BENCH_CELERY_QUEUE`` and reads
``BENCH_PREFETCH`` and ``BENCH_CONCURRENCY``, as :mod:`bench._celery_app` does (late acks: a task is acked
after its session is committed), and :mod:`bench._samework`'s database URL and JSONL directory.
"""

from __future__ import annotations

import os
from typing import Any

from celery.signals import worker_process_shutdown

from bench._celery_app import make_app
from bench._samework import CELERY_TASK_NAME, close_thread_state, run_and_store

app = make_app(
    os.environ["BENCH_AMQP_URL"],
    os.environ["BENCH_CELERY_QUEUE"],
    prefetch=int(os.environ.get("BENCH_PREFETCH", "64")),
    concurrency=int(os.environ.get("BENCH_CONCURRENCY", "2")),
)


@app.task(name=CELERY_TASK_NAME)  # type: ignore[untyped-decorator]  # celery ships no type hints: the decorator is untyped
def session(payload: dict[str, Any]) -> None:
    """Run the task's demo session and store it (PostgreSQL, then its JSONL line)."""
    run_and_store(payload)


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _on_child_shutdown(**_: object) -> None:
    close_thread_state()
