"""The Dramatiq side of the same-work baseline: the task body of :mod:`bench._samework` as an actor.

``dramatiq bench._dramatiq_samework`` needs ``BENCH_AMQP_URL`` and ``BENCH_DRAMATIQ_QUEUE`` (as
:mod:`bench._dramatiq_app` reads them) and :mod:`bench._samework`'s database URL and JSONL directory.
Dramatiq acks a message after its actor returned: after the session is committed.
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import Middleware

from bench._samework import DRAMATIQ_ACTOR_NAME, close_thread_state, run_and_store

broker = RabbitmqBroker(url=os.environ["BENCH_AMQP_URL"])


class _CloseThreadState(Middleware):
    """Each worker thread closes its connection and file as it stops (the hook runs in that thread)."""

    def before_worker_thread_shutdown(self, broker: dramatiq.Broker, thread: object) -> None:  # noqa: ARG002 - the hook's signature
        close_thread_state()


broker.add_middleware(_CloseThreadState())
dramatiq.set_broker(broker)


@dramatiq.actor(
    actor_name=DRAMATIQ_ACTOR_NAME,
    queue_name=os.environ["BENCH_DRAMATIQ_QUEUE"],
    max_retries=0,
)
def session(payload: dict[str, Any]) -> None:
    """Run the task's demo session and store it (PostgreSQL, then its JSONL line)."""
    run_and_store(payload)
