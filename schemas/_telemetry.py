"""Telemetry: what a worker reports about one adapter session.

A session produces ``session.opened`` (seq 0), one ``step`` per adapter call (seq 1..n), and
``session.closed`` (seq n+1, with ``steps == n``). ``(adapter_session_id, seq)`` identifies a message,
so a consumer detects duplicates, and a close tells it how many steps to wait for.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import AwareDatetime, Field, model_validator

from schemas._base import SCHEMA_VERSION, Identifier, Int4, Json, JsonObject, WireModel
from schemas._task import ExecutionMode, utcnow
from schemas._usage import Event, Usage
from schemas.limits import MAX_REASON_CHARS, MAX_SESSION_EVENTS, MAX_TASK_CHARS, MAX_TRACE_CHARS

Phase = Literal["plan", "execute", "synthesize"]
SessionStatus = Literal["succeeded", "failed", "abandoned"]
StepStatus = Literal["ok", "error"]

ROUTING_KEYS: Final = ("session.opened", "step", "session.closed")


class _TelemetryBase(WireModel):
    schema_version: Literal[1] = SCHEMA_VERSION
    adapter_session_id: Identifier
    task_id: Identifier
    seq: Int4
    emitted_at: AwareDatetime = Field(default_factory=utcnow)
    limits: JsonObject = Field(default_factory=dict)
    """What the storable rule changed in this record, by field (``schemas.storable``); empty when nothing."""


class SessionOpened(_TelemetryBase):
    """The adapter session is open; the ingestor records it as ``running``."""

    kind: Literal["session.opened"] = "session.opened"
    seq: Literal[0] = 0
    adapter: Identifier
    task: str = Field(max_length=MAX_TASK_CHARS)
    execution_mode: ExecutionMode = "stepwise"
    attempt: Annotated[Int4, Field(ge=1)] = 1
    """1 for the first run of a task, +1 for each retry after a failure or a lost worker."""
    metadata: JsonObject = Field(default_factory=dict)
    """The adapter session's own metadata (what ``session.metadata`` held after open)."""
    task_metadata: JsonObject = Field(default_factory=dict)
    opened_at: AwareDatetime = Field(default_factory=utcnow)


class StepRecorded(_TelemetryBase):
    """One adapter call inside the session: the plan, one execute per plan step, or the synthesis."""

    kind: Literal["step"] = "step"
    seq: Annotated[Int4, Field(ge=1)]
    step_id: Int4
    phase: Phase
    description: str = Field(default="", max_length=MAX_TASK_CHARS)
    output: Json = None
    trace: str = Field(default="", max_length=MAX_TRACE_CHARS)
    usage: Usage = Field(default_factory=Usage)
    events: list[Event] = Field(default_factory=list)
    started_at: AwareDatetime
    finished_at: AwareDatetime
    status: StepStatus = "ok"
    error: str | None = Field(default=None, max_length=MAX_REASON_CHARS)
    attempts: Annotated[Int4, Field(ge=1)] = 1

    @model_validator(mode="after")
    def _timings_in_order(self) -> StepRecorded:
        if self.finished_at < self.started_at:
            raise ValueError("finished_at is before started_at")
        if self.status == "error" and not self.error:
            raise ValueError("a step with status 'error' must say what the error was")
        return self


class SessionClosed(_TelemetryBase):
    """The session is over; ``steps`` says how many step messages precede it (seq 1..steps)."""

    kind: Literal["session.closed"] = "session.closed"
    seq: Annotated[Int4, Field(ge=1)]
    status: SessionStatus
    reason: str | None = Field(default=None, max_length=MAX_REASON_CHARS)
    final_answer: str = Field(default="", max_length=MAX_TRACE_CHARS)
    plan: JsonObject | None = None
    totals: Usage = Field(default_factory=Usage)
    events: list[Event] = Field(default_factory=list, max_length=MAX_SESSION_EVENTS)
    """The session's newest ``MAX_SESSION_EVENTS`` adapter events, in order (the ``adapter_events``
    column); every event is also in its own step record."""
    close_metadata: JsonObject = Field(default_factory=dict)
    steps: Int4
    closed_at: AwareDatetime = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _seq_follows_steps(self) -> SessionClosed:
        if self.seq != self.steps + 1:
            raise ValueError(f"seq {self.seq} of a close must be steps + 1 = {self.steps + 1}")
        return self


TelemetryMessage = Annotated[SessionOpened | StepRecorded | SessionClosed, Field(discriminator="kind")]


class TelemetryBatch(WireModel):
    """What one AMQP telemetry message carries: one or more records of ONE kind (the routing key).

    Workers coalesce the records of many concurrent sessions into one broker message per kind and
    flush window, so a task costs a fraction of a publish instead of one publish per record; every
    record still carries its own ``adapter_session_id`` / ``task_id`` / ``seq``.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["session.opened", "step", "session.closed"]
    records: list[TelemetryMessage] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_kind(self) -> TelemetryBatch:
        for record in self.records:
            if record.kind != self.kind:
                raise ValueError(f"a {self.kind!r} batch holds a {record.kind!r} record")
        return self
