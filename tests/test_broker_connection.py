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
