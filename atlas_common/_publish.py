"""The one confirmed publish every service uses, and the persistent copy of a delivery it re-publishes."""

from __future__ import annotations

from datetime import datetime
from typing import Final, Protocol

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange, FieldValue

from atlas_common._broker import BROKER_ERRORS
from atlas_common._errors import PublishNotConfirmed

PUBLISH_TIMEOUT_S: Final = 30.0


async def publish_confirmed(
    exchange: AbstractExchange,
    message: aio_pika.Message,
    routing_key: str,
    *,
    mandatory: bool = True,
    timeout_s: float = PUBLISH_TIMEOUT_S,
) -> None:
    """Publish and wait for the broker's confirm (the channel must have publisher confirms on).

    ``mandatory``: a message no queue is bound for comes back and counts as not confirmed, instead of
    vanishing. Raises :class:`PublishNotConfirmed` for a nack, a return, a timeout or a lost channel."""
    where = f"{exchange.name or '(default)'}/{routing_key}"
    try:
        confirm = await exchange.publish(message, routing_key, mandatory=mandatory, timeout=timeout_s)
    except BROKER_ERRORS as exc:
        raise PublishNotConfirmed(f"publish to {where} failed: {exc!r}") from exc
    if not isinstance(confirm, aiormq.spec.Basic.Ack):
        raise PublishNotConfirmed(f"publish to {where} not confirmed: {type(confirm).__name__}")


class _Delivered(Protocol):
    """What a copy keeps of a delivery: aio-pika's ``IncomingMessage`` and ``atlas_common.Delivery`` both."""

    @property
    def body(self) -> bytes: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def content_encoding(self) -> str | None: ...
    @property
    def priority(self) -> int | None: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def timestamp(self) -> datetime | None: ...
    @property
    def type(self) -> str | None: ...
    @property
    def app_id(self) -> str | None: ...


def persistent_copy(
    original: _Delivered, *, headers: dict[str, FieldValue], body: bytes | None = None
) -> aio_pika.Message:
    """A persistent copy of a delivery (its body, or ``body``) with ``headers`` and every other property
    kept (id, type, content type and encoding, timestamp, priority, correlation and app id): what a retry,
    a dead letter or a requeue publishes."""
    return aio_pika.Message(
        original.body if body is None else body,
        headers=headers,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        content_type=original.content_type,
        content_encoding=original.content_encoding,
        priority=original.priority,
        correlation_id=original.correlation_id,
        message_id=original.message_id,
        timestamp=original.timestamp,
        type=original.type,
        app_id=original.app_id,
    )
