"""The Dramatiq side of the task-leg baseline: a no-op actor on the same RabbitMQ.

``dramatiq bench._dramatiq_app`` reads ``BENCH_AMQP_URL`` and ``BENCH_DRAMATIQ_QUEUE`` (set by
:mod:`bench._baselines`). Dramatiq acks after the actor ran (same durability class as ours) and
publishes persistent messages; its per-process prefetch is set with ``dramatiq_queue_prefetch``.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import Middleware

from bench._counts import count_run, write_count

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
ACTOR_NAME = "noop"

broker = RabbitmqBroker(url=os.environ.get("BENCH_AMQP_URL", DEFAULT_AMQP_URL))


class _WriteCount(Middleware):
    """Each worker process writes how many tasks it ran (:mod:`bench._counts`) once it has stopped."""

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:  # noqa: ARG002 - the hook's signature
        write_count()


broker.add_middleware(_WriteCount())
dramatiq.set_broker(broker)


@dramatiq.actor(
    actor_name=ACTOR_NAME,
    queue_name=os.environ.get("BENCH_DRAMATIQ_QUEUE", "atlas-bench.dramatiq"),
    max_retries=0,
)
def noop() -> None:
    """Does nothing but count itself (returns None: a value would make Dramatiq log a warning per task)."""
    count_run()
