"""One Student run inside one open session: plan -> execute per plan step -> synthesize, with reports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from pydantic import JsonValue

from schemas import Phase, Usage, cut_chars, limits, utcnow
from worker.sessions._errors import AdapterError, describe_exception
from worker.sessions._json import to_json_object, to_jsonable, to_text
from worker.sessions._observer import CloseReport, OpenedInfo, RunStatus, SessionObserver, StepReport
from worker.sessions._outcome import StepOutcome, normalize_outcome
from worker.sessions._plan import execute_prompt, parse_plan, plan_prompt, synthesize_prompt
from worker.sessions._result import StudentResult

if TYPE_CHECKING:
    from worker.sessions._context import SessionContext
    from worker.sessions._session import AgentSession

# A description, a trace or a final answer past the wire contract's limits (schemas.limits) is reported
# whole: the storable rule cuts it when the record is made, with a marker and a note in the record's
# ``limits``, so a trainer can tell a cut value from a short one. A failure reason is cut here, where it is
# made: it also goes to the ledger and to dead-letter headers.
_MAX_REASON: Final = limits.MAX_REASON_CHARS
_ONE_CALL: Final = Usage(calls=1)


@dataclass(frozen=True, slots=True)
class _Call:
    phase: Phase
    step_id: int
    description: str
    payload: str
    started_at: datetime


class StepFailedError(Exception):
    """Internal: an adapter step failed; carries where and the reason."""

    def __init__(self, reason: str, phase: Phase, step_id: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.phase: Phase = phase
        self.step_id = step_id


class Run:
    """The state of one run. Nothing here is shared between runs."""

    def __init__(
        self,
        *,
        adapter_name: str,
        session: AgentSession,
        context: SessionContext,
        task: str,
        observer: SessionObserver | None,
        open_attempts: int,
        fallback: bool,
    ) -> None:
        self.adapter_name = adapter_name
        self.session = session
        self.session_id = session.session_id
        self.context = context
        self.task = task
        self.observer = observer
        self.open_attempts = open_attempts
        self.fallback = fallback
        self.reports: list[StepReport] = []
        # prompt, completion, total tokens and calls, summed per step; a Usage only when read (``totals``):
        # adding Usage models built one per step, ~2 us each on every step of every task.
        self._sums = [0, 0, 0, 0]
        self.events: list[dict[str, JsonValue]] = []
        self.plan: dict[str, JsonValue] | None = None
        self.plan_fallback = False
        self.final_answer = ""
        # What every step's call metadata carries besides its phase, id and description.
        self._call_base = {
            "task": task,
            "task_id": context.task_id,
            "execution_mode": context.execution_mode,
            "adapter_session_id": self.session_id,
        }

    async def execute(self) -> StudentResult:
        try:
            if self.observer is not None:
                await self.observer.opened(self._opened_info())
            await self._phases()
        except StepFailedError as failure:
            close_metadata = await self._close(failure.reason)
            result = self._result("failed", close_metadata)
            if self.observer is not None:
                await self.observer.closed(self._close_report("failed", failure.reason, close_metadata))
            raise AdapterError(
                failure.reason, result=result, phase=failure.phase, step_id=failure.step_id
            ) from failure.__cause__
        except BaseException as exc:  # observer failure, cancellation, bug: close, then re-raise as is
            await self._close(cut_chars(describe_exception(exc), _MAX_REASON))
            raise
        close_metadata = await self._close(None)
        if self.observer is not None:
            await self.observer.closed(self._close_report("succeeded", None, close_metadata))
        return self._result("succeeded", close_metadata)

    async def _phases(self) -> None:
        outcome = await self._step("plan", 0, "Plan the steps for the task", plan_prompt(self.task))
        self.plan, self.plan_fallback = parse_plan(outcome.output, self.task)
        outputs: list[tuple[int, str, Any]] = []
        steps: list[Any] = self.plan["steps"]  # type: ignore[assignment]
        for step in steps:
            step_id, description = int(step["id"]), str(step["description"])
            payload = execute_prompt(self.task, step_id, description, outputs)
            outcome = await self._step("execute", step_id, description, payload)
            outputs.append((step_id, description, outcome.output))
        final_id = max(int(step["id"]) for step in steps) + 1
        payload = synthesize_prompt(self.task, outputs)
        outcome = await self._step("synthesize", final_id, "Synthesize the final answer", payload)
        self.final_answer = to_text(outcome.output)

    async def _step(self, phase: Phase, step_id: int, description: str, payload: str) -> StepOutcome:
        call_metadata = {"phase": phase, "step_id": step_id, "description": description, **self._call_base}
        call = _Call(phase, step_id, description, payload, utcnow())
        try:
            outcome = normalize_outcome(await self.session.step(payload, call_metadata))
        except Exception as exc:  # any adapter failure (or an un-normalisable result) fails the step
            reason = cut_chars(describe_exception(exc), _MAX_REASON)
            await self._emit(call, output=None, usage=_ONE_CALL, events=[], error=reason)
            raise StepFailedError(reason, phase, step_id) from exc
        # ``calls`` counts step calls (the wire contract), whatever the adapter reported.
        usage = outcome.usage if outcome.usage.calls == 1 else outcome.usage.model_copy(update={"calls": 1})
        await self._emit(call, output=outcome.output, usage=usage, events=outcome.events)
        return outcome

    async def _emit(
        self,
        call: _Call,
        *,
        output: JsonValue,
        usage: Usage,
        events: list[dict[str, JsonValue]],
        error: str | None = None,
    ) -> None:
        report = StepReport(
            adapter_session_id=self.session_id,
            task_id=self.context.task_id,
            seq=len(self.reports) + 1,
            step_id=call.step_id,
            phase=call.phase,
            description=call.description,
            output=output,
            trace=call.payload,
            usage=usage,
            events=events,
            started_at=call.started_at,
            finished_at=utcnow(),
            status="ok" if error is None else "error",
            error=error,
        )
        self.reports.append(report)
        sums = self._sums
        sums[0] += usage.prompt_tokens
        sums[1] += usage.completion_tokens
        sums[2] += usage.total_tokens
        sums[3] += usage.calls
        self.events.extend(events)
        if self.observer is not None:
            await self.observer.step(report)

    @property
    def totals(self) -> Usage:
        """The session's usage so far, each count saturating at ``MAX_COUNT`` (as ``Usage + Usage`` does)."""
        return Usage.saturated(*self._sums)

    async def _close(self, reason: str | None) -> dict[str, JsonValue]:
        try:
            closed: Any = await self.session.close(reason)
        except Exception as exc:  # noqa: BLE001 -- a close must not turn a finished run into a failure; it is recorded
            closed = {"close_error": describe_exception(exc)}
        if isinstance(closed, Mapping):
            return to_json_object(closed)
        return {} if closed is None else {"result": to_jsonable(closed)}

    def _opened_info(self) -> OpenedInfo:
        return OpenedInfo(
            adapter_session_id=self.session_id,
            task_id=self.context.task_id,
            adapter=self.adapter_name,
            task=self.task,
            execution_mode=self.context.execution_mode,
            metadata=to_json_object(self.session.metadata),
            opened_at=utcnow(),
        )

    def _close_report(
        self, status: RunStatus, reason: str | None, close_metadata: dict[str, JsonValue]
    ) -> CloseReport:
        return CloseReport(
            adapter_session_id=self.session_id,
            task_id=self.context.task_id,
            seq=len(self.reports) + 1,
            status=status,
            reason=reason,
            final_answer=self.final_answer,
            plan=self.plan,
            totals=self.totals,
            events=list(self.events),
            close_metadata=close_metadata,
            steps=len(self.reports),
        )

    def _result(self, status: RunStatus, close_metadata: dict[str, JsonValue]) -> StudentResult:
        totals = self.totals  # built from the sums on each read: once here
        adapter_session: dict[str, Any] = {
            "adapter_session_id": self.session_id,
            "adapter": self.adapter_name,
            "usage": totals.model_dump(),
            "events": list(self.events),
            "metadata": to_json_object(self.session.metadata),
            "close_metadata": close_metadata,
            "fallback": self.fallback,
            "open_attempts": self.open_attempts,
        }
        return StudentResult(
            task_id=self.context.task_id,
            task=self.task,
            execution_mode=self.context.execution_mode,
            adapter_session_id=self.session_id,
            plan=self.plan,
            steps=list(self.reports),
            final_answer=self.final_answer,
            status=status,
            usage=totals,
            metadata={"adapter_session": adapter_session, "plan_fallback": self.plan_fallback},
        )
