"""Session API: SessionContext, the stateless proxy, ``adapter.session()``, close semantics, load_adapter."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from typing import Any

import pytest

import worker
import worker.adapters
import worker.runtime
import worker.sessions
from worker.adapters import DemoAdapter
from worker.sessions import (
    AdapterConfigError,
    AgentAdapter,
    AgentSession,
    BaseSession,
    PythonAdapter,
    SessionClosedError,
    SessionContext,
    StatefulAgentAdapterMixin,
    StatelessSession,
    StepOutcome,
    load_adapter,
)


class Recorder(AgentAdapter):
    """A stateless adapter that records every ainvoke call."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[Any, dict[str, Any]]] = []

    async def ainvoke(self, prompt: Any, metadata: Mapping[str, Any] | None = None) -> Any:
        self.calls.append((prompt, dict(metadata or {})))
        return f"echo:{prompt}"


class CountingSession(BaseSession):
    """A session that counts how often its close hook really runs."""

    def __init__(self, session_id: str) -> None:
        super().__init__(session_id, {"kind": "counting"})
        self.close_calls: list[str | None] = []

    async def _step(self, payload: Any, metadata: dict[str, Any]) -> Any:
        return {"output": payload, "events": [{"type": "seen", "session": metadata["adapter_session_id"]}]}

    async def _close(self, reason: str | None) -> Mapping[str, Any]:
        self.close_calls.append(reason)
        return {"hook_ran": len(self.close_calls)}


class CountingAdapter(StatefulAgentAdapterMixin):
    """A stateful adapter handing out CountingSessions and remembering them."""

    name = "counting"

    def __init__(self) -> None:
        self.sessions: list[CountingSession] = []

    async def open_session(self, context: SessionContext) -> AgentSession:
        session = CountingSession(context.session_id or f"s{len(self.sessions)}")
        self.sessions.append(session)
        return session


CTX = SessionContext(task_id="demo", execution_mode="stepwise")


def test_session_context_is_frozen_with_defaults() -> None:
    """SessionContext has the SDK's fields and defaults and cannot be mutated."""
    ctx = SessionContext(task_id="t1", execution_mode="stepwise")
    assert (ctx.tool_metadata, ctx.user_context, ctx.session_id, dict(ctx.extra)) == (None, None, None, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.task_id = "other"  # type: ignore[misc]


def test_session_context_rejects_empty_task_id() -> None:
    """An empty task_id is refused at construction."""
    with pytest.raises(ValueError, match="task_id"):
        SessionContext(task_id="", execution_mode="stepwise")


async def test_stateless_proxy_passes_adapter_session_id_in_metadata() -> None:
    """The proxy's step calls ainvoke with adapter_session_id merged into the caller's metadata."""
    adapter = Recorder()
    session = await adapter.open_session(CTX)
    assert isinstance(session, StatelessSession)
    outcome = await session.step("hi", {"phase": "plan", "adapter_session_id": "spoofed"})
    assert outcome.output == "echo:hi"
    prompt, metadata = adapter.calls[0]
    assert prompt == "hi"
    assert metadata == {"phase": "plan", "adapter_session_id": session.session_id}


async def test_stateless_proxy_uses_context_session_id_or_fresh_uuid() -> None:
    """session_id is context.session_id when given, else a fresh 32-hex uuid4 per session."""
    adapter = Recorder()
    given = await adapter.open_session(SessionContext(task_id="t", execution_mode="m", session_id="abc"))
    first = await adapter.open_session(CTX)
    second = await adapter.open_session(CTX)
    assert given.session_id == "abc"
    assert len(first.session_id) == 32
    assert int(first.session_id, 16) >= 0
    assert first.session_id != second.session_id


async def test_stateless_step_without_metadata_still_carries_session_id() -> None:
    """A step with metadata=None still sends {'adapter_session_id': ...}."""
    adapter = Recorder()
    session = await adapter.open_session(CTX)
    await session.step("x")
    assert adapter.calls[0][1] == {"adapter_session_id": session.session_id}


async def test_base_adapter_without_ainvoke_fails_clearly() -> None:
    """A bare AgentAdapter has no ainvoke, and says so."""
    session = await AgentAdapter().open_session(CTX)
    with pytest.raises(NotImplementedError, match="does not implement ainvoke"):
        await session.step("x")


def test_supports_sessions_flags() -> None:
    """The base adapter is stateless; the mixin marks adapters as stateful."""
    assert AgentAdapter.supports_sessions is False
    assert Recorder().supports_sessions is False
    assert CountingAdapter().supports_sessions is True


async def test_adapter_session_context_manager_closes_normally() -> None:
    """``async with adapter.session(ctx)`` opens, yields the session, and closes it with reason None."""
    adapter = CountingAdapter()
    async with adapter.session(CTX) as session:
        outcome = await session.step("payload")
        assert outcome.output == "payload"
    assert adapter.sessions[0].close_calls == [None]


async def test_adapter_session_closes_on_error_with_exception_text_and_reraises() -> None:
    """An error inside the block closes the session with the exception text as reason and re-raises."""
    adapter = CountingAdapter()
    with pytest.raises(ValueError, match="kaboom"):
        async with adapter.session(CTX):
            raise ValueError("kaboom")
    assert adapter.sessions[0].close_calls == ["kaboom"]


async def test_adapter_session_closes_on_cancellation() -> None:
    """Cancelling the body closes the session with reason 'cancelled' and propagates CancelledError."""
    adapter = CountingAdapter()
    entered = asyncio.Event()

    async def body() -> None:
        async with adapter.session(CTX):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(body())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert adapter.sessions[0].close_calls == ["cancelled"]


async def test_close_is_idempotent_and_returns_same_metadata() -> None:
    """A second close runs no hook and returns the very same metadata."""
    adapter = CountingAdapter()
    session = await adapter.open_session(CTX)
    await session.step("a")
    first = await session.close("done")
    second = await session.close("again")
    assert first is second
    assert first == {"adapter_session_id": session.session_id, "reason": "done", "steps": 1, "hook_ran": 1}
    assert adapter.sessions[0].close_calls == ["done"]


async def test_step_after_close_raises() -> None:
    """A closed session refuses further steps."""
    session = await Recorder().open_session(CTX)
    await session.close()
    with pytest.raises(SessionClosedError):
        await session.step("late")


async def test_failing_close_hook_is_recorded_not_raised() -> None:
    """A close hook that raises yields close metadata with close_error instead of an exception."""

    class Broken(CountingSession):
        async def _close(self, reason: str | None) -> Mapping[str, Any]:
            raise OSError(f"disk gone ({reason})")

    meta = await Broken("b").close("r")
    assert meta["close_error"] == "disk gone (r)"
    assert meta["reason"] == "r"


async def test_mixin_ainvoke_is_a_one_shot_session() -> None:
    """A stateful adapter's ainvoke opens one session, steps once, and closes it."""
    adapter = CountingAdapter()
    outcome = await adapter.ainvoke("ping", {"adapter_session_id": "given"})
    assert isinstance(outcome, StepOutcome)
    assert outcome.output == "ping"
    assert [s.session_id for s in adapter.sessions] == ["given"]
    assert adapter.sessions[0].close_calls == [None]


def test_load_adapter_returns_instances_and_wraps_others() -> None:
    """load_adapter keeps adapters, instantiates adapter classes, and wraps other objects."""
    demo = DemoAdapter()
    assert load_adapter(demo) is demo
    made = load_adapter("worker.adapters:DemoAdapter", name="demo2")
    assert isinstance(made, DemoAdapter)
    assert made.name == "demo2"
    wrapped = load_adapter("examples.stateful_adapter_sql.adapter:SQLiteAgent")
    assert isinstance(wrapped, PythonAdapter)
    assert wrapped.supports_sessions is True


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("no_colon_here", "must look like"),
        ("worker:", "must look like"),
        ("surely_missing_module_xyz:thing", "cannot import module 'surely_missing_module_xyz'"),
        ("worker:NoSuchThing", "has no attribute 'NoSuchThing'"),
    ],
)
def test_load_adapter_bad_import_strings_name_the_string(spec: str, fragment: str) -> None:
    """Bad import strings raise AdapterConfigError that quotes the string and says what is wrong."""
    with pytest.raises(AdapterConfigError) as info:
        load_adapter(spec)
    assert repr(spec) in str(info.value)
    assert fragment in str(info.value)


def test_public_api_is_exported() -> None:
    """The SDK's names are importable from ``worker.sessions``, the adapter author's short list from
    ``worker`` itself, the built-in adapters from ``worker.adapters``, the service from ``worker.runtime``."""
    sdk = {
        "AgentAdapter", "AgentSession", "BaseSession", "SessionContext", "StatelessSession",
        "StatefulAgentAdapterMixin", "PythonAdapter", "Student", "StudentResult", "StepOutcome",
        "normalize_outcome", "SessionObserver", "OpenedInfo", "StepReport", "CloseReport", "WorkerError",
        "AdapterError", "AdapterConfigError", "load_adapter",
    }  # fmt: skip
    author = {
        "AgentAdapter", "SessionContext", "StatefulAgentAdapterMixin", "StatelessSession", "PythonAdapter",
        "Student",
    }  # fmt: skip
    assert sdk <= set(worker.sessions.__all__)
    assert author <= set(worker.__all__)
    assert {"DemoAdapter", "HTTPAdapterFromEnv", "OpenAIChatAdapterFromEnv"} <= set(worker.adapters.__all__)
    assert {"Worker", "WorkerSettings", "AdapterRegistry"} <= set(worker.runtime.__all__)
    for package in (worker, worker.sessions, worker.adapters, worker.runtime):
        assert all(hasattr(package, name) for name in package.__all__), package.__name__
    assert all(getattr(worker, name) is getattr(worker.sessions, name) for name in worker.__all__)


def test_error_hierarchy() -> None:
    """Every worker error derives from WorkerError; the broker being away is the one error every service
    shares (atlas_common.BrokerUnavailable)."""
    for cls in (
        worker.sessions.AdapterError,
        worker.sessions.AdapterConfigError,
        worker.sessions.OutcomeError,
        worker.sessions.SessionClosedError,
        worker.adapters.AdapterHTTPError,
        worker.runtime.SchemaBehind,
        worker.runtime.LedgerUnavailable,
    ):
        assert issubclass(cls, worker.sessions.WorkerError)
    import atlas_common
    import producer

    assert worker.runtime.BrokerUnavailable is atlas_common.BrokerUnavailable is producer.BrokerUnavailable
