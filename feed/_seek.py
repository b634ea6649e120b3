"""Where a point in time starts in the sessions stream, found by the ingestors' clock: :func:`offset_at`.

RabbitMQ can attach a stream consumer at a point in time itself (``x-stream-offset`` as a timestamp), but
it finds it by the chunk timestamps written with *the broker's* clock. When that clock is away from the
ingestors' (a broker started before the machine's clock was set keeps the clock it started with: Erlang
does not step its clock by default; a broker host whose clock drifts), the broker attaches after every
chunk (a replay returns nothing) or before them all. Every stream message carries the ``published-ms``
its ingestor stamped, so the start is found by those instead: a binary search over offsets, each probe a
short consumer that reads one message (a few ms on loopback; about log2 of the stream's messages probes).

Correct whatever a probe returns: the search only moves its lower bound past messages it saw stamped
before the time, so a probe that times out (an empty stream, a slow broker) ends the search at a start
that is early, never late, and the follow drops what was published before the time by its stamp.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, FieldValue

from atlas_common import STREAM_PUBLISHED_MS_HEADER

_log = structlog.get_logger("feed.seek")

PROBE_TIMEOUT_S: Final = 1.0
"""How long a probe waits for its message: a stream that has one sends it within milliseconds; nothing
by then means an empty stream (or a slow broker, and then the search stops at a start that is early)."""


@dataclass(frozen=True, slots=True)
class Seen:
    offset: int
    published_ms: int | None


Probe = Callable[[FieldValue], Awaitable[Seen | None]]
"""Reads the first message at an ``x-stream-offset`` (or after it): its offset and stamp, None if none."""


async def offset_at(queue: AbstractQueue, since_ms: int) -> FieldValue:
    """The ``x-stream-offset`` to attach ``queue`` (the stream, on a channel whose prefetch is 1: a probe
    reads one message, however large the stream) at so that no message stamped at or after ``since_ms``
    is missed, and few before it are read (:func:`search`)."""
    probes = 0

    async def probe(at: FieldValue) -> Seen | None:
        nonlocal probes
        probes += 1
        return await _probe(queue, at)

    start = await search(probe, since_ms)
    _log.info("feed.seek", stream=queue.name, since_ms=since_ms, start=start, probes=probes)
    return start


async def search(probe: Probe, since_ms: int) -> FieldValue:
    """``first``, or the offset after the last message the search saw stamped before ``since_ms``. Stamps
    are taken as increasing with the offset (the caller's margin covers ingestors whose clocks or
    publishes interleave); a probe that finds nothing ends the search where it is: early, never late."""
    first = await probe("first")
    if first is None or _at_or_after(first, since_ms):
        return "first"
    lo = first.offset  # stamped before since_ms: so is every message up to it
    last = await probe("last")  # the first message of the last chunk
    if last is None:
        return lo + 1
    if not _at_or_after(last, since_ms):
        return last.offset + 1
    hi = last.offset  # stamped at or after since_ms: so is every message from it on
    while hi - lo > 1:
        mid = (lo + hi) // 2
        seen = await probe(mid)
        if seen is None:
            break
        if seen.offset >= hi or _at_or_after(seen, since_ms):
            hi = mid  # no message in [mid, seen.offset), and none from seen on is before since_ms
        else:
            lo = seen.offset
    return lo + 1


def _at_or_after(seen: Seen, since_ms: int) -> bool:
    # A message with no stamp (not the ingestor's) does not move the lower bound: starting early is safe.
    return seen.published_ms is None or seen.published_ms >= since_ms


async def _probe(queue: AbstractQueue, at: FieldValue) -> Seen | None:
    """The first message at offset ``at`` or after it, or None if none comes within the probe timeout."""
    inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    tag = await queue.consume(inbox.put, arguments={"x-stream-offset": at})
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            while True:
                message = await inbox.get()
                headers = message.headers or {}
                offset = int(headers["x-stream-offset"])  # type: ignore[arg-type]
                if isinstance(at, int) and offset < at:
                    await message.ack()  # an earlier message of the chunk: credit for the next one
                    continue
                stamp = headers.get(STREAM_PUBLISHED_MS_HEADER)
                return Seen(offset, stamp if isinstance(stamp, int) else None)
    except TimeoutError:
        return None
    finally:
        await queue.cancel(tag)
