"""Streaming a session's telemetry to the broker while the Student runs it.

Opened and step messages are published as they happen, pipelined (no waiting per message); ``flush``
waits for every confirm. The close is held back: the runtime records success in the task ledger first,
then publishes the close (see ``worker.runtime._taskrun``), so a lost ack never re-runs a succeeded task.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any, Final

import structlog
from pydantic import TypeAdapter, ValidationError

from atlas_common import BROKER_ERRORS
from schemas import (
    SCHEMA_VERSION,
    DecodeError,
    Identifier,
    SessionClosed,
    SessionStatus,
    TaskMessage,
    decode_telemetry,
    storable,
    storable_fields,
    utcnow,
)
from worker.runtime._batcher import TelemetryBatcher
from worker.runtime._errors import WorkerRuntimeError
from worker.sessions import CloseReport, OpenedInfo, StepReport


class TelemetryError(WorkerRuntimeError):
    """The broker did not confirm a telemetry message: the task must not be acked."""


_OPENED: Final = {"schema_version": SCHEMA_VERSION, "kind": "session.opened"}
_STEP: Final = {"schema_version": SCHEMA_VERSION, "kind": "step"}
_SESSION_ID: Final = TypeAdapter(Identifier)
FINAL_ATTEMPT: Final = "final_attempt"
"""The close-metadata key that says whether a session is its task's last run (read by the JSONL lines)."""


class TelemetryPublisher:
    """A :class:`worker.sessions.SessionObserver` that turns reports into wire messages on the telemetry
    exchange.

    Opened and step records go from the reports' plain fields straight to bytes (``storable_fields``: orjson
    and a few byte scans, no model, no re-validation): the reports are typed dataclasses that the Student
    filled with wire values (aware UTC times, normalised usage and events; text past its limit is cut by
    the storable rule, with its note), so validating them again would only cost CPU on the hottest path.
    The test ``test_worker_records_validate`` keeps this honest by decoding what a real run emits.

    Every record goes through :func:`schemas.storable` before it is sent, so nothing published is refused
    downstream (too large, NUL, numbers or nesting storage cannot hold); ``close_body`` is the close's
    bytes exactly as published, which the task ledger keeps.
    """

    def __init__(self, batcher: TelemetryBatcher, task: TaskMessage, *, adapter: str, attempt: int) -> None:
        self._batcher = batcher
        self._task = task
        self._adapter = adapter
        self._attempt = attempt
        self._pending: list[asyncio.Future[None]] = []
        self.adapter_session_id: str | None = None
        self.opened_at: datetime | None = None
        self.step_seconds: list[tuple[str, float]] = []
        self.steps = 0
        self.close: SessionClosed | None = None
        self.close_body = b""

    async def opened(self, info: OpenedInfo) -> None:
        try:
            _SESSION_ID.validate_python(info.adapter_session_id)
        except ValidationError:
            # Every record of the session would be refused downstream: fail the session now, saying why.
            raise ValueError(
                f"the adapter's session id {info.adapter_session_id[:100]!r} is not a valid identifier "
                "(1-200 characters: letters, digits and _.:@/-, starting with a letter or digit)"
            ) from None
        self.adapter_session_id = info.adapter_session_id
        self.opened_at = info.opened_at
        # Every log line of the rest of this task (its own asyncio task context) names the session.
        structlog.contextvars.bind_contextvars(adapter_session_id=info.adapter_session_id)
        fields = info.as_fields()
        # The wire names the adapter as the worker's registry does (what tasks ask for).
        fields.update(
            _OPENED,
            seq=0,
            adapter=self._adapter,
            attempt=self._attempt,
            task_metadata=self._task.metadata,
            emitted_at=utcnow(),
            limits={},
        )
        self._send(fields)

    async def step(self, record: StepReport) -> None:
        self.steps = record.seq
        self.step_seconds.append((record.phase, (record.finished_at - record.started_at).total_seconds()))
        fields = record.as_fields()
        # Emitted as the step finished (the Student reports it at once): no second clock read per step.
        fields.update(_STEP, emitted_at=record.finished_at, limits={})
        self._send(fields)

    async def closed(self, report: CloseReport) -> None:
        now = utcnow()
        fields = report.as_fields()
        if report.status == "succeeded":
            # A task that succeeded is never run again: this run is its last (see ``mark_final``).
            fields["close_metadata"] = {**report.close_metadata, FINAL_ATTEMPT: True}
        self._set_close(SessionClosed.model_construct(**fields, emitted_at=now, closed_at=now, limits={}))

    def mark_final(self, final: bool) -> None:
        """Record in the close's metadata whether this run is its task's last (``final_attempt``): the
        runtime's retry decision, made before the close is published, so each JSONL line of a failed task
        says whether a retry follows. The key is the worker's: it replaces one the adapter put there."""
        if self.close is not None:
            close_metadata = {**self.close.close_metadata, FINAL_ATTEMPT: final}
            self._set_close(self.close.model_copy(update={"close_metadata": close_metadata}))

    def close_instead(self, status: SessionStatus, reason: str) -> SessionClosed | None:
        """Re-state the close for a session cut short (timeout, shutdown, taken over); None if no session
        was opened."""
        if self.adapter_session_id is None:
            return None
        if self.close is not None:
            self._set_close(self.close.model_copy(update={"status": status, "reason": reason}))
        else:
            self._set_close(
                SessionClosed(
                    adapter_session_id=self.adapter_session_id,
                    task_id=self._task.task_id,
                    seq=self.steps + 1,
                    steps=self.steps,
                    status=status,
                    reason=reason,
                )
            )
        return self.close

    def _set_close(self, close: SessionClosed) -> None:
        record, self.close_body = storable(close)
        assert isinstance(record, SessionClosed)  # noqa: S101 -- storable keeps the kind
        self.close = record

    def publish_close(self) -> None:
        if self.close is not None:
            self._pending.append(self._batcher.send(self.close.kind, self.close_body))

    def _send(self, fields: dict[str, Any]) -> None:
        """Plain fields to storable bytes (no model on this path: ``schemas.storable_fields``), queued."""
        self._pending.append(self._batcher.send(fields["kind"], storable_fields(fields)))

    async def flush(self) -> None:
        """Wait until the broker confirmed everything sent so far; raise :class:`TelemetryError` if not
        (refused, lost, or no answer within the batcher's deadline)."""
        pending, self._pending = self._pending, []
        try:
            # Records share their envelope's future: each distinct one is awaited once. Each has a deadline
            # of its own (the batcher's ``confirm_timeout_s``): no timeout scope here.
            for confirmed in dict.fromkeys(pending):
                await confirmed
        except Exception as exc:  # the broker's answer, whatever it is: this task must not be acked
            raise TelemetryError(f"telemetry not confirmed by the broker: {exc!r}") from exc

    def cancel(self) -> None:
        """Stop waiting for what was sent (the futures are their envelopes', shared: never cancelled)."""
        self._pending = []


async def republish_close(batcher: TelemetryBatcher, close_body: bytes) -> None:
    """Send again the stored close of a task that already succeeded (its first send may have been lost)."""
    try:
        close = decode_telemetry(close_body)
        await batcher.send(close.kind, close_body)
    except DecodeError as exc:
        raise TelemetryError(f"the ledger's stored close does not decode: {exc}") from exc
    except BROKER_ERRORS as exc:
        raise TelemetryError(f"stored close not confirmed: {exc!r}") from exc
