"""A broker connection that says when it is lost, for services that rebuild everything on reconnect.

aio-pika's robust connection replays channels and consumers behind the caller's back, and in-flight
deliveries of the old channel can then be neither acked nor trusted. The services here treat a lost
connection as the end of an epoch instead: stop what is in flight (the broker redelivers it), reconnect
with backoff, declare again, consume again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aio_pika.exceptions import AMQPError

from atlas_common._resource import Resource
from atlas_common._urls import redact_url, split_urls

BROKER_ERRORS = (
    AMQPError,
    aiormq.exceptions.AMQPError,
    # What aio-pika raises for an operation on a channel that closed under it.
    aiormq.exceptions.ChannelInvalidStateError,
    OSError,
    TimeoutError,
    ConnectionError,
)
"""Everything the broker client raises when RabbitMQ, the connection or the channel is not there."""


async def connect_any(url: str, *, timeout_s: float = 10.0, name: str = "atlas") -> AbstractConnection:
    """A connection to the first node of ``url`` (one URL, or a comma-separated list of a cluster's nodes)
    that answers, trying them from a random one on, so that many processes spread over the nodes and a
    node that went away is left for the next. Raises the last node's error when none answers."""
    urls = split_urls(url)
    first = random.randrange(len(urls))  # noqa: S311 -- load spreading, not security
    error: BaseException | None = None
    for candidate in urls[first:] + urls[:first]:
        try:
            return await aio_pika.connect(
                candidate, timeout=timeout_s, client_properties={"connection_name": name}
            )
        except StopAsyncIteration:
            # aiormq's way of saying the peer closed the socket in the middle of the handshake (a broker
            # going down, a load balancer with no backend): a connection failure like any other.
            error = ConnectionError(f"{redact_url(candidate)} closed the connection during the handshake")
        except BROKER_ERRORS as exc:
            error = exc
    assert error is not None  # noqa: S101 -- split_urls never returns an empty list
    raise error


class BrokerConnection(Resource):
    """``async with BrokerConnection(url) as broker``: ``broker.lost`` is set once the connection or any
    channel opened through it closes unexpectedly; ``close()`` is safe twice. ``url`` may list a cluster's
    nodes (:func:`connect_any`): a service whose node goes away reconnects, with the same backoff, to one
    that answers."""

    def __init__(self, url: str, *, connect_timeout_s: float = 10.0, name: str = "atlas") -> None:
        self._url = url
        self._timeout = connect_timeout_s
        self._name = name
        self._connection: AbstractConnection | None = None
        self._closing = False
        self.lost = asyncio.Event()

    @property
    def safe_url(self) -> str:
        return redact_url(self._url)

    async def open(self) -> None:
        """Connect (a no-op when already open, so ``open()`` then ``async with`` is one connection)."""
        if self._connection is not None:
            return
        self._connection = await connect_any(self._url, timeout_s=self._timeout, name=self._name)
        self._connection.close_callbacks.add(self._on_close)

    async def channel(
        self, *, publisher_confirms: bool = True, prefetch_count: int | None = None
    ) -> AbstractChannel:
        if self._connection is None:
            raise RuntimeError("the broker connection is not open")
        channel = await self._connection.channel(
            publisher_confirms=publisher_confirms, on_return_raises=publisher_confirms
        )
        channel.close_callbacks.add(self._on_close)
        if prefetch_count is not None:
            await channel.set_qos(prefetch_count=prefetch_count)
        return channel

    def _on_close(self, *_: Any) -> None:
        if not self._closing:
            self.lost.set()

    async def close(self) -> None:
        self._closing = True
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(*BROKER_ERRORS):  # already gone: nothing left to release
                await connection.close()


async def sleep_unless(event: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; True if ``event`` was set meanwhile (so the caller stops waiting)."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True
