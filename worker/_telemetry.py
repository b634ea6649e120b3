"""Streaming a session's telemetry to the broker while the Student runs it.

Opened and step messages are published as they happen, pipelined (no waiting per message); ``flush``
waits for every confirm. The close is held back: the runtime records success in the task ledger first,
then publishes the close (see ``worker._runtime``), so a lost ack never re-runs a succeeded task.
"""

from __future__ import annotations

import asyncio
from typing import Final

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange
from aio_pika.exceptions import AMQPError

from schemas import SessionClosed, SessionOpened, SessionStatus, StepRecorded, TaskMessage, encode
from worker._errors import WorkerError
from worker._observer import CloseReport, OpenedInfo, StepReport

_PERSISTENT: Final = aio_pika.DeliveryMode.PERSISTENT


class TelemetryError(WorkerError):
    """The broker did not confirm a telemetry message: the task must not be acked."""


def telemetry_message(body: bytes, message_id: str) -> aio_pika.Message:
    return aio_pika.Message(
        body, delivery_mode=_PERSISTENT, content_type="application/json", message_id=message_id
    )


class TelemetryPublisher:
    """A :class:`worker.SessionObserver` that turns reports into wire messages on the telemetry exchange."""

    def __init__(self, exchange: AbstractExchange, task: TaskMessage, *, adapter: str, attempt: int) -> None:
        self._exchange = exchange
        self._task = task
        self._adapter = adapter
        self._attempt = attempt
        self._pending: list[asyncio.Future[object]] = []
        self.adapter_session_id: str | None = None
        self.steps = 0
        self.close: SessionClosed | None = None

    async def opened(self, info: OpenedInfo) -> None:
        self.adapter_session_id = info.adapter_session_id
        fields = info.as_fields()
        # The wire names the adapter as the worker's registry does (what tasks ask for).
        fields.update(adapter=self._adapter, attempt=self._attempt, task_metadata=self._task.metadata)
        self._send(SessionOpened(**fields))

    async def step(self, record: StepReport) -> None:
        self.steps = record.seq
        self._send(StepRecorded(**record.as_fields()))

    async def closed(self, report: CloseReport) -> None:
        self.close = SessionClosed(**report.as_fields())

    def close_instead(self, status: SessionStatus, reason: str) -> SessionClosed | None:
        """Re-state the close for a session cut short (timeout, shutdown); None if none was opened."""
        if self.adapter_session_id is None:
            return None
        if self.close is not None:
            self.close = self.close.model_copy(update={"status": status, "reason": reason})
        else:
            self.close = SessionClosed(
                adapter_session_id=self.adapter_session_id,
                task_id=self._task.task_id,
                seq=self.steps + 1,
                steps=self.steps,
                status=status,
                reason=reason,
            )
        return self.close

    def publish_close(self) -> None:
        if self.close is not None:
            self._send(self.close)

    def _send(self, message: SessionOpened | StepRecorded | SessionClosed) -> None:
        body = encode(message)
        amqp = telemetry_message(body, f"{message.adapter_session_id}:{message.seq}")
        self._pending.append(asyncio.ensure_future(self._exchange.publish(amqp, message.kind)))

    async def flush(self) -> None:
        """Wait until the broker confirmed everything sent so far; raise :class:`TelemetryError` if not."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        results = await asyncio.gather(*pending, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise TelemetryError(f"telemetry not confirmed by the broker: {result!r}") from result
            if not isinstance(result, aiormq.spec.Basic.Ack):
                raise TelemetryError(f"telemetry not confirmed by the broker: {type(result).__name__}")

    def cancel(self) -> None:
        for fut in self._pending:
            fut.cancel()
        self._pending = []


async def republish_close(exchange: AbstractExchange, close_body: bytes, message_id: str) -> None:
    """Send again the stored close of a task that already succeeded (its first send may have been lost)."""
    try:
        confirm = await exchange.publish(telemetry_message(close_body, message_id), "session.closed")
    except (AMQPError, aiormq.exceptions.AMQPError, OSError) as exc:
        raise TelemetryError(f"stored close not confirmed: {exc!r}") from exc
    if not isinstance(confirm, aiormq.spec.Basic.Ack):
        raise TelemetryError(f"stored close not confirmed: {type(confirm).__name__}")
