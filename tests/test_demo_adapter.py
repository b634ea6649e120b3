"""DemoAdapter: deterministic plans/outputs/usage, tool events, per-session state, latency, fail_on."""

from __future__ import annotations

import asyncio
import time

import pytest

from worker.adapters import DemoAdapter, DemoFailureError
from worker.sessions import AdapterError, SessionContext, Student

CTX = SessionContext(task_id="t", execution_mode="stepwise")


async def test_same_task_same_result() -> None:
    """Two runs of the same task give identical plans, answers, usage, events and outputs."""
    student = Student(DemoAdapter())
    first = await student.run("Summarise the latest financial news")
    second = await student.run("Summarise the latest financial news")
    assert first.adapter_session_id != second.adapter_session_id
    assert first.plan == second.plan
    assert first.final_answer == second.final_answer
    assert first.usage == second.usage
    assert [s.output for s in first.steps] == [s.output for s in second.steps]
    assert first.metadata["adapter_session"]["events"] == second.metadata["adapter_session"]["events"]


def test_plan_length_is_two_to_four_and_varies_with_task() -> None:
    """Plans have 2-4 steps depending on the task text, and all three lengths occur."""
    adapter = DemoAdapter()
    lengths = {len(adapter.plan_for(f"task {i}")) for i in range(60)}
    assert lengths == {2, 3, 4}
    assert adapter.plan_for("x") == DemoAdapter().plan_for("x")


def test_steps_parameter_fixes_plan_length() -> None:
    """steps=N gives N-step plans with ids 1..N, each depending on the previous."""
    plan = DemoAdapter(steps=5).plan_for("anything")
    assert [s["id"] for s in plan] == [1, 2, 3, 4, 5]
    assert [s["depends_on"] for s in plan] == [[], [1], [2], [3], [4]]
    with pytest.raises(ValueError, match="steps"):
        DemoAdapter(steps=0)


async def test_execute_steps_emit_tool_events_and_usage_from_lengths() -> None:
    """Each execute step emits a tool_call then a tool_result; usage is len//4+1 each way."""
    result = await Student(DemoAdapter(steps=2)).run("Tools please")
    executes = [s for s in result.steps if s.phase == "execute"]
    for step in executes:
        assert [e["type"] for e in step.events] == ["tool_call", "tool_result"]
        assert step.events[0]["tool"] == step.events[1]["tool"]
        assert isinstance(step.events[0]["arguments"], dict)
        assert step.usage.prompt_tokens == len(step.trace) // 4 + 1
        assert step.usage.completion_tokens == len(str(step.output)) // 4 + 1
        assert step.usage.total_tokens == step.usage.prompt_tokens + step.usage.completion_tokens
    assert all(not s.events for s in result.steps if s.phase != "execute")


async def test_state_lives_across_steps_of_one_session_only() -> None:
    """The turn counter grows within a session and restarts in a new one."""
    adapter = DemoAdapter()
    async with adapter.session(CTX) as one:
        assert (await one.step("a")).output == "[turn 1] a"
        assert (await one.step("b")).output == "[turn 2] b"
    async with adapter.session(CTX) as two:
        assert (await two.step("c")).output == "[turn 1] c"
    assert (await one.close())["turns"] == 2


async def test_synthesis_reports_the_scratchpad() -> None:
    """The final answer counts the notes taken in this session's execute steps."""
    result = await Student(DemoAdapter(steps=3)).run("Notes")
    assert "3 steps in 5 turns" in result.final_answer
    assert result.metadata["adapter_session"]["close_metadata"]["notes"] == 3


async def test_latency_is_simulated_per_call() -> None:
    """latency_s sleeps in every step call (3 calls for a one-step plan)."""
    started = time.perf_counter()
    await Student(DemoAdapter(latency_s=0.03, steps=1)).run("slow")
    assert time.perf_counter() - started >= 0.09


async def test_fail_on_raises_in_execute_only() -> None:
    """With fail_on in the task the execute step raises; the plan step still succeeds."""
    with pytest.raises(AdapterError) as info:
        await Student(DemoAdapter(fail_on="FAIL")).run("please FAIL now")
    assert info.value.phase == "execute"
    assert isinstance(info.value.__cause__, DemoFailureError)
    assert info.value.result is not None
    assert [s.status for s in info.value.result.steps] == ["ok", "error"]
    ok = await Student(DemoAdapter(fail_on="FAIL")).run("all good")
    assert ok.status == "succeeded"


async def test_demo_is_cheap() -> None:
    """500 concurrent demo runs finish well within two seconds (benchmarks need thousands per second)."""
    student = Student(DemoAdapter())
    started = time.perf_counter()
    results = await asyncio.gather(*(student.run(f"bench {i}") for i in range(500)))
    assert time.perf_counter() - started < 2.0
    assert all(r.status == "succeeded" for r in results)
