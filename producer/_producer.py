"""``Producer``: persistent, publisher-confirmed, pipelined task submission."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from aio_pika.exceptions import AMQPError, DeliveryError

from atlas_common import (
    TASK_ROUTING_KEY,
    BrokerUnavailable,
    PublishNotConfirmed,
    Resource,
    Topology,
    publish_confirmed,
    redact_url,
    scrub_secrets,
    split_urls,
)
from producer._errors import PublishRejected
from schemas import TaskMessage, encode

log = structlog.get_logger("producer")


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
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None

    async def open(self) -> None:
        try:
            self._connection = await _connect_robust(self._url, self._connect_timeout_s)
            self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            self._exchange, _ = await self._topology.declare_tasks(self._channel)
        except (OSError, AMQPError, TimeoutError, ValueError) as exc:  # ValueError: a URL aio-pika refuses
            await self.close()
            detail = scrub_secrets(repr(exc), self._url)
            raise BrokerUnavailable(f"cannot reach RabbitMQ at {redact_url(self._url)}: {detail}") from exc

    async def close(self) -> None:
        """Close the connection; safe to call twice."""
        connection, self._connection, self._channel, self._exchange = self._connection, None, None, None
        if connection is not None and not connection.is_closed:
            await connection.close()

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
        if self._exchange is None:
            raise BrokerUnavailable("the producer is not open (use 'async with Producer(...)')")
        try:
            await publish_confirmed(self._exchange, task_message(task), TASK_ROUTING_KEY)
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


async def _connect_robust(url: str, timeout_s: float) -> AbstractRobustConnection:
    """A robust connection to the first node of ``url`` (one URL or a cluster's list, from a random one on)
    that answers. It stays with that node: a long submit whose node goes away waits for it to return."""
    urls = split_urls(url)
    first = random.randrange(len(urls))  # noqa: S311 -- load spreading, not security
    error: Exception | None = None
    for candidate in urls[first:] + urls[:first]:
        try:
            return await aio_pika.connect_robust(candidate, timeout=timeout_s)
        except (OSError, AMQPError, TimeoutError) as exc:
            error = exc
    raise error or ConnectionError("no broker URL")
