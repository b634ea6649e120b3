"""PythonAdapter: hooks detected by name, sync/async hooks, arguments by signature, instance per session."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from worker import AdapterConfigError, PythonAdapter, SessionContext, StatelessSession, StepOutcome

CTX = SessionContext(task_id="t", execution_mode="stepwise")


class Counter:
    """Stateful, sync hooks: counts steps per instance."""

    instances = 0

    def __init__(self) -> None:
        Counter.instances += 1
        self.count = 0
        self.opened_with: SessionContext | None = None

    def on_open(self, context: SessionContext) -> dict[str, Any]:
        self.opened_with = context
        return {"opened_task": context.task_id}

    def on_step(self, payload: str) -> dict[str, Any]:
        self.count += 1
        return {"output": f"{payload}#{self.count}", "usage": {"prompt_tokens": 1}}

    def on_close(self, reason: str | None) -> dict[str, Any]:
        return {"count": self.count, "why": reason}


class AsyncAgent:
    """Stateful, async hooks."""

    def __init__(self) -> None:
        self.history: list[str] = []

    async def on_open(self) -> None:
        await asyncio.sleep(0)
        self.history.append("open")

    async def on_step(self, prompt: str, metadata: dict[str, Any]) -> str:
        await asyncio.sleep(0)
        self.history.append(prompt)
        return f"{metadata['adapter_session_id']}:{'|'.join(self.history)}"

    async def on_close(self) -> dict[str, Any]:
        return {"history": list(self.history)}


class OnlyStep:
    """Stateful with only on_step, whose single parameter has an unknown name (positional fallback)."""

    def on_step(self, query: str) -> str:
        return query.upper()


class KwargsHooks:
    """**kwargs receives every value on offer."""

    def on_open(self, **kwargs: Any) -> dict[str, Any]:
        return {"open_keys": sorted(kwargs)}

    def on_step(self, payload: Any, **kwargs: Any) -> dict[str, Any]:
        return {"output": {"payload": payload, "keys": sorted(kwargs)}}

    def on_close(self, **kwargs: Any) -> dict[str, Any]:
        return {"close_keys": sorted(kwargs)}


class InvokeOnly:
    """Stateless: a class with a sync invoke (instantiated once)."""

    created = 0

    def __init__(self) -> None:
        InvokeOnly.created += 1

    def invoke(self, prompt: str, metadata: dict[str, Any]) -> str:
        return f"invoke:{prompt}:{metadata.get('adapter_session_id') is not None}"


class CallableWithHookLikeNames:
    """Callable object whose on_step attribute is not a hook (a string): it is not callable."""

    on_step = "not a function"

    def __call__(self, prompt: str) -> str:
        return prompt


def test_class_with_on_step_is_stateful() -> None:
    """A class with on_step is detected as stateful, with one instance per session."""
    adapter = PythonAdapter(Counter)
    assert adapter.supports_sessions is True
    assert adapter.instance_mode == "per_session"
    assert adapter.name == "Counter"


def test_plain_function_is_stateless() -> None:
    """A function (no hooks) is stateless."""

    def answer(prompt: str) -> str:
        return prompt

    adapter = PythonAdapter(answer, name="fn")
    assert adapter.supports_sessions is False
    assert adapter.name == "fn"


def test_detection_is_by_hook_name_not_callability() -> None:
    """A callable object is stateless unless it has an on_step; a non-callable on_step is a config error."""

    class Plain:
        def __call__(self, prompt: str) -> str:
            return prompt

    assert PythonAdapter(Plain()).supports_sessions is False
    with pytest.raises(AdapterConfigError, match="on_step is not callable"):
        PythonAdapter(CallableWithHookLikeNames())


def test_on_open_without_on_step_is_a_config_error() -> None:
    """A target with on_open/on_close but no on_step is refused (on_step is required)."""

    class Half:
        def on_open(self) -> None: ...

    with pytest.raises(AdapterConfigError, match="no on_step"):
        PythonAdapter(Half)


def test_unfillable_hook_parameter_is_a_config_error() -> None:
    """A hook with two required parameters of unknown names is refused when the adapter is built."""

    class Weird:
        def on_step(self, alpha: str, beta: str) -> str:
            return alpha + beta

    with pytest.raises(AdapterConfigError, match="'beta'"):
        PythonAdapter(Weird)


async def test_sync_hooks_and_one_instance_per_session() -> None:
    """Each session gets a fresh instance: counters restart, and state persists within a session."""
    before = Counter.instances
    adapter = PythonAdapter(Counter)
    async with adapter.session(CTX) as first:
        assert (await first.step("a")).output == "a#1"
        assert (await first.step("b")).output == "b#2"
    async with adapter.session(CTX) as second:
        assert (await second.step("c")).output == "c#1"
    assert Counter.instances - before == 2
    assert first.metadata["opened_task"] == "t"
    assert await first.close() == {
        "adapter_session_id": first.session_id, "reason": None, "steps": 2, "count": 2, "why": None,
    }  # fmt: skip


async def test_async_hooks_are_awaited_and_receive_named_arguments() -> None:
    """Async hooks are awaited; metadata has adapter_session_id; on_close's mapping joins close metadata."""
    adapter = PythonAdapter(AsyncAgent)
    session = await adapter.open_session(CTX)
    assert (await session.step("x")).output == f"{session.session_id}:open|x"
    assert (await session.step("y")).output == f"{session.session_id}:open|x|y"
    meta = await session.close("finished")
    assert meta["history"] == ["open", "x", "y"]
    assert meta["reason"] == "finished"


async def test_positional_fallback_for_single_unknown_parameter() -> None:
    """``def on_step(self, query)`` receives the payload."""
    async with PythonAdapter(OnlyStep).session(CTX) as session:
        assert (await session.step("sql")).output == "SQL"


async def test_kwargs_receive_all_offered_values() -> None:
    """**kwargs hooks get every offered name (minus those taken by named parameters)."""
    adapter = PythonAdapter(KwargsHooks)
    session = await adapter.open_session(CTX)
    assert session.metadata["open_keys"] == sorted(
        ["context", "session_id", "metadata", "task_id", "execution_mode", "user_context", "tool_metadata"]
    )
    outcome = await session.step("p")
    assert outcome.output == {"payload": "p", "keys": ["context", "metadata", "prompt", "session_id"]}
    meta = await session.close()
    assert meta["close_keys"] == ["context", "metadata", "reason", "session_id"]


async def test_instance_target_shares_state_across_sessions() -> None:
    """An instance target has its hooks called on that one object: state is shared (documented)."""
    shared = Counter()
    adapter = PythonAdapter(shared)
    assert adapter.instance_mode == "shared"
    async with adapter.session(CTX) as one:
        await one.step("a")
    async with adapter.session(CTX) as two:
        assert (await two.step("b")).output == "b#2"


async def test_stateless_function_sync_and_async() -> None:
    """Sync and async functions both work through the stateless proxy, by parameter name."""

    def sync_fn(prompt: str, metadata: dict[str, Any]) -> dict[str, Any]:
        return {"text": prompt * 2, "usage": {"input_tokens": 1, "output_tokens": 1}}

    async def async_fn(payload: str, session_id: str) -> str:
        return f"{payload}@{session_id}"

    async with PythonAdapter(sync_fn).session(CTX) as session:
        assert isinstance(session, StatelessSession)
        outcome = await session.step("ab")
        assert outcome.output == "abab"
        assert outcome.usage.total_tokens == 2
    async with PythonAdapter(async_fn).session(CTX) as session:
        assert (await session.step("q")).output == f"q@{session.session_id}"


async def test_class_with_invoke_is_instantiated_once_and_stateless() -> None:
    """A class with invoke (no on_step) is stateless, built once, and gets adapter_session_id."""
    before = InvokeOnly.created
    adapter = PythonAdapter(InvokeOnly)
    assert adapter.supports_sessions is False
    for _ in range(2):
        async with adapter.session(CTX) as session:
            assert (await session.step("z")).output == "invoke:z:True"
    assert InvokeOnly.created - before == 1


async def test_object_with_ainvoke_is_used() -> None:
    """An object with an async ainvoke is stateless and called with the prompt."""

    class Remote:
        async def ainvoke(self, prompt: str, metadata: dict[str, Any] | None = None) -> str:
            return f"remote:{prompt}:{metadata}"

    assert await PythonAdapter(Remote()).ainvoke("p", {"k": 1}) == "remote:p:{'k': 1}"


async def test_stateful_adapter_ainvoke_is_one_shot() -> None:
    """ainvoke on a stateful PythonAdapter runs one session with a single step."""
    outcome = await PythonAdapter(Counter).ainvoke("once")
    assert isinstance(outcome, StepOutcome)
    assert outcome.output == "once#1"


def test_import_string_target() -> None:
    """An import string resolves to its target; the adapter remembers the string."""
    adapter = PythonAdapter("tests.test_python_adapter:Counter")
    assert adapter.target is Counter
    assert adapter.import_path == "tests.test_python_adapter:Counter"


@pytest.mark.parametrize(
    "spec",
    ["tests.test_python_adapter", "tests.test_python_adapter:Missing", "tests.nope_module:X", "a b:c"],
)
def test_bad_import_strings_raise_config_error_naming_the_string(spec: str) -> None:
    """Malformed or unresolvable import strings raise AdapterConfigError quoting the string."""
    with pytest.raises(AdapterConfigError) as info:
        PythonAdapter(spec)
    assert repr(spec) in str(info.value)


def test_non_callable_target_is_refused() -> None:
    """A target that is neither hooks, ainvoke/invoke, nor callable is refused."""
    with pytest.raises(AdapterConfigError, match="not callable"):
        PythonAdapter(42)


def test_class_without_entry_points_is_refused() -> None:
    """A class with no on_step and no ainvoke/invoke is refused rather than called as a constructor."""

    class Nothing:
        pass

    with pytest.raises(AdapterConfigError, match="neither"):
        PythonAdapter(Nothing)


async def test_hook_errors_propagate_from_step() -> None:
    """An exception raised by on_step reaches the caller of step unchanged."""

    class Failing:
        def on_step(self, payload: str) -> str:
            raise KeyError(payload)

    async with PythonAdapter(Failing).session(CTX) as session:
        with pytest.raises(KeyError):
            await session.step("k")


async def test_star_args_hook_receives_the_payload() -> None:
    """A hook declared as ``on_step(self, *args)`` gets the payload as its single argument."""

    class Variadic:
        def on_step(self, *args: Any) -> list[Any]:
            return list(args)

    async with PythonAdapter(Variadic).session(CTX) as session:
        assert (await session.step("only")).output == ["only"]


async def test_lambda_target_gets_a_safe_name() -> None:
    """A lambda works as a stateless target and its name is made identifier-safe."""
    adapter = PythonAdapter(lambda p: str(p).upper())
    assert adapter.name == "lambda_"
    assert await adapter.ainvoke("x") == "X"
