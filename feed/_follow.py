"""Following the sessions stream: :func:`follow_sessions`.

The ingestor publishes each session it made final to ``<prefix>.sessions`` (a RabbitMQ stream) as its
JSONL line; this reads it over AMQP 0-9-1 with aio-pika (the broker's ``x-stream-offset`` consumer
argument: ``first``, ``last``, ``next`` or an offset; a point in time is found by the ingestors' stamps,
:mod:`feed._seek`). Why not the stream protocol
(``rstream``): it is faster for a single reader, but a trainer reads a few hundred sessions a second at
most, aio-pika is already the project's client (one reconnect model, one TLS and URL handling), and the
stream protocol needs another port (5552) and plugin opened on every broker. What the stream protocol
would add, server-side offset tracking, is replaced by the consumer's own durable cursor
(:mod:`feed._cursor`), which also hides duplicates across restarts.

Guarantees: sessions come in the stream's order of offsets, each ``adapter_session_id`` once (the stream
is at-least-once after an ingestor crash; duplicates within the last ``dedup_window`` sessions the
consumer saw are skipped), live (a new session arrives as soon as the ingestor published it). With a
``consumer`` name, a session counts as finished when the caller asks for the next one; a follower killed
and started again resumes after the last finished session: no gap, no repeat.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

import aio_pika
import aiormq
import orjson
import structlog
from aio_pika.abc import AbstractIncomingMessage

from atlas_common import (
    BROKER_ERRORS,
    STREAM_FILE_HEADER,
    STREAM_PUBLISHED_MS_HEADER,
    Backoff,
    BrokerConnection,
    scrub_secrets,
    sleep_unless,
)
from feed._cursor import StreamCursor, cursor_path
from feed._handout import Handout
from feed._seek import offset_at
from feed._settings import FeedSettings

_log = structlog.get_logger("feed.follow")


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """Where a session is in the stream (``FeedSession.position``). As a start, it means *after* that
    session: a trainer that saves the position of the last session it used together with its own
    checkpoint resumes exactly there, with no gap and no repeat, whatever killed it. ``str()`` gives
    ``<offset>:<index>``, which ``Position.parse`` and ``--from`` read back."""

    offset: int
    index: int

    def __str__(self) -> str:
        return f"{self.offset}:{self.index}"

    @classmethod
    def parse(cls, text: str) -> Position:
        offset, sep, index = text.partition(":")
        if not (sep and offset.isdigit() and index.isdigit()):
            raise ValueError(f"a position is <offset>:<index>, not {text!r}")
        return cls(int(offset), int(index))


Start = Literal["first", "last", "next"] | int | datetime | Position
"""Where a consumer with no cursor starts: the oldest session kept, the last chunk written, the next
session published, an offset, the first session published at or after a point in time, or right after
a session's :class:`Position`."""

_TIME_MARGIN_MS: Final = 2_000
"""A point in time is found by the ingestors' ``published-ms`` stamps (:mod:`feed._seek`), which are in
offset order only within an ingestor: the search starts that much earlier, and the follow keeps only what
was stamped at or after the time asked."""


@dataclass(frozen=True, slots=True)
class FeedSession:
    """One complete session from the stream."""

    offset: int
    """The stream offset of the message that holds it."""
    index: int
    """Its line in that message (a message holds one ingestor batch's sessions)."""
    adapter_session_id: str
    line: bytes
    """Its JSONL line (without the newline): the same bytes as in its finalised file."""
    data: dict[str, Any]
    """The line, parsed."""
    published_at: datetime | None
    jsonl_file: str | None
    """The finalised JSONL file that holds it."""

    @property
    def omitted_bytes(self) -> int | None:
        """Set when the line was too large for the stream: ``line`` is then a pointer (ids, the file)."""
        value = self.data.get("omitted_bytes")
        return value if isinstance(value, int) else None

    def record(self) -> dict[str, Any]:
        """The line as a dict."""
        return self.data

    @property
    def position(self) -> Position:
        return Position(self.offset, self.index)


def _offset_argument(start: Start) -> tuple[aio_pika.abc.FieldValue, int | None]:
    """``x-stream-offset`` for ``start`` and, for a point in time, the published-ms to keep from (the
    offset is then found by :func:`feed._seek.offset_at` once connected; ``first`` until then)."""
    if isinstance(start, datetime):
        at = start if start.tzinfo is not None else start.replace(tzinfo=UTC)
        return "first", int(at.timestamp() * 1000)
    if isinstance(start, int) and not isinstance(start, bool):
        if start < 0:
            raise ValueError("a stream offset is >= 0")
        return start, None
    if start in ("first", "last", "next"):
        return start, None
    raise ValueError(f"start must be first, last, next, an offset or a datetime, not {start!r}")


def sessions_of(message: AbstractIncomingMessage) -> list[FeedSession]:
    """The sessions one stream message holds, in order (a line that is not a JSON object is skipped with
    a warning: nothing the ingestor writes, but a feed must not stop on a foreign message)."""
    headers = message.headers or {}
    offset = int(headers["x-stream-offset"])  # type: ignore[arg-type]
    published = headers.get(STREAM_PUBLISHED_MS_HEADER)
    at = datetime.fromtimestamp(published / 1000, tz=UTC) if isinstance(published, int) else None
    file_name = headers.get(STREAM_FILE_HEADER)
    out = []
    for index, line in enumerate(message.body.splitlines()):
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            _log.warning("feed.line_skipped", offset=offset, index=index, reason="not a JSON object")
            continue
        asid = data.get("adapter_session_id")
        out.append(
            FeedSession(
                offset=offset,
                index=index,
                adapter_session_id=asid if isinstance(asid, str) else "",
                line=line,
                data=data,
                published_at=at,
                jsonl_file=file_name if isinstance(file_name, str) else None,
            )
        )
    return out


class SessionFollow(Handout[FeedSession]):
    """``async with follow_sessions(...) as sessions: async for session in sessions: ...``.

    A session counts as finished when the loop asks for the next one, or when the ``async with`` block
    ends without an exception; then it is written to the consumer's cursor. One that was being processed
    when an exception (or a kill) ended the block is handed out again next time."""

    def __init__(
        self, settings: FeedSettings | None, start: Start, consumer: str | None, stop: asyncio.Event | None
    ) -> None:
        self._settings = settings or FeedSettings()
        self._consumer = consumer
        self._stop = stop or asyncio.Event()
        path = (
            cursor_path(self._settings.cursor_dir, consumer, "stream-cursor")
            if consumer is not None
            else None
        )
        self._cursor = StreamCursor(path, window=self._settings.dedup_window)
        self._since_ms: int | None = None
        self._seek = False  # the start is a point in time whose offset is not found yet
        if self._cursor.offset is None and isinstance(start, Position):
            self._cursor.offset, self._cursor.index = start.offset, start.index
        if self._cursor.offset is not None:
            # The message of the last finished session: the lines after it in that message come next.
            self._offset: aio_pika.abc.FieldValue = self._cursor.offset
            _log.info("feed.resuming", consumer=consumer, offset=self._offset, index=self._cursor.index)
        else:
            self._offset, self._since_ms = _offset_argument(start)
            self._seek = self._since_ms is not None

    async def _finish(self, item: FeedSession) -> None:
        self._cursor.done(item.offset, item.index, item.adapter_session_id)

    def _close(self) -> None:
        self._cursor.close()

    async def _items(self) -> AsyncGenerator[FeedSession, None]:
        settings, stop, cursor = self._settings, self._stop, self._cursor
        stream = settings.topology().sessions_stream
        backoff = Backoff(initial_s=0.5, max_s=10.0)
        while not stop.is_set():
            inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
            try:
                name = f"atlas-feed {self._consumer or ''}"
                async with BrokerConnection(settings.amqp_url, name=name) as conn:
                    # A seek's probes read one message each: the follow's prefetch is set after it.
                    seek = self._since_ms if self._seek else None
                    prefetch = 1 if seek is not None else settings.prefetch
                    channel = await conn.channel(publisher_confirms=False, prefetch_count=prefetch)
                    queue = await channel.get_queue(stream, ensure=True)  # passive: the ingestor declares it
                    if seek is not None:
                        self._offset = await offset_at(queue, seek - _TIME_MARGIN_MS)
                        self._seek = False
                        await channel.set_qos(prefetch_count=settings.prefetch)
                    await queue.consume(inbox.put, arguments={"x-stream-offset": self._offset})
                    backoff.reset()
                    while not stop.is_set():
                        message = await _next(inbox, conn.lost, stop)
                        if message is None:
                            break
                        await message.ack()  # a stream's ack is only credit for the next messages
                        for session in sessions_of(message):
                            if cursor.passed(session.offset, session.index):
                                continue  # finished before a restart or a reconnect
                            if self._skipped(session):
                                cursor.done(session.offset, session.index, session.adapter_session_id)
                                continue
                            yield session
                        self._offset = int(message.headers["x-stream-offset"]) + 1  # type: ignore[arg-type]
            except aiormq.exceptions.ChannelNotFoundEntity:
                _log.info("feed.waiting_for_stream", stream=stream, hint="no ingestor has declared it yet")
            except BROKER_ERRORS as err:
                # A connection error may quote its URL: the password never reaches the log.
                _log.warning("feed.broker_unavailable", error=scrub_secrets(str(err), settings.amqp_url))
            if not stop.is_set():
                await sleep_unless(stop, backoff.next())

    def _skipped(self, session: FeedSession) -> bool:
        """Published before the point in time asked for, or a duplicate of a session already handed out."""
        if self._since_ms is not None and (
            session.published_at is None or session.published_at.timestamp() * 1000 < self._since_ms
        ):
            return True
        return self._cursor.seen(session.adapter_session_id)


def follow_sessions(
    settings: FeedSettings | None = None,
    *,
    start: Start = "next",
    consumer: str | None = None,
    stop: asyncio.Event | None = None,
) -> SessionFollow:
    """Complete sessions from the stream, in order, live (the loop ends only when ``stop`` is set or the
    caller leaves it): ``async with follow_sessions(start="first", consumer="grpo") as sessions``.

    ``consumer``: a name whose cursor (in ``settings.cursor_dir``) makes the follow resumable: when it has
    one, the follow resumes after its last finished session and ``start`` is not used. Without a name
    nothing is kept on disk (duplicates are still hidden within the run). For exactly once across any
    kill, keep ``session.position`` with your own checkpoint and start from it (without a consumer name:
    duplicates are then hidden within the run only)."""
    return SessionFollow(settings, start, consumer, stop)


async def _next(
    inbox: asyncio.Queue[AbstractIncomingMessage], lost: asyncio.Event, stop: asyncio.Event
) -> AbstractIncomingMessage | None:
    """The next delivery, or None when the connection is lost or ``stop`` is set first."""
    if not inbox.empty():
        return inbox.get_nowait()
    getter = asyncio.ensure_future(inbox.get())
    waiters = {getter, asyncio.ensure_future(lost.wait()), asyncio.ensure_future(stop.wait())}
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    if getter.done() and not getter.cancelled():
        return getter.result()
    return None
