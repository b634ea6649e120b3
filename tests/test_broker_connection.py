"""BrokerConnection: one connection however it is entered, closed once, and 'lost' only when unexpected."""

from __future__ import annotations

import asyncio

import pytest

from atlas_common import BrokerConnection

pytestmark = pytest.mark.integration


async def test_open_then_async_with_is_one_connection(amqp_url: str) -> None:
    """open() followed by `async with` reuses the open connection (no second, leaked connection)."""
    broker = BrokerConnection(amqp_url)
    await broker.open()
    first = broker._connection
    async with broker:
        assert broker._connection is first
    assert broker._connection is None
    await broker.close()  # safe twice
    await asyncio.sleep(0.1)
    assert not [t for t in asyncio.all_tasks() if "aiormq" in repr(t.get_coro())]


async def test_lost_is_set_when_a_channel_dies_but_not_on_close(amqp_url: str) -> None:
    """A channel killed by a broker error sets `lost`; a deliberate close does not."""
    async with BrokerConnection(amqp_url) as broker:
        channel = await broker.channel()
        with pytest.raises(Exception, match="NOT_FOUND"):
            await channel.declare_queue("atlas-test-no-such-queue", passive=True)
        await asyncio.wait_for(broker.lost.wait(), 5)
    quiet = BrokerConnection(amqp_url)
    async with quiet:
        await quiet.channel()
    assert not quiet.lost.is_set()


async def test_a_peer_that_closes_during_the_handshake_is_a_connection_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiormq raises StopAsyncIteration when the socket reaches EOF before the first frame (seen through a
    proxy whose backend went away: it ended a worker's reconnect loop). open() turns it into a
    ConnectionError, one of the broker errors every service retries."""
    import aio_pika

    from atlas_common import BROKER_ERRORS

    async def eof_before_the_first_frame(*args: object, **kwargs: object) -> object:
        raise StopAsyncIteration

    monkeypatch.setattr(aio_pika, "connect", eof_before_the_first_frame)
    connection = BrokerConnection("amqp://guest:guest@127.0.0.1:5672/")
    with pytest.raises(BROKER_ERRORS, match="closed the connection during the handshake"):
        await connection.open()
    await connection.close()
