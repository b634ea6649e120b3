"""Student: one session per run, plan -> execute -> synthesize, observer reports, failures, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, cast

import orjson
import pytest

from schemas import SessionClosed, SessionOpened, StepRecorded, Usage, limits
from worker.adapters import DemoAdapter
from worker.sessions import (
    AdapterError,
    AgentAdapter,
    AgentSession,
    CloseReport,
    OpenedInfo,
    PythonAdapter,
    SessionContext,
    StatefulAgentAdapterMixin,
    StepReport,
    Student,
    StudentResult,
)


class RecordingObserver:
    """Records every report in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []

    async def opened(self, info: OpenedInfo) -> None:
        self.log.append(("opened", info))

    async def step(self, record: StepReport) -> None:
        self.log.append(("step", record))

    async def closed(self, report: CloseReport) -> None:
        self.log.append(("closed", report))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.log]

    def steps(self) -> list[StepReport]:
        return [item for kind, item in self.log if kind == "step"]

    def close(self) -> CloseReport:
        kind, report = self.log[-1]
        assert kind == "closed"
        assert isinstance(report, CloseReport)
        return report


class TrackingAdapter(StatefulAgentAdapterMixin):
    """Wraps DemoAdapter sessions, counting opens/closes and recording every step call's metadata."""

    name = "tracking"

    def __init__(self, inner: AgentAdapter | None = None) -> None:
        self.inner = inner or DemoAdapter(steps=3)
        self.opened: list[AgentSession] = []
        self.calls: list[dict[str, Any]] = []
        self.close_reasons: list[str | None] = []

    async def open_session(self, context: SessionContext) -> AgentSession:
        session = await self.inner.open_session(context)
        self.opened.append(session)
        tracker = self

        class Wrapped:
            session_id = session.session_id
            metadata = session.metadata

            async def step(self, payload: Any, metadata: Mapping[str, Any] | None = None) -> Any:
                tracker.calls.append({"payload": payload, **dict(metadata or {})})
                return await session.step(payload, metadata)

            async def close(self, reason: str | None = None) -> dict[str, Any]:
                tracker.close_reasons.append(reason)
                return await session.close(reason)

        return Wrapped()


def scripted(plan_output: Any, *, fail_phase: str | None = None) -> PythonAdapter:
    """A stateless PythonAdapter that answers the plan with ``plan_output`` and echoes other phases."""

    def agent(prompt: str, metadata: dict[str, Any]) -> Any:
        if metadata["phase"] == fail_phase:
            raise RuntimeError(f"{fail_phase} exploded")
        if metadata["phase"] == "plan":
            return plan_output
        return {"output": f"{metadata['phase']}-{metadata['step_id']}", "usage": {"prompt_tokens": 2}}

    return PythonAdapter(agent, name="scripted")


async def test_run_opens_exactly_one_session_and_closes_it() -> None:
    """One run opens one session, makes every call in it, and closes it once with no reason."""
    adapter = TrackingAdapter()
    result = await Student(adapter).run("Write a haiku about queues")
    assert len(adapter.opened) == 1
    assert adapter.close_reasons == [None]
    assert {call["adapter_session_id"] for call in adapter.calls} == {result.adapter_session_id}
    assert result.status == "succeeded"


async def test_calls_count_every_step_call_and_phases_in_order() -> None:
    """A 3-step plan makes 5 calls: plan, 3 executes, synthesize; usage.calls and metadata agree."""
    adapter = TrackingAdapter(DemoAdapter(steps=3))
    result = await Student(adapter).run("Count things")
    assert [c["phase"] for c in adapter.calls] == ["plan", "execute", "execute", "execute", "synthesize"]
    assert [c["step_id"] for c in adapter.calls] == [0, 1, 2, 3, 4]
    assert result.usage.calls == 5
    assert result.metadata["adapter_session"]["usage"]["calls"] == 5
    assert len(result.steps) == 5
    assert result.usage.total_tokens == sum(s.usage.total_tokens for s in result.steps) > 0


async def test_call_metadata_carries_phase_task_mode_and_session() -> None:
    """Every call's metadata has phase, step_id, task, execution_mode and adapter_session_id."""
    adapter = TrackingAdapter(DemoAdapter(steps=2))
    result = await Student(adapter).run("Task T", "batch_mode", task_id="task-1")
    for call in adapter.calls:
        assert call["task"] == "Task T"
        assert call["execution_mode"] == "batch_mode"
        assert call["task_id"] == "task-1"
        assert call["adapter_session_id"] == result.adapter_session_id
        assert isinstance(call["payload"], str)
        assert "Task T" in call["payload"]
    assert result.task_id == "task-1"


async def test_execute_prompts_include_prior_outputs() -> None:
    """The second execute and the synthesis prompts contain the outputs of earlier steps."""
    adapter = TrackingAdapter(DemoAdapter(steps=2))
    result = await Student(adapter).run("Chain")
    first_output = result.steps[1].output
    assert isinstance(first_output, str)
    assert first_output in adapter.calls[2]["payload"]
    assert first_output in adapter.calls[3]["payload"]


async def test_result_shape() -> None:
    """StudentResult carries plan, steps, final answer and the adapter_session metadata block."""
    result = await Student(DemoAdapter(steps=2)).run("Shape check", session_id="fixed-id")
    assert isinstance(result, StudentResult)
    assert result.adapter_session_id == "fixed-id"
    assert result.plan is not None
    assert [s["id"] for s in cast(list[dict[str, Any]], result.plan["steps"])] == [1, 2]
    block = result.metadata["adapter_session"]
    assert set(block) >= {"adapter_session_id", "adapter", "usage", "events", "metadata", "close_metadata"}
    assert block["adapter"] == "demo"
    assert block["close_metadata"]["turns"] == 4
    assert block["events"] == [e for s in result.steps for e in s.events]
    assert result.final_answer.startswith("Answer to 'Shape check'")


async def test_plan_from_json_string_with_custom_ids() -> None:
    """A JSON plan string with its own ids drives execute step ids; synthesize gets max id + 1."""
    plan = '{"steps": [{"id": 10, "description": "a"}, {"id": 20, "description": "b", "depends_on": [10]}]}'
    result = await Student(scripted(plan)).run("custom ids")
    assert [(s.phase, s.step_id) for s in result.steps] == [
        ("plan", 0), ("execute", 10), ("execute", 20), ("synthesize", 21),
    ]  # fmt: skip
    assert result.plan == {
        "steps": [
            {"id": 10, "description": "a", "depends_on": []},
            {"id": 20, "description": "b", "depends_on": [10]},
        ]
    }
    assert result.final_answer == "synthesize-21"
    assert result.metadata["plan_fallback"] is False


async def test_unparsable_plan_falls_back_to_single_step() -> None:
    """Plan output that is not a plan gives one step whose description is the task."""
    result = await Student(scripted("I refuse to plan")).run("Do the thing")
    assert result.plan == {"steps": [{"id": 1, "description": "Do the thing", "depends_on": []}]}
    assert [(s.phase, s.step_id) for s in result.steps] == [("plan", 0), ("execute", 1), ("synthesize", 2)]
    assert result.metadata["plan_fallback"] is True


class _HugeCounts:
    """Every call reports the most tokens a count may hold (each report valid on its own)."""

    def on_step(self, metadata: dict[str, Any]) -> Any:
        big = limits.MAX_COUNT
        usage = {"prompt_tokens": big, "completion_tokens": 1, "total_tokens": big}
        if metadata["phase"] == "plan":
            return {"output": {"steps": [{"id": 1, "description": "do it"}]}, "usage": usage}
        return {"output": "done", "usage": usage}


async def test_session_totals_are_the_step_sums_saturating_at_the_count_limit() -> None:
    """The close's totals (and the result's usage) sum the steps' reports, each count saturating at
    MAX_COUNT instead of breaking the limit; calls count the three step calls."""
    observer = RecordingObserver()
    result = await Student(PythonAdapter(_HugeCounts(), name="huge")).run("count", observer=observer)
    totals = observer.close().totals
    assert (totals.prompt_tokens, totals.total_tokens) == (limits.MAX_COUNT, limits.MAX_COUNT)
    assert (totals.completion_tokens, totals.calls) == (3, 3)
    assert result.usage == totals
    assert [s.usage.prompt_tokens for s in observer.steps()] == [limits.MAX_COUNT] * 3


async def test_plan_as_list_gets_default_ids() -> None:
    """A plan given as a list of strings is numbered 1..n."""
    result = await Student(scripted(["first", "second"])).run("list plan")
    assert [s.step_id for s in result.steps if s.phase == "execute"] == [1, 2]
    assert [s.description for s in result.steps if s.phase == "execute"] == ["first", "second"]


async def test_observer_receives_seq_consistent_reports() -> None:
    """opened, one step report per call with seq 1..n, then closed with steps == n and seq == n + 1."""
    observer = RecordingObserver()
    result = await Student(DemoAdapter(steps=3)).run("Observe me", observer=observer)
    assert observer.kinds() == ["opened", "step", "step", "step", "step", "step", "closed"]
    steps = observer.steps()
    assert [s.seq for s in steps] == [1, 2, 3, 4, 5]
    assert steps == result.steps
    close = observer.close()
    assert (close.status, close.steps, close.seq) == ("succeeded", 5, 6)
    assert close.final_answer == result.final_answer
    assert close.totals == result.usage
    assert close.events == [e for s in steps for e in s.events]
    assert all(s.finished_at >= s.started_at and s.started_at.tzinfo is not None for s in steps)
    assert steps[1].trace.startswith("Task: Observe me")


async def test_reports_convert_one_to_one_into_wire_messages() -> None:
    """as_fields() of each report builds the matching schemas model without extra data."""
    observer = RecordingObserver()
    await Student(DemoAdapter()).run("Wire check", task_id="wire-1", observer=observer)
    opened = SessionOpened(**observer.log[0][1].as_fields())
    steps = [StepRecorded(**s.as_fields()) for s in observer.steps()]
    closed = SessionClosed(**observer.close().as_fields())
    assert opened.task_id == "wire-1"
    assert opened.adapter == "demo"
    assert [s.seq for s in steps] == list(range(1, len(steps) + 1))
    assert closed.steps == len(steps)
    assert closed.plan is not None


async def test_adapter_failure_closes_failed_and_raises_adapter_error() -> None:
    """An execute failure: error step report, session closed with the reason, failed close, AdapterError."""
    adapter = TrackingAdapter(DemoAdapter(steps=2, fail_on="boom"))
    observer = RecordingObserver()
    with pytest.raises(AdapterError) as info:
        await Student(adapter).run("this will boom", observer=observer)
    exc = info.value
    assert "boom" in exc.reason
    assert (exc.phase, exc.step_id) == ("execute", 1)
    assert adapter.close_reasons == [exc.reason]
    assert observer.kinds() == ["opened", "step", "step", "closed"]
    error_step = observer.steps()[-1]
    assert (error_step.status, error_step.error, error_step.output) == ("error", exc.reason, None)
    assert error_step.usage == Usage(calls=1)
    close = observer.close()
    assert (close.status, close.reason, close.steps) == ("failed", exc.reason, 2)
    assert exc.result is not None
    assert exc.result.status == "failed"
    assert exc.result.usage.calls == 2
    assert exc.result.metadata["adapter_session"]["close_metadata"]["reason"] == exc.reason
    assert isinstance(exc.__cause__, RuntimeError)


async def test_plan_failure_has_no_plan() -> None:
    """A failing plan step gives a partial result without a plan and a failed close with plan None."""
    observer = RecordingObserver()
    with pytest.raises(AdapterError) as info:
        await Student(scripted({}, fail_phase="plan")).run("x", observer=observer)
    assert info.value.result is not None
    assert info.value.result.plan is None
    assert observer.close().plan is None
    assert info.value.reason == "plan exploded"


async def test_observer_exception_aborts_run_and_closes_session() -> None:
    """An observer error is re-raised as is after the session is closed with its text; no close report."""

    class Flaky(RecordingObserver):
        async def step(self, record: StepReport) -> None:
            await super().step(record)
            if record.seq == 2:
                raise ConnectionError("telemetry sink down")

    adapter = TrackingAdapter()
    observer = Flaky()
    with pytest.raises(ConnectionError, match="telemetry sink down"):
        await Student(adapter).run("obs", observer=observer)
    assert adapter.close_reasons == ["telemetry sink down"]
    assert observer.kinds() == ["opened", "step", "step"]


async def test_cancellation_closes_session_and_propagates() -> None:
    """Cancelling a run mid-step closes the session with reason 'cancelled' and raises CancelledError."""
    started = asyncio.Event()

    class Slow:
        def __init__(self) -> None:
            self.reason: str | None = "not closed"

        async def on_step(self, metadata: dict[str, Any]) -> Any:
            if metadata["phase"] == "execute":
                started.set()
                await asyncio.Event().wait()
            return {"steps": ["only"]}

        def on_close(self, reason: str | None) -> None:
            closed_with.append(reason)

    closed_with: list[str | None] = []
    observer = RecordingObserver()
    task = asyncio.create_task(Student(PythonAdapter(Slow)).run("slow", observer=observer))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed_with == ["cancelled"]
    assert "closed" not in observer.kinds()


async def test_open_retries_then_succeeds() -> None:
    """Two failed opens are retried with exponential backoff; the third opens a real session."""

    class Flaky(DemoAdapter):
        def __init__(self) -> None:
            super().__init__(steps=1)
            self.attempts = 0

        async def open_session(self, context: SessionContext) -> AgentSession:
            self.attempts += 1
            if self.attempts < 3:
                raise ConnectionError(f"refused {self.attempts}")
            return await super().open_session(context)

    adapter = Flaky()
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await Student(adapter, open_backoff_s=0.02).run("retry")
    # Backoff takes up to 20 % off each delay (jitter): two waits of at least 0.8 x 0.02 and 0.8 x 0.04 s.
    assert loop.time() - started >= 0.8 * (0.02 + 0.04)
    assert adapter.attempts == 3
    assert result.metadata["adapter_session"]["open_attempts"] == 3
    assert result.metadata["adapter_session"]["fallback"] is False
    assert "demo" in result.metadata["adapter_session"]["metadata"]


async def test_open_failures_fall_back_to_stateless_session() -> None:
    """After max_open_attempts failures, a StatelessSession over ainvoke runs the task, marked fallback."""

    class NeverOpens(StatefulAgentAdapterMixin):
        name = "never"

        def __init__(self) -> None:
            self.attempts = 0
            self.invoked: list[dict[str, Any]] = []

        async def open_session(self, context: SessionContext) -> AgentSession:
            self.attempts += 1
            raise ConnectionError(f"no sessions today{'' if context.task_id else '!'}")

        async def ainvoke(self, prompt: Any, metadata: Mapping[str, Any] | None = None) -> Any:
            self.invoked.append({"prompt": prompt, **dict(metadata or {})})
            return orjson.dumps({"steps": ["s"]}).decode() if self.invoked[-1]["phase"] == "plan" else "done"

    adapter = NeverOpens()
    observer = RecordingObserver()
    result = await Student(adapter, max_open_attempts=3, open_backoff_s=0).run("fb", observer=observer)
    assert adapter.attempts == 3
    assert result.status == "succeeded"
    assert result.final_answer == "done"
    meta = result.metadata["adapter_session"]["metadata"]
    assert meta["fallback"] is True
    assert meta["open_error"] == "no sessions today"
    assert result.metadata["adapter_session"]["fallback"] is True
    assert observer.log[0][1].metadata["fallback"] is True
    assert {m["adapter_session_id"] for m in adapter.invoked} == {result.adapter_session_id}


async def test_session_scope_opens_once_and_closes() -> None:
    """session_scope yields one session (task in context.extra) and closes it, also on error."""
    seen: list[SessionContext] = []

    class Spy(DemoAdapter):
        async def open_session(self, context: SessionContext) -> AgentSession:
            seen.append(context)
            return await super().open_session(context)

    student = Student(Spy())
    async with student.session_scope("scoped task", "stepwise", user_context={"u": 1}) as session:
        outcome = await session.step("hello")
        assert outcome.output == "[turn 1] hello"
    assert (await session.close())["reason"] is None
    with pytest.raises(LookupError):
        async with student.session_scope("t", "stepwise", task_id="tid", session_id="sid") as failing:
            raise LookupError("missing")
    assert (await failing.close())["reason"] == "missing"
    assert [c.extra["task"] for c in seen] == ["scoped task", "t"]
    assert seen[0].user_context == {"u": 1}
    assert (seen[1].task_id, seen[1].session_id) == ("tid", "sid")


async def test_fifty_concurrent_runs_do_not_cross_talk() -> None:
    """50 concurrent runs of a stateful class adapter each see only their own session's state."""

    class Diary:
        def __init__(self) -> None:
            self.entries: list[str] = []
            self.task: str | None = None

        def on_open(self, context: SessionContext) -> None:
            self.task = str(context.extra["task"])

        async def on_step(self, metadata: dict[str, Any]) -> Any:
            assert metadata["task"] == self.task
            self.entries.append(str(metadata["step_id"]))
            await asyncio.sleep(0.001 * (hash(self.task) % 3))
            if metadata["phase"] == "plan":
                return {"steps": [f"{self.task}-a", f"{self.task}-b"]}
            return f"{self.task}:{','.join(self.entries)}"

    student = Student(PythonAdapter(Diary))
    tasks = [f"task{i}" for i in range(50)]
    results = await asyncio.gather(*(student.run(t) for t in tasks))
    assert [r.final_answer for r in results] == [f"{t}:0,1,2,3" for t in tasks]
    assert len({r.adapter_session_id for r in results}) == 50


async def test_concurrent_demo_runs_match_sequential_runs() -> None:
    """Concurrent DemoAdapter runs produce exactly what the same runs produce one by one."""
    student = Student(DemoAdapter(latency_s=0.001))
    tasks = [f"concurrent task number {i}" for i in range(50)]
    together = await asyncio.gather(*(student.run(t) for t in tasks))
    alone = [await student.run(t) for t in tasks[:5]]
    for a, b in zip(together[:5], alone, strict=True):
        assert (a.final_answer, a.plan, a.usage) == (b.final_answer, b.plan, b.usage)


def test_student_validates_arguments() -> None:
    """max_open_attempts must be >= 1 and the backoff non-negative."""
    with pytest.raises(ValueError, match="max_open_attempts"):
        Student(DemoAdapter(), max_open_attempts=0)
    with pytest.raises(ValueError, match="open_backoff_s"):
        Student(DemoAdapter(), open_backoff_s=-1)
