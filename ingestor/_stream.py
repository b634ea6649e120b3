"""The sessions stream: every session made final goes to ``<prefix>.sessions`` as its JSONL line.

When a line is published, and why none is lost (the argument of ``_jsonl``, one step longer): the lines a
batch assigned are appended to the open file's tmp, then published here (publisher confirms) before the
batch is acked; a file is renamed final only once every line appended to it was confirmed, and a file a
recoverer regenerates from Postgres is published whole before its rename. So every session of a final file
is in the stream. A crash between a publish and the file's finalisation publishes those sessions again
(the regenerated file): the stream is at-least-once, and the feed API hides the duplicates by each
line's ``adapter_session_id``.

A message holds consecutive JSONL lines (one message per batch, up to ``stream_max_message_bytes``); a
line larger than that goes as a pointer instead (the session's ids, its JSONL file, ``omitted_bytes``):
one session must never stop the feed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import aio_pika
import aiormq
import orjson
import structlog
from aio_pika.abc import AbstractChannel

from atlas_common import (
    BROKER_ERRORS,
    STREAM_FILE_HEADER,
    STREAM_PUBLISHED_MS_HEADER,
    STREAM_SESSIONS_HEADER,
    BrokerConnection,
    PublishNotConfirmed,
    Resource,
    publish_confirmed,
    scrub_secrets,
)
from ingestor._errors import TransientError
from ingestor._settings import IngestorSettings

_log = structlog.get_logger("ingestor.stream")


class StreamUnavailable(TransientError):
    """The broker did not take (confirm) the sessions: retried like any dependency that is away."""


def pointer_line(line: bytes, file_name: str, max_bytes: int) -> bytes:
    """What stands in the stream for a line larger than ``max_bytes``: the session's ids, its JSONL file
    and the line's size (``omitted_bytes``, a key no session line has)."""
    record: dict[str, Any] = orjson.loads(line)
    meta = record.get("session_metadata") or {}
    size = len(line.rstrip(b"\n"))
    pointer = {
        "adapter_session_id": record.get("adapter_session_id"),
        "omitted_bytes": size,
        "omitted": f"a line of {size} bytes, over the stream's {max_bytes}: read it from jsonl_file",
        "jsonl_file": file_name,
        "session_metadata": {k: meta.get(k) for k in ("session_id", "task_id", "status")},
        "attempt": record.get("attempt"),
    }
    return orjson.dumps(pointer) + b"\n"


def stream_messages(
    lines: Sequence[bytes], file_name: str, *, max_bytes: int, now_ms: int
) -> list[aio_pika.Message]:
    """The stream messages of ``lines`` (JSONL lines, each ending in a newline), in order: consecutive
    lines packed into one message up to ``max_bytes`` (one publish per batch, not per session: a confirmed
    publish costs more CPU than building the line), a line alone over the limit as its pointer."""
    chunks: list[list[bytes]] = [[]]
    size = 0
    for line in lines:
        if len(line) > max_bytes:
            line = pointer_line(line, file_name, max_bytes)  # noqa: PLW2901 -- the line as the stream holds it
        if chunks[-1] and size + len(line) > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(line)
        size += len(line)
    headers: dict[str, aio_pika.abc.FieldValue] = {
        STREAM_PUBLISHED_MS_HEADER: now_ms,
        STREAM_FILE_HEADER: file_name,
    }
    return [
        aio_pika.Message(
            b"".join(chunk),
            content_type="application/x-ndjson",
            headers={**headers, STREAM_SESSIONS_HEADER: len(chunk)},
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        for chunk in chunks
        if chunk
    ]


class SessionStream(Resource):
    """Publishes lines to the sessions stream on a connection of its own (connected on first use, and
    again after a failure). ``publish`` returns once the broker confirmed every line, in order."""

    def __init__(self, settings: IngestorSettings) -> None:
        self._settings = settings
        self._topology = settings.topology()
        self._connection: BrokerConnection | None = None
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()
        self.published = 0

    @property
    def enabled(self) -> bool:
        return self._settings.stream_enabled

    async def publish(self, lines: Sequence[bytes], file_name: str) -> None:
        """Publish ``lines`` (JSONL lines of ``file_name``); StreamUnavailable if not all were confirmed."""
        if not lines or not self.enabled:
            return
        async with self._lock:  # one publisher at a time: the batch loop and recovery share the channel
            try:
                channel = await self._ensure()
                now_ms = int(time.time() * 1000)
                max_bytes = self._settings.stream_max_message_bytes
                exchange = channel.default_exchange
                name = self._topology.sessions_stream
                # Pipelined: every publish is sent before the first confirm is awaited; the frames go out
                # in this order, which is the stream's order of offsets.
                messages = stream_messages(lines, file_name, max_bytes=max_bytes, now_ms=now_ms)
                await asyncio.gather(*(publish_confirmed(exchange, m, name) for m in messages))
            except (PublishNotConfirmed, *BROKER_ERRORS) as err:
                await self._drop()
                detail = scrub_secrets(str(err), self._settings.amqp_url)  # a client may quote its URL
                raise StreamUnavailable(f"sessions stream: {detail}") from err
            self.published += len(lines)

    async def _ensure(self) -> AbstractChannel:
        if self._channel is not None and self._connection is not None and not self._connection.lost.is_set():
            return self._channel
        await self._drop()
        s = self._settings
        connection = BrokerConnection(s.amqp_url, name=f"atlas-ingestor {s.ingestor_id} stream")
        self._connection = connection
        await connection.open()
        channel = await connection.channel(publisher_confirms=True)
        try:
            await self._topology.declare_sessions_stream(
                channel, max_age_s=s.stream_max_age_s, max_bytes=s.stream_max_bytes
            )
        except aiormq.exceptions.ChannelPreconditionFailed as err:
            # Declared before with other retention: keep it as it is (a policy changes it), say so once.
            _log.warning(
                "stream.retention_differs",
                stream=self._topology.sessions_stream,
                error=str(err),
                hint="change retention with a policy: rabbitmqctl set_policy ... (see the README)",
            )
            channel = await connection.channel(publisher_confirms=True)
        self._channel = channel
        return channel

    async def _drop(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            await connection.close()

    async def close(self) -> None:
        await self._drop()
