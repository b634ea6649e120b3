"""Coalescing telemetry records into few broker messages.

Every record a worker emits (opened, step, close) is queued here and goes out in a
:class:`schemas.TelemetryBatch` with the other records of the same kind queued in the same short window
(``linger_s``), so the broker sees one publish per kind per window instead of one per record. Each
``send`` returns a future that resolves when the broker has confirmed the batch holding that record:
the runtime still acks a task only after all of its records are confirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Final

import aio_pika
import structlog
from aio_pika.abc import AbstractExchange

from atlas_common import PublishNotConfirmed, Resource, publish_confirmed
from schemas import SCHEMA_VERSION, limits
from worker.runtime._deadline import fail_after

log = structlog.get_logger("worker.telemetry")

_HEAD: Final = b'{"schema_version":%d,"kind":"%s","records":['
_HEAD_AND_TAIL_BYTES: Final = 64
REFUSED_LIMIT: Final = 5
"""Envelopes refused in a row after which the batcher asks for a new connection."""


CONFIRM_TIMEOUT_S: Final = 60.0
"""How long a record may wait, from its envelope's first record, for the broker's confirm."""


class _Buffer:
    __slots__ = ("bytes", "confirmed", "parts")

    def __init__(self, confirm_timeout_s: float) -> None:
        self.parts: list[bytes] = []
        # One future per envelope, shared by its records: they are confirmed (or not) together. Its deadline
        # is a timer on it, so the tasks waiting on it need no timeout scope of their own (two per task).
        self.confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        text = f"no telemetry confirm within {confirm_timeout_s:g}s"
        fail_after(self.confirmed, confirm_timeout_s, PublishNotConfirmed, text)
        self.bytes = 0


class TelemetryBatcher(Resource):
    """``async with TelemetryBatcher(exchange) as b: await b.send(record)``; ``close()`` is safe twice."""

    def __init__(
        self,
        exchange: AbstractExchange,
        *,
        linger_s: float = 0.002,
        max_records: int = 500,
        max_bytes: int = 256 * 1024,
        on_refused: Callable[[], None] | None = None,
        refused_limit: int = REFUSED_LIMIT,
        confirm_timeout_s: float = CONFIRM_TIMEOUT_S,
    ) -> None:
        self._exchange = exchange
        self._confirm_timeout_s = confirm_timeout_s
        self._on_refused = on_refused
        self._refused_limit = refused_limit
        self._refused_in_a_row = 0
        self._linger_s = linger_s
        self._max_records = max_records
        self._max_bytes = max_bytes
        self._buffers: dict[str, _Buffer] = {}
        self._wake = asyncio.Event()
        self._publishing: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        self.batches_sent = 0
        self.records_sent = 0

    async def open(self) -> None:
        self.start()

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name="telemetry-batcher")

    def send(self, kind: str, part: bytes) -> asyncio.Future[None]:
        """Queue one encoded record (``schemas.storable`` made it, so it is at most ``MAX_RECORD_BYTES``);
        the future (its envelope's, shared by the records in it) resolves once the broker confirmed the
        envelope, or fails with why not (:class:`PublishNotConfirmed`: refused, lost, or no confirm within
        ``confirm_timeout_s`` of the envelope's first record).

        An envelope never grows past ``MAX_MESSAGE_BYTES``: a record that would push it over goes into the
        next one, so no record is ever refused downstream for sharing a message with others."""
        if self._closed or len(part) > limits.MAX_RECORD_BYTES:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            if self._closed:
                future.set_exception(RuntimeError("the telemetry batcher is closed"))
            else:
                future.set_exception(ValueError(f"a {len(part)}-byte record is over the record limit"))
            return future
        buffer = self._buffers.get(kind)
        if buffer is not None and buffer.bytes + len(part) + _HEAD_AND_TAIL_BYTES > limits.MAX_MESSAGE_BYTES:
            self._flush(kind)
            buffer = None
        if buffer is None:
            buffer = self._buffers[kind] = _Buffer(self._confirm_timeout_s)
        buffer.parts.append(part)
        buffer.bytes += len(part) + 1
        if len(buffer.parts) >= self._max_records or buffer.bytes >= self._max_bytes:
            self._flush(kind)
        else:
            self._wake.set()
        return buffer.confirmed

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            # Linger a moment so records of concurrent sessions share a publish.
            await asyncio.sleep(self._linger_s)
            self._wake.clear()
            for kind in list(self._buffers):
                self._flush(kind)

    def _flush(self, kind: str) -> None:
        buffer = self._buffers.pop(kind, None)
        if buffer is None or not buffer.parts:
            return
        body = (_HEAD % (SCHEMA_VERSION, kind.encode())) + b",".join(buffer.parts) + b"]}"
        task = asyncio.create_task(self._publish(kind, body, len(buffer.parts), buffer.confirmed))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _publish(self, kind: str, body: bytes, records: int, confirmed: asyncio.Future[None]) -> None:
        message = aio_pika.Message(
            body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, content_type="application/json"
        )
        error: BaseException | None = None
        cancelled = False
        try:
            await publish_confirmed(self._exchange, message, kind)
        except PublishNotConfirmed as exc:
            error = exc
        except asyncio.CancelledError:
            # Stopped before the broker answered: the records are unconfirmed, which their tasks must hear
            # as an error (never as their own cancellation); the cancellation itself goes on below.
            error = PublishNotConfirmed("the telemetry batcher stopped before the broker confirmed")
            cancelled = True
        if not confirmed.done():
            if error is None:
                confirmed.set_result(None)
            else:
                confirmed.set_exception(error)
                confirmed.exception()  # retrieved here: a caller that stopped waiting must not log it
        if error is None:
            self.batches_sent += 1
            self.records_sent += records
            self._refused_in_a_row = 0
        else:
            log.warning("telemetry.batch_not_confirmed", kind=kind, records=records, error=repr(error))
            if not cancelled:
                self._refused(error)
        if cancelled:
            raise asyncio.CancelledError

    async def close(self) -> None:
        """Send what is queued, wait for those confirms, stop. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for kind in list(self._buffers):
            self._flush(kind)
        if self._publishing:
            await asyncio.wait(set(self._publishing))
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task

    def _refused(self, error: BaseException) -> None:
        """Envelopes refused one after another (nacked) mean the channel is not going to recover by
        itself: seen after a cluster node died, where a reconnected channel had every publish nacked
        for 35 s while a fresh one worked. Past ``refused_limit`` in a row, ``on_refused`` (the runtime
        ends the connection's epoch and reconnects) is called, once per run of refusals."""
        self._refused_in_a_row += 1
        if self._refused_in_a_row == self._refused_limit and self._on_refused is not None:
            log.warning(
                "telemetry.broker_refusing_reconnecting", refused=self._refused_in_a_row, error=repr(error)
            )
            self._on_refused()
