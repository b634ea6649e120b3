"""Broker access for the operator commands (``status``, ``dead``): connect, look at a queue, peek.

Looking never consumes: a queue is inspected with a passive ``queue.declare`` (which creates nothing),
and a message is read with ``basic.get`` without ack on a throwaway channel. Closing that channel hands
every unacked message back to the queue, so whatever was read is still there afterwards.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from atlas_common import BROKER_ERRORS, BrokerUnavailable, connect_any, redact_url, scrub_secrets

_QUIET_LOGGERS = ("aiormq", "aio_pika")


def quiet_broker_logs() -> None:
    """aiormq logs a failed connect on its own; the commands report it once, in their own words."""
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


async def connect(url: str, *, timeout_s: float = 10.0, name: str = "atlas-producer") -> AbstractConnection:
    """A plain (non-robust) connection to the first node of ``url`` that answers, or
    :class:`BrokerUnavailable` naming the URL without its secret."""
    try:
        return await connect_any(url, timeout_s=timeout_s, name=name)
    except (*BROKER_ERRORS, ValueError) as exc:
        detail = scrub_secrets(str(exc) or type(exc).__name__, url)
        raise BrokerUnavailable(f"cannot reach RabbitMQ at {redact_url(url)}: {detail}") from None


@contextlib.asynccontextmanager
async def throwaway_channel(
    connection: AbstractConnection, *, publisher_confirms: bool = False
) -> AsyncIterator[AbstractChannel]:
    """A channel closed on exit, even if the broker already closed it (a 404 closes a channel).

    With confirms, an unroutable ``mandatory`` publish raises instead of counting as confirmed."""
    channel = await connection.channel(
        publisher_confirms=publisher_confirms, on_return_raises=publisher_confirms
    )
    try:
        yield channel
    finally:
        if not channel.is_closed:
            with contextlib.suppress(*BROKER_ERRORS):
                await channel.close()


@dataclass(frozen=True, slots=True)
class QueueDepth:
    name: str
    ready: int
    """Messages ready for delivery (unacked deliveries are not counted by the broker here)."""
    consumers: int


async def queue_depth(connection: AbstractConnection, name: str) -> QueueDepth | None:
    """Ready messages and consumers of ``name``, or None when the queue does not exist."""
    async with throwaway_channel(connection) as channel:
        try:
            queue = await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        result = queue.declaration_result
        return QueueDepth(name, result.message_count or 0, result.consumer_count or 0)


PASSIVE_MISSING = (aiormq.exceptions.ChannelNotFoundEntity,)
"""What a passive declare of a missing queue or exchange raises (the channel is closed by it)."""
