"""The acks of one consuming channel, sent together.

Tasks finish in bunches (one ledger round trip and one telemetry confirm answer many at once), and one
``basic.ack`` frame per task was a measurable share of the worker's CPU. Every delivery is registered when
its handler starts; a task acked is marked settled and one flush is scheduled for the end of this turn of
the event loop. The flush acks every settled delivery older than the oldest one still running with a
single ``basic.ack(multiple=True)``, and the settled ones behind a running one each on its own: no ack
waits for another task (a slow task must not hold the prefetch window of the fast ones behind it), and no
ack ever covers a delivery still running, or one handed back (``forget`` comes after its nack is sent).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import structlog

from atlas_common import BROKER_ERRORS, Delivery

log = structlog.get_logger("worker")


class Acks:
    """``delivered(message)`` when a handler starts; then ``ack(message)`` (batched), or ``forget(message)``
    once it was settled otherwise (acked or handed back on its own); ``close()`` sends what is left."""

    def __init__(self) -> None:
        self._running: dict[int, None] = {}
        self._settled: list[Delivery] = []
        self._flush_scheduled = False
        # Frames go out in the order the flushes made them, one at a time: a multiple ack sent before an
        # earlier flush's single ack of a tag below it would make that one unknown to the broker (a channel
        # error).
        self._queue: deque[tuple[Delivery, bool]] = deque()
        self._sender: asyncio.Task[None] | None = None
        self.frames_sent = 0

    def delivered(self, message: Delivery) -> None:
        self._running[message.delivery_tag] = None

    def forget(self, message: Delivery) -> None:
        """The delivery was settled without this batcher (its own ack or nack was sent already)."""
        self._running.pop(message.delivery_tag, None)

    def ack(self, message: Delivery) -> None:
        """Ack ``message`` at the end of this turn of the event loop, with the others settled in it."""
        self.forget(message)
        self._settled.append(message)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        settled, self._settled = self._settled, []
        if not settled:
            return
        settled.sort(key=_tag)
        oldest_running = min(self._running, default=None)
        older = len(settled)
        if oldest_running is not None:
            older = next((i for i, m in enumerate(settled) if _tag(m) > oldest_running), len(settled))
        if older:
            # One frame acks every outstanding delivery up to this tag: all settled (none is running).
            self._queue.append((settled[older - 1], older > 1))
        self._queue.extend((message, False) for message in settled[older:])
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send())

    async def _send(self) -> None:
        while self._queue:
            message, multiple = self._queue.popleft()
            try:
                await message.ack(multiple=multiple)
            except BROKER_ERRORS as exc:
                # The channel is gone: the broker redelivers these, and the ledger acks each as the
                # duplicate of a task that succeeded (its stored close re-published).
                log.warning("task.ack_lost", error=repr(exc), multiple=multiple, tag=message.delivery_tag)
                self._queue.clear()
                return
            self.frames_sent += 1

    async def close(self) -> None:
        """Send the acks still waiting and wait for them (the channel closes next). Safe twice."""
        self._flush()
        if self._sender is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({self._sender})


def _tag(message: Delivery) -> int:
    return message.delivery_tag
