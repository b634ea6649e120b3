"""What happens to a task message after its handler ran: decided here, in one place.

A task run returns an :data:`Outcome`; :meth:`Settler.settle` publishes whatever must be published (a
delayed retry, a dead letter), waits for the broker's confirm (``atlas_common.publish_confirmed``), and only
then acks (plain acks of the tasks settled in one turn of the event loop go out together: ``_acks``). If
that publish fails the message is not acked: the broker redelivers it, and the ledger keeps the re-run
honest.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from aio_pika.abc import AbstractExchange, FieldValue

from atlas_common import (
    BROKER_ERRORS,
    DEAD_TASK_ROUTING_KEY,
    LAST_ERROR_HEADER,
    RETRY_HEADER,
    Delivery,
    Topology,
    dead_letter_headers,
    persistent_copy,
    publish_confirmed,
)
from worker.runtime._acks import Acks


@dataclass(frozen=True, slots=True)
class Ack:
    """Done (succeeded, or a duplicate of a task that already succeeded)."""

    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Retry:
    """Failed; run again after the backoff of retry number ``retries + 1`` (``retries``: how many times the
    task was sent back through the retry path before this failure, from the ``x-atlas-retry`` header)."""

    reason: str
    retries: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Cannot or must not run: to the dead-letter queue with the reason and the original body."""

    reason: str


Outcome = Ack | Retry | DeadLetter


def retries_so_far(message: Delivery) -> int:
    value = message.headers.get(RETRY_HEADER, 0)
    return value if isinstance(value, int) and value >= 0 else 0


def after_failure(topology: Topology, reason: str, retries: int) -> Retry | DeadLetter:
    """Retry with backoff while runs remain (``max_attempts`` runs in all: ``retries + 1`` so far), then
    dead-letter."""
    if retries + 1 < topology.max_attempts:
        return Retry(reason, retries)
    return DeadLetter(f"failed {retries + 1} time(s); last error: {reason}")


class Settler:
    """Settles the deliveries of one consuming channel: ``started`` when a handler starts, then ``settle``
    with its outcome or ``hand_back``; ``close()`` (the channel closes next) sends the acks still waiting.
    Plain acks are batched (``_acks``); a retry or a dead letter is acked on its own once its copy is
    confirmed."""

    def __init__(
        self, topology: Topology, *, retry_exchange: AbstractExchange, dead_exchange: AbstractExchange
    ) -> None:
        self._topology = topology
        self._retry = retry_exchange
        self._dead = dead_exchange
        self._acks = Acks()

    def started(self, message: Delivery) -> None:
        self._acks.delivered(message)

    async def hand_back(self, message: Delivery) -> None:
        """Requeue the delivery (best effort: a channel already gone requeues it anyway)."""
        with contextlib.suppress(*BROKER_ERRORS):
            await message.nack(requeue=True)
        self._acks.forget(message)

    async def close(self) -> None:
        await self._acks.close()

    async def settle(self, message: Delivery, outcome: Outcome) -> None:
        match outcome:
            case Ack():
                self._acks.ack(message)
            case Retry(reason=reason, retries=retries):
                delay_ms = self._topology.retry_delay_ms(retries + 1)
                headers: dict[str, FieldValue] = dict(message.headers)
                headers[RETRY_HEADER] = retries + 1
                headers[LAST_ERROR_HEADER] = reason[:2000]
                await self._publish(self._retry, message, self._topology.retry_queue(delay_ms), headers)
                await message.ack()
                self._acks.forget(message)
            case DeadLetter(reason=reason):
                headers = dead_letter_headers(
                    reason,
                    source="worker",
                    routing_key=message.routing_key,
                    extra=dict(message.headers),
                )
                await self._publish(self._dead, message, DEAD_TASK_ROUTING_KEY, headers)
                await message.ack()
                self._acks.forget(message)

    async def _publish(
        self,
        exchange: AbstractExchange,
        original: Delivery,
        routing_key: str,
        headers: dict[str, FieldValue],
    ) -> None:
        """A persistent copy, confirmed (``PublishNotConfirmed`` otherwise: the task stays unacked)."""
        await publish_confirmed(exchange, persistent_copy(original, headers=headers), routing_key)
