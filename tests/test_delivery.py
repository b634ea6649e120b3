"""atlas_common.consume / Delivery: deliveries straight from aiormq, settled once, properties kept."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest
from aio_pika.exceptions import MessageProcessError
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from atlas_common import BROKER_ERRORS, BrokerConnection, Delivery, consume, persistent_copy


class _Channel:
    """Stands in for an aiormq channel: records the settlement frames it is asked to send."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, int, bool]] = []

    async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.frames.append(("ack", delivery_tag, multiple))

    async def basic_nack(self, delivery_tag: int, requeue: bool = True) -> None:
        self.frames.append(("nack", delivery_tag, requeue))


def _delivered(channel: Any, tag: int = 7, **properties: Any) -> DeliveredMessage:
    deliver = Basic.Deliver(
        consumer_tag="c", delivery_tag=tag, redelivered=True, exchange="x", routing_key="task"
    )
    header = ContentHeader(body_size=2, properties=Basic.Properties(**properties))
    return DeliveredMessage(delivery=deliver, header=header, body=b"{}", channel=channel)


async def test_a_delivery_is_settled_once_and_a_second_settlement_sends_nothing() -> None:
    """ack(multiple) sends one frame with the tag; a second ack or nack raises (a broker error, as aio-pika's
    does) before any frame: a tag settled twice is a channel error for every delivery of the channel."""
    channel = _Channel()
    delivery = Delivery(_delivered(channel))
    await delivery.ack(multiple=True)
    with pytest.raises(MessageProcessError):
        await delivery.ack()
    with pytest.raises(BROKER_ERRORS):
        await delivery.nack(requeue=True)
    assert channel.frames == [("ack", 7, True)]
    handed_back = Delivery(_delivered(channel, tag=8))
    await handed_back.nack(requeue=True)
    assert channel.frames[-1] == ("nack", 8, True)


def test_a_delivery_reads_its_facts_and_properties_from_the_frames() -> None:
    """Body, tag, redelivered flag, routing key and every property a copy keeps; no headers reads as {}."""
    stamp = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    delivery = Delivery(
        _delivered(
            _Channel(),
            message_id="m-1",
            content_type="application/json",
            content_encoding="utf-8",
            priority=3,
            correlation_id="c-1",
            timestamp=stamp,
            message_type="task",
            app_id="producer",
        )
    )
    assert (delivery.body, delivery.delivery_tag, delivery.redelivered, delivery.routing_key) == (
        b"{}",
        7,
        True,
        "task",
    )
    assert delivery.headers == {}
    copy = persistent_copy(delivery, headers={"x-atlas-retry": 1})
    assert (copy.message_id, copy.content_type, copy.content_encoding, copy.priority) == (
        "m-1",
        "application/json",
        "utf-8",
        3,
    )
    assert (copy.correlation_id, copy.timestamp, copy.type, copy.app_id) == ("c-1", stamp, "task", "producer")
    assert copy.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert copy.headers == {"x-atlas-retry": 1}


@pytest.mark.integration
async def test_consume_delivers_settles_and_cancels_on_a_real_broker(amqp_url: str) -> None:
    """Against RabbitMQ: deliveries carry body, headers and id; a nack requeues (the next copy is
    redelivered); one multiple ack settles them all (nothing is left after the channel closes); after
    cancel() no delivery arrives."""
    queue_name = f"atlas-test-delivery-{uuid.uuid4().hex[:8]}"
    async with BrokerConnection(amqp_url) as broker:
        channel = await broker.channel(publisher_confirms=True, prefetch_count=10)
        await channel.declare_queue(queue_name, auto_delete=False)
        try:
            for i in range(3):
                message = aio_pika.Message(f"{i}".encode(), message_id=f"m{i}", headers={"n": i})
                await channel.default_exchange.publish(message, queue_name)
            got: list[Delivery] = []
            counts = {3: asyncio.Event(), 4: asyncio.Event()}

            async def on_delivery(delivery: Delivery) -> None:
                got.append(delivery)
                if len(got) in counts:
                    counts[len(got)].set()

            consumer = await consume(channel, queue_name, on_delivery)
            await asyncio.wait_for(counts[3].wait(), 10)
            first = got[0]
            assert (first.body, first.message_id, dict(first.headers), first.redelivered) == (
                b"0",
                "m0",
                {"n": 0},
                False,
            )
            await first.nack(requeue=True)
            await asyncio.wait_for(counts[4].wait(), 10)
            again = got[3]
            assert (again.body, again.redelivered) == (b"0", True)
            await max(got[1:], key=lambda d: d.delivery_tag).ack(multiple=True)
            await consumer.cancel()
            await consumer.cancel()  # safe twice
            await channel.default_exchange.publish(aio_pika.Message(b"late"), queue_name)
            await asyncio.sleep(0.3)
            assert len(got) == 4, "a delivery arrived after cancel()"
            await channel.close()
            check = await broker.channel()
            state = await check.declare_queue(queue_name, passive=True)
            assert state.declaration_result.message_count == 1  # only the one published after cancel()
        finally:
            cleanup = await broker.channel()
            await cleanup.queue_delete(queue_name)
