"""``Producer``: persistent, publisher-confirmed, pipelined task submission."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass
from typing import Final

import aio_pika
import structlog
from aio_pika.abc import AbstractExchange
from aio_pika.exceptions import DeliveryError

from atlas_common import (
    BROKER_ERRORS,
    TASK_ROUTING_KEY,
    Backoff,
    BrokerConnection,
    BrokerUnavailable,
    PublishNotConfirmed,
    Resource,
    Topology,
    publish_confirmed,
    redact_url,
    scrub_secrets,
)
from producer._errors import PublishRejected
from schemas import TaskMessage, encode

log = structlog.get_logger("producer")

_RECONNECT_FOR_S: Final = 30.0
"""How long a publish that finds the connection lost keeps trying to reconnect (as long as it would wait
for a confirm) before its task is reported not enqueued."""


@dataclass(frozen=True, slots=True)
class SubmitReport:
    submitted: int
    task_ids: list[str]


def task_message(task: TaskMessage) -> aio_pika.Message:
    """The AMQP message for a task: persistent, ``message_id`` = task_id (the idempotency key)."""
    return aio_pika.Message(
        encode(task),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        content_type="application/json",
        message_id=task.task_id,
        type="atlas.task",
        timestamp=task.submitted_at,
    )


class Producer(Resource):
    """Submit tasks; each ``submit*`` returns only once the broker has confirmed every message.

    ``async with Producer(url, topology) as p: await p.submit_many(tasks)``. Publishes are pipelined:
    up to ``window`` messages are in flight awaiting confirms, so throughput is not one round trip per task.
    """

    def __init__(
        self,
        amqp_url: str,
        topology: Topology | None = None,
        *,
        window: int = 1000,
        connect_timeout_s: float = 10.0,
    ) -> None:
        self._url = amqp_url
        self._topology = topology or Topology()
        self._window = window
        self._connect_timeout_s = connect_timeout_s
        self._open = False
        self._broker: BrokerConnection | None = None
        self._exchange: AbstractExchange | None = None
        # Up to ``window`` publishes may find the connection lost at once: one of them reconnects for all,
        # and those that queued behind a reconnect that failed fail with it instead of each trying again.
        self._reconnecting = asyncio.Lock()
        self._reconnects = 0
        self._reconnect_failure: BrokerUnavailable | None = None

    async def open(self) -> None:
        try:
            await self._new_epoch()
        except (*BROKER_ERRORS, ValueError) as exc:  # ValueError: a URL aio-pika refuses
            await self.close()
            raise self._unavailable(exc) from exc
        self._open = True

    async def close(self) -> None:
        """Close the connection; safe to call twice."""
        self._open = False
        await self._end_epoch()

    async def _new_epoch(self) -> None:
        """Connect to a node that answers (:func:`atlas_common.connect_any`), open a confirmed channel and
        declare the task topology. A lost connection is not replayed behind our back (the shared model
        of :class:`atlas_common.BrokerConnection`): publishes in flight on it fail, the next reconnects."""
        await self._end_epoch()
        self._broker = BrokerConnection(
            self._url, connect_timeout_s=self._connect_timeout_s, name="atlas-producer"
        )
        await self._broker.open()
        channel = await self._broker.channel(publisher_confirms=True)
        self._exchange, _ = await self._topology.declare_tasks(channel)

    async def _end_epoch(self) -> None:
        broker, self._broker, self._exchange = self._broker, None, None
        if broker is not None:
            await broker.close()

    def _unavailable(self, exc: BaseException) -> BrokerUnavailable:
        detail = scrub_secrets(repr(exc), self._url)
        return BrokerUnavailable(f"cannot reach RabbitMQ at {redact_url(self._url)}: {detail}")

    async def _current_exchange(self) -> AbstractExchange:
        """This epoch's exchange; when the connection was lost, a new epoch first (retried with backoff for
        up to ``_RECONNECT_FOR_S``, maybe landing on another of the cluster's nodes)."""
        if not self._open:
            raise BrokerUnavailable("the producer is not open (use 'async with Producer(...)')")
        exchange = self._live_exchange()
        if exchange is not None:
            return exchange
        seen = self._reconnects
        async with self._reconnecting:
            exchange = self._live_exchange()
            if exchange is not None:
                return exchange
            if self._reconnects != seen and self._reconnect_failure is not None:
                raise self._reconnect_failure
            self._reconnects += 1
            try:
                return await self._reconnect()
            except BrokerUnavailable as exc:
                self._reconnect_failure = exc
                raise

    def _live_exchange(self) -> AbstractExchange | None:
        """This epoch's exchange, or None once its connection was lost."""
        if self._broker is None or self._broker.lost.is_set():
            return None
        return self._exchange

    async def _reconnect(self) -> AbstractExchange:
        log.warning("producer.broker_lost", url=redact_url(self._url))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _RECONNECT_FOR_S
        backoff = Backoff(initial_s=0.2, max_s=5.0)
        while True:
            try:
                await self._new_epoch()
            except (*BROKER_ERRORS, ValueError) as exc:
                await self._end_epoch()
                delay = backoff.next()
                if loop.time() + delay > deadline:
                    raise self._unavailable(exc) from exc
                await asyncio.sleep(delay)
                continue
            assert self._exchange is not None  # noqa: S101 -- a new epoch declares the exchange
            log.info("producer.reconnected", url=redact_url(self._url))
            return self._exchange

    @property
    def topology(self) -> Topology:
        return self._topology

    async def submit(self, task: TaskMessage) -> str:
        """Enqueue one task; returns its task_id once the broker confirmed it."""
        await self._publish(task)
        return task.task_id

    async def submit_many(
        self,
        tasks: Iterable[TaskMessage] | AsyncIterable[TaskMessage],
        *,
        on_confirmed: Callable[[int], object] | None = None,
    ) -> SubmitReport:
        """Enqueue many tasks with up to ``window`` confirms in flight; raises on the first rejection.

        ``on_confirmed(n)`` is called as confirms arrive (n newly confirmed), for progress bars.
        """
        # A semaphore bounds the confirms in flight; done-callbacks release it. (asyncio.wait over the
        # whole in-flight set would cost O(window) per message.)
        slots = asyncio.Semaphore(self._window)
        pending: set[asyncio.Future[None]] = set()
        failures: list[BaseException] = []
        ids: list[str] = []

        def on_done(fut: asyncio.Future[None]) -> None:
            pending.discard(fut)
            slots.release()
            if fut.cancelled():
                return
            exc = fut.exception()
            if exc is not None:
                failures.append(exc)
            elif on_confirmed is not None:
                on_confirmed(1)

        try:
            async for task in _aiter(tasks):
                await slots.acquire()
                if failures:
                    break
                ids.append(task.task_id)
                fut = asyncio.ensure_future(self._publish(task))
                pending.add(fut)
                fut.add_done_callback(on_done)
            if pending:
                await asyncio.wait(set(pending))
        finally:
            for leftover in list(pending):
                leftover.cancel()
        if failures:
            raise failures[0]
        return SubmitReport(submitted=len(ids), task_ids=ids)

    async def _publish(self, task: TaskMessage) -> None:
        try:
            exchange = await self._current_exchange()
        except BrokerUnavailable as exc:
            if not self._open:
                raise
            raise PublishRejected(task.task_id, str(exc)) from exc
        try:
            await publish_confirmed(exchange, task_message(task), TASK_ROUTING_KEY)
        except PublishNotConfirmed as exc:
            if isinstance(exc.__cause__, DeliveryError):
                raise PublishRejected(task.task_id, f"returned by the broker ({exc.__cause__})") from exc
            raise PublishRejected(task.task_id, str(exc)) from exc


async def _aiter(tasks: Iterable[TaskMessage] | AsyncIterable[TaskMessage]) -> AsyncIterable[TaskMessage]:
    if isinstance(tasks, AsyncIterable):
        async for task in tasks:
            yield task
    else:
        for task in tasks:
            yield task
