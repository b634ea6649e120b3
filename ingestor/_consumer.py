"""The broker side: a robust connection, the ingestor queue, time/size batching, dead letters, acks.

A delivery carries a :class:`schemas.TelemetryBatch` envelope (workers coalesce records of one kind) or,
leniently, one bare record; it is decoded as it arrives (:func:`parse`) and a batch is cut by the number
of *records* it holds (``batch_max_messages``).

Deliveries go into an in-memory queue; the broker sends at most ``prefetch`` unacked ones, which bounds
memory whatever happens downstream (nothing is acked while Postgres is down, so consumption stops by
itself). When the channel drops, aio-pika reconnects and re-consumes; deliveries of the old channel are
*stale* (their tags mean nothing on the new one), so a batch drops them unacked: the broker redelivers
them and the writes are idempotent.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Protocol, Self, TypeVar

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from atlas_common import BROKER_ERRORS as SHARED_BROKER_ERRORS
from atlas_common import DEAD_TELEMETRY_ROUTING_KEY, dead_letter_headers, redact_url
from ingestor._errors import BrokerUnavailable
from ingestor._settings import IngestorSettings
from schemas import DecodeError, RejectedRecord, TelemetryMessage, decode_telemetry_batch

_log = structlog.get_logger("ingestor.consumer")

# The shared broker errors, plus RuntimeError: aio-pika raises it for an operation on a closed channel.
BROKER_ERRORS: Final = (*SHARED_BROKER_ERRORS, RuntimeError)
_PUBLISH_TIMEOUT_S: Final = 30.0
_MIN_PREFETCH: Final = 8
_LARGE: Final = 256 * 1024

Delivery = AbstractIncomingMessage


@dataclass(frozen=True, slots=True)
class Incoming:
    """One delivery, decoded: its good records, its bad records, or why the whole body is invalid."""

    delivery: Delivery
    records: list[TelemetryMessage]
    rejects: list[RejectedRecord]
    error: DecodeError | None = None
    bare: bool = False
    """The body was one bare record, not an envelope."""

    @property
    def weight(self) -> int:
        return max(1, len(self.records) + len(self.rejects))


def parse(delivery: Delivery, *, max_bytes: int) -> Incoming:
    try:
        decoded = decode_telemetry_batch(delivery.body, max_bytes=max_bytes)
    except DecodeError as err:
        return Incoming(delivery, [], [], err)
    bare = len(decoded.records) == 1 and not decoded.rejects and b'"records"' not in delivery.body
    return Incoming(delivery, decoded.records, decoded.rejects, None, bare)


def prefetch_for(avg_message_bytes: float, max_in_flight_bytes: int, max_prefetch: int) -> int:
    """The prefetch count that keeps about ``max_in_flight_bytes`` unacked, within [8, max_prefetch]."""
    want = int(max_in_flight_bytes / max(avg_message_bytes, 1.0))
    return max(_MIN_PREFETCH, min(want, max_prefetch))


class Weighted(Protocol):
    @property
    def weight(self) -> int: ...


W = TypeVar("W", bound=Weighted)


def is_stale(delivery: Delivery) -> bool:
    """True when the delivery's channel is closed: its tag cannot be acked any more."""
    try:
        _ = delivery.channel
    except aio_pika.exceptions.ChannelInvalidStateError:
        return True
    return False


async def collect(
    sink: asyncio.Queue[W], *, max_messages: int, flush_interval_s: float, wait_s: float
) -> list[W]:
    """The next batch: waits up to ``wait_s`` for a first delivery, then fills until it holds
    ``max_messages`` records or is ``flush_interval_s`` old, whichever comes first. [] when nothing came."""
    loop = asyncio.get_running_loop()
    try:
        first = sink.get_nowait() if not sink.empty() else await asyncio.wait_for(sink.get(), wait_s)
    except TimeoutError:
        return []
    batch = [first]
    weight = first.weight
    deadline = loop.time() + flush_interval_s
    while weight < max_messages:
        while weight < max_messages and not sink.empty():
            batch.append(sink.get_nowait())
            weight += batch[-1].weight
        remaining = deadline - loop.time()
        if weight >= max_messages or remaining <= 0:
            break
        try:
            batch.append(await asyncio.wait_for(sink.get(), remaining))
        except TimeoutError:
            break
        weight += batch[-1].weight
    return batch


class Broker:
    """Connection, channel (publisher confirms) and consumer; ``close()`` is safe to call twice."""

    def __init__(
        self, settings: IngestorSettings, sink: asyncio.Queue[Incoming], stop: asyncio.Event | None = None
    ) -> None:
        self._settings = settings
        self._sink = sink
        self._stop = stop or asyncio.Event()
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._queue: AbstractQueue | None = None
        self._dead: AbstractExchange | None = None
        self._consumer_tag: str | None = None
        # Start as if every delivery were a full worker envelope (256 KiB) and grow as sizes are seen: the
        # broker pushes a whole prefetch's worth the moment consuming starts.
        self._prefetch = max(
            _MIN_PREFETCH, min(settings.prefetch_count, settings.max_in_flight_bytes // _LARGE)
        )
        self._avg_bytes: float | None = None
        self._seen = 0
        self._adapting = False
        self._stopped = False

    async def _connect(self) -> AbstractRobustConnection:
        """The first connection, retried (capped backoff) until it works or stop is set; aio-pika's robust
        connection handles every later reconnect by itself."""
        delay = 0.5
        while True:
            try:
                return await aio_pika.connect_robust(
                    self._settings.amqp_url,
                    client_properties={"connection_name": f"atlas-ingestor {self._settings.ingestor_id}"},
                )
            except BROKER_ERRORS as err:
                _log.warning("broker.unavailable", url=redact_url(self._settings.amqp_url), error=repr(err))
            if self._stop.is_set():
                raise BrokerUnavailable("stopped before the broker could be reached")
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
            except TimeoutError:
                delay = min(delay * 2, 10.0)

    async def __aenter__(self) -> Self:
        return await self.open()

    async def open(self) -> Self:
        """Connect, declare the topology, set the prefetch (a no-op when already open)."""
        if self._connection is not None:
            return self
        topology = self._settings.topology()
        self._connection = await self._connect()
        try:
            channel = await self._connection.channel(publisher_confirms=True)
            self._channel = channel
            await channel.set_qos(prefetch_count=self._prefetch)
            self._queue = await topology.declare_ingestor(channel)
            self._dead = await topology.declare_dead_letters(channel)
        except BaseException:
            await self.close()
            raise
        _log.info(
            "broker.connected",
            url=redact_url(self._settings.amqp_url),
            queue=topology.ingestor_queue,
            prefetch=self._prefetch,
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _on_message(self, delivery: Delivery) -> None:
        self._sink.put_nowait(parse(delivery, max_bytes=self._settings.max_message_bytes))
        await self._adapt_prefetch(len(delivery.body))

    async def _adapt_prefetch(self, size: int) -> None:
        """Keep about ``max_in_flight_bytes`` of deliveries in flight, whatever their size.

        AMQP bounds what the broker pushes by message count only (RabbitMQ ignores prefetch-size), and a
        delivery may be one record or an envelope of hundreds: a count that fills a batch with small
        messages would hold gigabytes of large ones. So the count follows the average body size. RabbitMQ
        applies a new per-consumer prefetch only to consumers started after it (and quorum queues refuse
        the channel-wide kind), so a change re-subscribes: the old consumer's unacked deliveries stay
        valid on the channel and are acked with the batch as usual.
        """
        self._avg_bytes = size if self._avg_bytes is None else 0.95 * self._avg_bytes + 0.05 * size
        self._seen += 1
        if self._seen % 32 or self._channel is None or self._queue is None or self._adapting:
            return
        want = prefetch_for(
            self._avg_bytes, self._settings.max_in_flight_bytes, self._settings.prefetch_count
        )
        if want * 2 > self._prefetch and want < self._prefetch * 2:
            return  # within a factor of 2: not worth re-subscribing
        tag = self._consumer_tag
        if tag is None:
            return
        self._adapting = True
        try:
            await self._channel.set_qos(prefetch_count=want)
            await self._queue.cancel(tag)
            if self._stopping():
                return
            new_tag = await self._queue.consume(self._on_message)
            if self._stopping():  # stop() ran while we re-subscribed: stay stopped
                await self._queue.cancel(new_tag)
                return
            self._consumer_tag = new_tag
        except BROKER_ERRORS as err:
            _log.warning("broker.prefetch_change_failed", error=repr(err))
            return
        finally:
            self._adapting = False
        _log.info("broker.prefetch_adapted", prefetch=want, avg_message_bytes=round(self._avg_bytes))
        self._prefetch = want

    def _stopping(self) -> bool:
        # A method, not the attribute inline: stop() flips it while _adapt_prefetch awaits.
        return self._stopped

    async def start(self) -> None:
        if self._queue is None or self._consumer_tag is not None:
            return
        self._consumer_tag = await self._queue.consume(self._on_message)

    async def stop(self) -> None:
        """Stop consuming (deliveries already received stay in the sink); safe twice."""
        self._stopped = True
        tag, self._consumer_tag = self._consumer_tag, None
        if tag is None or self._queue is None:
            return
        try:
            await self._queue.cancel(tag)
        except BROKER_ERRORS as err:
            _log.warning("broker.cancel_failed", error=str(err))

    async def dead_letter(self, delivery: Delivery, reason: str, body: bytes | None = None) -> None:
        """Publish the original body (or ``body``: one record's own JSON out of an envelope) to the dead
        exchange and wait for the broker's confirm."""
        if self._dead is None:
            raise BrokerUnavailable("broker is closed")
        routing_key = delivery.routing_key or ""
        message = aio_pika.Message(
            body=delivery.body if body is None else body,
            headers=dead_letter_headers(reason, source="ingestor", routing_key=routing_key),
            content_type=delivery.content_type,
            message_id=delivery.message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await self._dead.publish(message, DEAD_TELEMETRY_ROUTING_KEY, timeout=_PUBLISH_TIMEOUT_S)
        except BROKER_ERRORS as err:
            raise BrokerUnavailable(f"dead-letter publish failed: {err!r}") from err

    async def ack_through(self, delivery: Delivery) -> None:
        """Ack every delivery up to and including this one (``multiple=True``)."""
        try:
            await delivery.ack(multiple=True)
        except BROKER_ERRORS as err:
            raise BrokerUnavailable(f"ack failed: {err!r}") from err

    async def close(self) -> None:
        await self.stop()
        connection, self._connection = self._connection, None
        self._channel, self._queue, self._dead = None, None, None
        if connection is not None:
            try:
                await asyncio.wait_for(connection.close(), timeout=10)
            except BROKER_ERRORS as err:
                _log.warning("broker.close_failed", error=str(err))
