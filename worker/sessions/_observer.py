"""What a :class:`worker.sessions.Student` run reports as it goes, for the runtime to turn into telemetry.

``OpenedInfo``, ``StepReport`` and ``CloseReport`` carry exactly the fields of ``schemas.SessionOpened``,
``schemas.StepRecorded`` and ``schemas.SessionClosed`` that the run knows (``as_fields()`` returns them
under the wire names), so the runtime builds a message with e.g.
``StepRecorded(**report.as_fields())`` and adds only what is its own (``attempt``, ``task_metadata``).
Step reports are numbered ``seq`` 1..n in emission order; a close has ``steps == n`` and ``seq == n + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from pydantic import JsonValue

from schemas import Phase, Usage

StepStatus = Literal["ok", "error"]
RunStatus = Literal["succeeded", "failed"]


class _Fields:
    __slots__ = ()

    def as_fields(self) -> dict[str, Any]:
        """The fields by their wire names (a shallow dict; values are not copied)."""
        # __slots__ of a slotted dataclass lists its fields in order; dataclasses.fields() is much slower
        # and this runs for every record a worker emits.
        names: tuple[str, ...] = self.__slots__
        return {name: getattr(self, name) for name in names}


@dataclass(frozen=True, slots=True)
class OpenedInfo(_Fields):
    """The session is open (-> ``schemas.SessionOpened``)."""

    adapter_session_id: str
    task_id: str
    adapter: str
    task: str
    execution_mode: str
    metadata: dict[str, JsonValue]
    opened_at: datetime


@dataclass(frozen=True, slots=True)
class StepReport(_Fields):
    """One adapter step call, ok or failed (-> ``schemas.StepRecorded``)."""

    adapter_session_id: str
    task_id: str
    seq: int
    step_id: int
    phase: Phase
    description: str
    output: JsonValue
    trace: str
    usage: Usage
    events: list[dict[str, JsonValue]]
    started_at: datetime
    finished_at: datetime
    status: StepStatus = "ok"
    error: str | None = None
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class CloseReport(_Fields):
    """The session is closed (-> ``schemas.SessionClosed``); ``seq`` is ``steps + 1``."""

    adapter_session_id: str
    task_id: str
    seq: int
    status: RunStatus
    reason: str | None
    final_answer: str
    plan: dict[str, JsonValue] | None
    totals: Usage
    events: list[dict[str, JsonValue]]
    close_metadata: dict[str, JsonValue]
    steps: int


class SessionObserver(Protocol):
    """Receives a run's reports in order. Each call is awaited before the run goes on (backpressure).

    An exception from any method aborts the run: the session is closed with that exception's text as
    the reason and the exception is re-raised unchanged (no further reports are sent).
    """

    async def opened(self, info: OpenedInfo) -> None: ...

    async def step(self, record: StepReport) -> None: ...

    async def closed(self, report: CloseReport) -> None: ...
