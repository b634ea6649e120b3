"""OpenAIChatAdapter against a real fake /v1/chat/completions server on 127.0.0.1."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from tests._logs import captured
from worker.adapters import (
    AdapterHTTPError,
    OpenAIChatAdapter,
    OpenAIChatAdapterFromEnv,
    openai_adapter_from_env,
)
from worker.sessions import AdapterConfigError, AdapterError, SessionContext, Student, load_adapter

Handler = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]
KEY = "sk-test-4f3e2d1c0b9a8877"  # a test credential, checked for leaks below

PLAN = {
    "steps": [
        {"id": 1, "description": "Collect facts", "depends_on": []},
        {"id": 2, "description": "Write it up", "depends_on": [1]},
    ]
}


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


def completion(
    content: str | None,
    *,
    model: str = "served-model",
    usage: dict[str, int] | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    finish_reason: str = "stop",
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": usage or {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
    }


@dataclass
class FakeLLM:
    """Answers every request with 'reply N: <last user message>' (or a JSON plan for a plan prompt)."""

    base_url: str = ""
    seen: list[Seen] = field(default_factory=list)
    script: list[Handler] = field(default_factory=list)

    def messages(self, index: int) -> list[dict[str, Any]]:
        return list(self.seen[index].body["messages"])

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(Seen(request.path, dict(request.headers), body))
        if self.script:
            return await self.script.pop(0)(request, body)
        last = body["messages"][-1]["content"]
        if "Plan the steps needed" in last:
            content = json.dumps(PLAN)
        else:
            content = f"reply {len(self.seen)}: {last.splitlines()[-1]}"
        n = len(body["messages"])
        return web.json_response(
            completion(
                content, usage={"prompt_tokens": 10 * n, "completion_tokens": 3, "total_tokens": 10 * n + 3}
            )
        )


def status(code: int, text: str = "", headers: dict[str, str] | None = None) -> Handler:
    async def reply(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.Response(status=code, text=text or f"status {code}", headers=headers)

    return reply


def json_reply(value: Any) -> Handler:
    async def reply(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.json_response(value)

    return reply


@pytest.fixture
async def llm() -> AsyncIterator[FakeLLM]:
    fake = FakeLLM()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    yield fake
    await runner.cleanup()


@pytest.fixture
async def make_adapter(
    llm: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., OpenAIChatAdapter]]:
    monkeypatch.delenv("TEST_LLM_KEY", raising=False)
    made: list[OpenAIChatAdapter] = []

    def make(**kwargs: Any) -> OpenAIChatAdapter:
        kwargs.setdefault("base_url", llm.base_url)
        kwargs.setdefault("model", "test-model")
        kwargs.setdefault("api_key_env", "TEST_LLM_KEY")
        kwargs.setdefault("retry_backoff_s", 0.01)
        adapter = OpenAIChatAdapter(**kwargs)
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        await adapter.aclose()


def ctx(session_id: str | None = None) -> SessionContext:
    return SessionContext(task_id="task-1", execution_mode="stepwise", session_id=session_id)


async def test_conversation_grows_within_a_session_and_is_separate_between_sessions(
    llm: FakeLLM, make_adapter: Callable[..., OpenAIChatAdapter]
) -> None:
    """Step 2 sends system + step 1's user and assistant messages; another session starts fresh."""
    adapter = make_adapter(system_prompt="You are terse.")
    a = await adapter.open_session(ctx("A"))
    b = await adapter.open_session(ctx("B"))
    first = await a.step("hello")
    await b.step("other")
    await a.step("again")
    await a.close()
    await b.close()
    system = {"role": "system", "content": "You are terse."}
    assert llm.messages(0) == [system, {"role": "user", "content": "hello"}]
    assert llm.messages(1) == [system, {"role": "user", "content": "other"}]
    assert llm.messages(2) == [
        system,
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": first.output},
        {"role": "user", "content": "again"},
    ]
    assert first.output == "reply 1: hello"
    assert all(s.path == "/v1/chat/completions" for s in llm.seen)


async def test_request_body_carries_options(
    llm: FakeLLM, make_adapter: Callable[..., OpenAIChatAdapter]
) -> None:
    """model, temperature, max_tokens, tools and extra_body are sent; unset options are omitted."""
    tools = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
    adapter = make_adapter(temperature=0.2, max_tokens=64, tools=tools, extra_body={"seed": 7})
    plain = make_adapter()
    await adapter.ainvoke("x")
    await plain.ainvoke("y")
    body = llm.seen[0].body
    assert (body["model"], body["temperature"], body["max_tokens"], body["seed"]) == (
        "test-model",
        0.2,
        64,
        7,
    )
    assert body["tools"] == tools
    assert set(llm.seen[1].body) == {"model", "messages"}


async def test_usage_is_read_from_the_response(
    llm: FakeLLM, make_adapter: Callable[..., OpenAIChatAdapter]
) -> None:
    """prompt/completion/total tokens come from the response's usage; calls is 1."""
    llm.script.append(
        json_reply(completion("ok", usage={"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 19}))
    )
    outcome = await make_adapter().ainvoke("count")
    assert (outcome.usage.prompt_tokens, outcome.usage.completion_tokens) == (11, 7)
    assert outcome.usage.total_tokens == 19
    assert outcome.usage.calls == 1


async def test_tool_calls_become_events(llm: FakeLLM, make_adapter: Callable[..., OpenAIChatAdapter]) -> None:
    """Each tool call is a tool_call event after an llm_call event; null content is ''; history keeps them."""
    calls = [
        {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": '{"q": "rain"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "clock", "arguments": "not json"}},
    ]
    llm.script.append(json_reply(completion(None, tool_calls=calls, finish_reason="tool_calls")))
    adapter = make_adapter()
    async with adapter.session(ctx()) as session:
        outcome = await session.step("weather?")
        tool_result = {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
        await session.step(tool_result)
    assert outcome.output == ""
    assert outcome.events == [
        {"type": "llm_call", "model": "served-model", "finish_reason": "tool_calls"},
        {"type": "tool_call", "id": "call_1", "name": "search", "arguments": {"q": "rain"}},
        {"type": "tool_call", "id": "call_2", "name": "clock", "arguments": "not json"},
    ]
    assert llm.messages(1)[1:] == [
        {"role": "assistant", "content": None, "tool_calls": calls},
        tool_result,
    ]


async def test_api_key_header_and_no_header_without_key(
    llm: FakeLLM, make_adapter: Callable[..., OpenAIChatAdapter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key from api_key_env (read at open) is sent as a Bearer token; without a key no header is sent."""
    adapter = make_adapter()
    await adapter.ainvoke("no key yet")
    monkeypatch.setenv("TEST_LLM_KEY", KEY)
    await adapter.ainvoke("with key")
    assert "Authorization" not in llm.seen[0].headers
    assert llm.seen[1].headers["Authorization"] == f"Bearer {KEY}"


async def test_429_with_retry_after_is_retried_after_that_delay(
    llm: FakeLLM, make_adapter: Callable[..., OpenAIChatAdapter]
) -> None:
    """A 429 with Retry-After: 1 is retried after about a second (not the 10 ms backoff), then succeeds."""
    llm.script.append(status(429, "slow down", {"Retry-After": "1"}))
    started = time.monotonic()
    outcome = await make_adapter().ainvoke("hi")
    elapsed = time.monotonic() - started
    assert len(llm.seen) == 2
    assert outcome.output == "reply 2: hi"
    assert 0.9 <= elapsed < 5


async def test_retry_after_is_capped(llm: FakeLLM, make_adapter: Callable[..., OpenAIChatAdapter]) -> None:
    """A huge Retry-After waits only max_retry_after_s."""
    llm.script += [status(503, headers={"Retry-After": "3600"}), status(429, headers={"Retry-After": "3600"})]
    started = time.monotonic()
    outcome = await make_adapter(max_retry_after_s=0.05).ainvoke("hi")
    assert time.monotonic() - started < 2
    assert len(llm.seen) == 3
    assert outcome.output == "reply 3: hi"


async def test_400_is_not_retried(llm: FakeLLM, make_adapter: Callable[..., OpenAIChatAdapter]) -> None:
    """A 400 raises after one request with the status and the server's message."""
    llm.script.append(status(400, '{"error": {"message": "unknown model"}}'))
    adapter = make_adapter()
    session = await adapter.open_session(ctx())
    with pytest.raises(AdapterHTTPError) as info:
        await session.step("x")
    assert len(llm.seen) == 1
    assert info.value.status == 400
    assert "HTTP 400" in str(info.value)
    assert "unknown model" in str(info.value)
    assert session.messages == []  # type: ignore[attr-defined]


async def test_failed_step_leaves_conversation_unchanged(
    llm: FakeLLM, make_adapter: Callable[..., OpenAIChatAdapter]
) -> None:
    """A step that fails does not add its user message, so the next step's history has no orphan."""
    adapter = make_adapter(max_retries=0)
    async with adapter.session(ctx()) as session:
        await session.step("one")
        llm.script.append(status(500))
        with pytest.raises(AdapterHTTPError):
            await session.step("lost")
        await session.step("two")
    assert [m["content"] for m in llm.messages(2)] == ["one", "reply 1: one", "two"]


async def test_malformed_response_raises(
    llm: FakeLLM, make_adapter: Callable[..., OpenAIChatAdapter]
) -> None:
    """A 200 without choices[0].message is an error naming what is missing."""
    llm.script.append(json_reply({"choices": []}))
    with pytest.raises(AdapterHTTPError, match=r"choices\[0\]\.message"):
        await make_adapter().ainvoke("x")


async def test_key_never_leaks(
    llm: FakeLLM,
    make_adapter: Callable[..., OpenAIChatAdapter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The key is in no repr, log line, session metadata or exception, even when the server echoes it."""
    monkeypatch.setenv("TEST_LLM_KEY", KEY)
    adapter = make_adapter()

    async def echo(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.Response(status=500, text=f"echo {request.headers.get('Authorization')}")

    async def echo_401(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.Response(status=401, text=f"invalid key {request.headers.get('Authorization')}")

    llm.script += [echo, echo_401]
    session = await adapter.open_session(ctx())
    modules = ("worker.adapters._http", "worker.adapters._openai_adapter")
    with captured(*modules) as logs, pytest.raises(AdapterHTTPError) as info:
        await session.step("x")
    closed = await session.close("failed")
    assert llm.seen[0].headers["Authorization"] == f"Bearer {KEY}"
    assert "invalid key ***" in str(info.value)
    assert any(entry["event"] == "http.retrying" and "echo ***" in entry["problem"] for entry in logs)
    for text in (
        repr(adapter),
        str(info.value),
        repr(info.value),
        str(logs),
        str(session.metadata),
        str(closed),
    ):
        assert KEY not in text
    assert "TEST_LLM_KEY" in repr(adapter)


async def test_student_run_end_to_end(llm: FakeLLM, make_adapter: Callable[..., OpenAIChatAdapter]) -> None:
    """Student.run: plan (JSON) -> 2 executes -> synthesize in one conversation; usage counts 4 calls."""
    result = await Student(make_adapter(system_prompt="sys")).run("Explain rain")
    assert result.status == "succeeded"
    assert result.plan is not None
    steps: Any = result.plan["steps"]
    assert [s["description"] for s in steps] == ["Collect facts", "Write it up"]
    assert result.metadata["plan_fallback"] is False
    assert result.metadata["adapter_session"]["fallback"] is False
    assert result.usage.calls == 4
    # prompt tokens are 10 per message sent: 2, 4, 6, 8 messages per call.
    assert result.usage.prompt_tokens == 200
    assert result.usage.completion_tokens == 12
    assert len(llm.seen) == 4
    last = llm.messages(3)
    assert [m["role"] for m in last] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert last[2]["content"] == json.dumps(PLAN)
    assert result.final_answer == "reply 4: Write the final answer to the task from these outputs."
    events = result.metadata["adapter_session"]["events"]
    assert [e["type"] for e in events] == ["llm_call"] * 4
    assert result.metadata["adapter_session"]["close_metadata"]["messages"] == 9


async def test_student_step_failure_reports_status(
    llm: FakeLLM, make_adapter: Callable[..., OpenAIChatAdapter]
) -> None:
    """A non-retryable error in a step fails the run with an AdapterError whose reason has the status."""
    llm.script.append(status(404, "model not found"))
    with pytest.raises(AdapterError) as info:
        await Student(make_adapter()).run("anything")
    assert info.value.phase == "plan"
    assert "HTTP 404" in info.value.reason
    assert "model not found" in info.value.reason


async def test_from_env_factory_and_worker_spec(llm: FakeLLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """openai_adapter_from_env and the OpenAIChatAdapterFromEnv spec read ATLAS_OPENAI_* when called."""
    monkeypatch.setenv("ATLAS_OPENAI_BASE_URL", llm.base_url + "/")
    monkeypatch.setenv("ATLAS_OPENAI_MODEL", "env-model")
    monkeypatch.setenv("ATLAS_OPENAI_API_KEY_ENV", "ENV_LLM_KEY")
    monkeypatch.setenv("ATLAS_OPENAI_SYSTEM_PROMPT", "be brief")
    monkeypatch.setenv("ATLAS_OPENAI_TEMPERATURE", "0.5")
    monkeypatch.setenv("ATLAS_OPENAI_MAX_TOKENS", "32")
    monkeypatch.setenv("ATLAS_OPENAI_TIMEOUT_S", "9")
    monkeypatch.setenv("ATLAS_OPENAI_MAX_RETRIES", "2")
    monkeypatch.setenv("ENV_LLM_KEY", "env-key-123456")
    built = openai_adapter_from_env()
    assert (built.base_url, built.model, built.api_key_env) == (llm.base_url, "env-model", "ENV_LLM_KEY")
    assert (built.temperature, built.max_tokens, built.timeout_s, built.retry_policy.max_retries) == (
        0.5,
        32,
        9.0,
        2,
    )
    loaded = load_adapter("worker.adapters:OpenAIChatAdapterFromEnv", name="llm")
    assert isinstance(loaded, OpenAIChatAdapterFromEnv)
    try:
        assert loaded.name == "llm"
        await loaded.ainvoke("hi")
    finally:
        await loaded.aclose()
    body = llm.seen[0].body
    assert body["model"] == "env-model"
    assert body["messages"][0] == {"role": "system", "content": "be brief"}
    assert llm.seen[0].headers["Authorization"] == "Bearer env-key-123456"
    monkeypatch.delenv("ATLAS_OPENAI_MODEL")
    with pytest.raises(AdapterConfigError, match="ATLAS_OPENAI_MODEL"):
        load_adapter("worker.adapters:OpenAIChatAdapterFromEnv")


def test_bad_configuration_is_rejected() -> None:
    """A bad base_url, an empty model and extra_body overriding messages are configuration errors."""
    with pytest.raises(AdapterConfigError, match="base_url"):
        OpenAIChatAdapter(base_url="localhost:8000", model="m")
    with pytest.raises(AdapterConfigError, match="model"):
        OpenAIChatAdapter(base_url="http://127.0.0.1/v1", model=" ")
    with pytest.raises(AdapterConfigError, match="messages"):
        OpenAIChatAdapter(base_url="http://127.0.0.1/v1", model="m", extra_body={"messages": []})
