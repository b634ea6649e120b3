"""HTTPAdapter against a real aiohttp server on 127.0.0.1: wire format, state, retries, errors, secrets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from atlas_common import strip_url
from tests._logs import captured
from worker.adapters import AdapterHTTPError, HTTPAdapter, HTTPAdapterFromEnv, http_adapter_from_env
from worker.adapters._http import parse_retry_after
from worker.sessions import AdapterConfigError, AdapterError, SessionContext, Student, load_adapter

Handler = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeAgent:
    """An agent endpoint that keeps per-session state keyed by X-Atlas-Session-Id."""

    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    script: list[Handler] = field(default_factory=list)
    state: dict[str, list[Any]] = field(default_factory=dict)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def bodies(self, event: str | None = None) -> list[dict[str, Any]]:
        return [s.body for s in self.seen if event is None or s.body.get("event") == event]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(Seen(dict(request.headers), body))
        if self.script:
            return await self.script.pop(0)(request, body)
        sid = request.headers["X-Atlas-Session-Id"]
        event = body["event"]
        if event == "open":
            self.state[sid] = []
            return web.json_response({"opened": sid})
        if event == "close":
            return web.json_response({"closed": sid, "payloads": len(self.state.get(sid, []))})
        history = self.state.setdefault(sid, [])
        history.append(body["payload"])
        return web.json_response(
            {
                "output": f"{sid}#{body['step']}: {body['payload']} (seen {len(history)})",
                "usage": {"input_tokens": 3, "output_tokens": 4},
                "events": [{"type": "tool_call", "tool": "echo", "step": body["step"]}, "free text"],
            }
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
async def agent() -> AsyncIterator[FakeAgent]:
    fake = FakeAgent()
    app = web.Application()
    app.router.add_post("/agent", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.url = f"http://127.0.0.1:{port}/agent"
    yield fake
    fake.release.set()
    await runner.cleanup()


@pytest.fixture
async def make_adapter(agent: FakeAgent) -> AsyncIterator[Callable[..., HTTPAdapter]]:
    made: list[HTTPAdapter] = []

    def make(**kwargs: Any) -> HTTPAdapter:
        kwargs.setdefault("retry_backoff_s", 0.01)
        adapter = HTTPAdapter(kwargs.pop("url", agent.url), **kwargs)
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        await adapter.aclose()


def ctx(session_id: str | None = None, task_id: str = "task-1") -> SessionContext:
    return SessionContext(
        task_id=task_id, execution_mode="stepwise", session_id=session_id, extra={"task": "do it"}
    )


async def test_step_body_and_session_header(
    agent: FakeAgent, make_adapter: Callable[..., HTTPAdapter]
) -> None:
    """A step POSTs the documented JSON body, and the session id travels in the body and the header."""
    adapter = make_adapter()
    async with adapter.session(ctx("sess-1")) as session:
        await session.step({"q": "hello"}, {"phase": "execute", "step_id": 2})
    step = agent.bodies("step")[0]
    assert step == {
        "event": "step",
        "adapter_session_id": "sess-1",
        "task_id": "task-1",
        "execution_mode": "stepwise",
        "step": 1,
        "payload": {"q": "hello"},
        "metadata": {"phase": "execute", "step_id": 2, "adapter_session_id": "sess-1"},
    }
    assert all(s.headers["X-Atlas-Session-Id"] == "sess-1" for s in agent.seen)
    assert agent.seen[1].headers["Content-Type"] == "application/json"


async def test_open_step_close_events(agent: FakeAgent, make_adapter: Callable[..., HTTPAdapter]) -> None:
    """Open, each step and close are POSTed in order; open/close replies land in the session metadata."""
    adapter = make_adapter()
    session = await adapter.open_session(ctx("sess-2"))
    await session.step("a")
    await session.step("b")
    closed = await session.close("done")
    assert [b["event"] for b in agent.bodies()] == ["open", "step", "step", "close"]
    opened = agent.bodies("open")[0]
    assert opened["task"] == "do it"
    assert opened["adapter_session_id"] == "sess-2"
    assert agent.bodies("close")[0] == {
        "event": "close",
        "adapter_session_id": "sess-2",
        "task_id": "task-1",
        "execution_mode": "stepwise",
        "reason": "done",
        "steps": 2,
    }
    assert session.metadata["endpoint"] == {"opened": "sess-2"}
    assert closed["endpoint"] == {"closed": "sess-2", "payloads": 2}
    assert closed["steps"] == 2


async def test_session_events_off_posts_only_steps(
    agent: FakeAgent, make_adapter: Callable[..., HTTPAdapter]
) -> None:
    """With session_events=False only steps are POSTed (no open, no close)."""
    adapter = make_adapter(session_events=False)
    async with adapter.session(ctx()) as session:
        await session.step("only")
    assert [b["event"] for b in agent.bodies()] == ["step"]


async def test_step_counter_is_per_session(
    agent: FakeAgent, make_adapter: Callable[..., HTTPAdapter]
) -> None:
    """The step number counts 1, 2, 3 within a session and starts again at 1 in the next session."""
    adapter = make_adapter()
    for sid in ("first", "second"):
        async with adapter.session(ctx(sid)) as session:
            for _ in range(3 if sid == "first" else 1):
                await session.step("x")
    steps = [(b["adapter_session_id"], b["step"]) for b in agent.bodies("step")]
    assert steps == [("first", 1), ("first", 2), ("first", 3), ("second", 1)]


async def test_usage_and_events_are_normalised(
    agent: FakeAgent, make_adapter: Callable[..., HTTPAdapter]
) -> None:
    """An envelope reply gives output, usage (aliases mapped, total computed) and typed events."""
    adapter = make_adapter()
    async with adapter.session(ctx("u")) as session:
        outcome = await session.step("ping")
    assert outcome.output == "u#1: ping (seen 1)"
    assert outcome.usage.prompt_tokens == 3
    assert outcome.usage.completion_tokens == 4
    assert outcome.usage.total_tokens == 7
    assert outcome.usage.calls == 1
    assert outcome.events == [
        {"type": "tool_call", "tool": "echo", "step": 1},
        {"type": "adapter_event", "data": "free text"},
    ]


async def test_non_json_reply_is_output_text(
    agent: FakeAgent, make_adapter: Callable[..., HTTPAdapter]
) -> None:
    """A 2xx text/plain body is the output text, even when it looks like JSON; a JSON string reply is text."""
    agent.script += [status(200, '{"output": "not parsed"}'), json_reply("plain json string")]
    adapter = make_adapter(session_events=False)
    async with adapter.session(ctx()) as session:
        first = await session.step("a")
        second = await session.step("b")
    assert first.output == '{"output": "not parsed"}'
    assert first.usage.total_tokens == 0
    assert second.output == "plain json string"


@pytest.mark.parametrize("code", [500, 502, 429])
async def test_retries_then_succeeds(
    agent: FakeAgent, make_adapter: Callable[..., HTTPAdapter], code: int
) -> None:
    """5xx and 429 are retried (same step number each time) until the endpoint answers 2xx."""
    agent.script += [status(code), status(code)]
    adapter = make_adapter(session_events=False, max_retries=3)
    with captured("worker.adapters._http") as logs:
        async with adapter.session(ctx("r")) as session:
            outcome = await session.step("try")
    assert len(agent.seen) == 3
    assert [b["step"] for b in agent.bodies("step")] == [1, 1, 1]
    assert outcome.output == "r#1: try (seen 1)"
    retries = [entry for entry in logs if entry["event"] == "http.retrying"]
    assert len(retries) == 2
    assert retries[0]["log_level"] == "warning"
    assert f"HTTP {code}" in retries[0]["problem"]


async def test_retries_exhausted_raise_clear_error(
    agent: FakeAgent, make_adapter: Callable[..., HTTPAdapter]
) -> None:
    """After max_retries failed retries the error names the URL, the attempts and the last status."""
    agent.script += [status(503, "overloaded")] * 3
    adapter = make_adapter(session_events=False, max_retries=2)
    session = await adapter.open_session(ctx())
    with pytest.raises(AdapterHTTPError) as info:
        await session.step("x")
    assert len(agent.seen) == 3
    assert info.value.status == 503
    assert info.value.attempts == 3
    assert "after 3 attempts" in str(info.value)
    assert "HTTP 503: overloaded" in str(info.value)
    assert strip_url(agent.url) in str(info.value)


async def test_no_retry_on_400(agent: FakeAgent, make_adapter: Callable[..., HTTPAdapter]) -> None:
    """A 400 raises at once (one request) with the status and the start of the body in the message."""
    agent.script.append(status(400, "bad payload: field q missing"))
    adapter = make_adapter(session_events=False, max_retries=3)
    session = await adapter.open_session(ctx())
    with pytest.raises(AdapterHTTPError) as info:
        await session.step("x")
    assert len(agent.seen) == 1
    assert info.value.status == 400
    assert "HTTP 400" in str(info.value)
    assert "bad payload: field q missing" in str(info.value)


async def test_long_error_body_is_cut(agent: FakeAgent, make_adapter: Callable[..., HTTPAdapter]) -> None:
    """Only a snippet of a large error body goes into the message."""
    agent.script.append(status(422, "E" * 10_000))
    adapter = make_adapter(session_events=False)
    session = await adapter.open_session(ctx())
    with pytest.raises(AdapterHTTPError) as info:
        await session.step("x")
    assert 400 < str(info.value).count("E") <= 500


async def test_timeout_raises(agent: FakeAgent, make_adapter: Callable[..., HTTPAdapter]) -> None:
    """A request slower than timeout_s times out, is retried, and then raises a 'timed out' error."""

    async def slow(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(agent.release.wait(), 5)
        return web.json_response({"output": "too late"})

    agent.script += [slow, slow]
    adapter = make_adapter(session_events=False, timeout_s=0.2, max_retries=1)
    session = await adapter.open_session(ctx())
    started = time.monotonic()
    with pytest.raises(AdapterHTTPError) as info:
        await session.step("x")
    assert time.monotonic() - started < 2.0
    assert len(agent.seen) == 2
    assert info.value.status is None
    assert "timed out after 0.2s" in str(info.value)


async def test_connection_error_is_retried_then_raises(make_adapter: Callable[..., HTTPAdapter]) -> None:
    """Nothing listening on the port: each attempt fails to connect, is retried, then a clear error."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    adapter = make_adapter(url=f"http://127.0.0.1:{port}/agent", session_events=False, max_retries=2)
    session = await adapter.open_session(ctx())
    with captured("worker.adapters._http") as logs, pytest.raises(AdapterHTTPError) as info:
        await session.step("x")
    assert "connection error" in str(info.value)
    assert info.value.attempts == 3
    assert len([entry for entry in logs if entry["event"] == "http.retrying"]) == 2


async def test_auth_header_from_env_reaches_server_but_never_leaks(
    agent: FakeAgent,
    make_adapter: Callable[..., HTTPAdapter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Env and static headers reach the server; they are absent from logs, errors and repr, even if echoed."""
    token = "Bearer tok-9f8e7d6c5b4a"  # noqa: S105 -- a test credential
    static = "static-key-1234567"
    adapter = make_adapter(headers={"X-Api-Key": static}, headers_from_env={"Authorization": "AGENT_TOKEN"})
    monkeypatch.setenv("AGENT_TOKEN", token)

    async def echo(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        seen = f"auth={request.headers.get('Authorization')} key={request.headers.get('X-Api-Key')}"
        return web.Response(status=500, text=seen)

    async def echo_401(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.Response(status=401, text=f"bad token {request.headers.get('Authorization')}")

    session = await adapter.open_session(ctx())
    agent.script += [echo, echo_401]
    with captured("worker.adapters._http") as logs, pytest.raises(AdapterHTTPError) as info:
        await session.step("x")
    closed = await session.close("failed")
    assert agent.seen[0].headers["Authorization"] == token
    assert agent.seen[0].headers["X-Api-Key"] == static
    assert "HTTP 401" in str(info.value)
    assert "bad token ***" in str(info.value)
    assert any(entry["event"] == "http.retrying" for entry in logs)
    for text in (
        str(info.value),
        repr(info.value),
        str(logs),
        repr(adapter),
        str(session.metadata),
        str(closed),
    ):
        assert "tok-9f8e7d6c5b4a" not in text
        assert static not in text
    assert "X-Api-Key" in repr(adapter)


async def test_env_header_is_read_at_open_time(
    agent: FakeAgent, make_adapter: Callable[..., HTTPAdapter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """headers_from_env reads the variable when each session opens; unset, the open fails naming it."""
    monkeypatch.delenv("AGENT_TOKEN", raising=False)
    adapter = make_adapter(headers_from_env={"Authorization": "AGENT_TOKEN"})
    with pytest.raises(AdapterConfigError, match="AGENT_TOKEN"):
        await adapter.open_session(ctx())
    for value in ("Bearer one-1111", "Bearer two-2222"):
        monkeypatch.setenv("AGENT_TOKEN", value)
        async with adapter.session(ctx()) as session:
            await session.step("x")
    assert [b.headers["Authorization"] for b in agent.seen if b.body["event"] == "step"] == [
        "Bearer one-1111",
        "Bearer two-2222",
    ]


async def test_concurrent_sessions_keep_separate_state(
    agent: FakeAgent, make_adapter: Callable[..., HTTPAdapter]
) -> None:
    """Two sessions stepping concurrently through one adapter keep separate counters and server state."""
    adapter = make_adapter()

    async def run(sid: str) -> list[Any]:
        outputs = []
        async with adapter.session(ctx(sid)) as session:
            for i in range(3):
                outputs.append((await session.step(f"{sid}-{i}")).output)
                await asyncio.sleep(0)
        return outputs

    a, b = await asyncio.gather(run("A"), run("B"))
    assert agent.state == {"A": ["A-0", "A-1", "A-2"], "B": ["B-0", "B-1", "B-2"]}
    assert a == ["A#1: A-0 (seen 1)", "A#2: A-1 (seen 2)", "A#3: A-2 (seen 3)"]
    assert b == ["B#1: B-0 (seen 1)", "B#2: B-1 (seen 2)", "B#3: B-2 (seen 3)"]
    by_session = {s.body["adapter_session_id"] for s in agent.seen if s.headers["X-Atlas-Session-Id"] == "A"}
    assert by_session == {"A"}


async def test_ainvoke_is_a_one_shot_session(
    agent: FakeAgent, make_adapter: Callable[..., HTTPAdapter]
) -> None:
    """ainvoke opens, steps once and closes, taking task_id and session id from the call metadata."""
    adapter = make_adapter()
    outcome = await adapter.ainvoke("solo", {"task_id": "t-9", "adapter_session_id": "one"})
    assert outcome.output == "one#1: solo (seen 1)"
    assert [(b["event"], b["task_id"]) for b in agent.bodies()] == [
        ("open", "t-9"),
        ("step", "t-9"),
        ("close", "t-9"),
    ]


async def test_student_run_end_to_end(agent: FakeAgent, make_adapter: Callable[..., HTTPAdapter]) -> None:
    """Student.run drives plan -> execute -> synthesize through one HTTP session and sums its usage."""

    async def by_phase(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        phase = body.get("metadata", {}).get("phase")
        if phase == "plan":
            output: Any = {"steps": [{"id": 1, "description": "look"}, {"id": 2, "description": "write"}]}
        else:
            output = f"{phase} done"
        return web.json_response({"output": output, "usage": {"prompt_tokens": 5, "completion_tokens": 1}})

    agent.script += [json_reply({"ok": True}), by_phase, by_phase, by_phase, by_phase, json_reply({})]
    result = await Student(make_adapter()).run("write a haiku")
    assert [b["event"] for b in agent.bodies()] == ["open", "step", "step", "step", "step", "close"]
    assert {s.headers["X-Atlas-Session-Id"] for s in agent.seen} == {result.adapter_session_id}
    assert result.status == "succeeded"
    assert result.final_answer == "synthesize done"
    assert result.usage.calls == 4
    assert result.usage.total_tokens == 24
    assert result.metadata["adapter_session"]["fallback"] is False


async def test_student_step_failure_closes_with_reason(
    agent: FakeAgent, make_adapter: Callable[..., HTTPAdapter]
) -> None:
    """A failing step fails the run with the HTTP error and still POSTs a close carrying that reason."""
    agent.script += [json_reply({}), status(404, "no such agent")]
    with pytest.raises(AdapterError) as info:
        await Student(make_adapter()).run("anything")
    assert "HTTP 404" in info.value.reason
    assert agent.bodies()[-1]["event"] == "close"
    assert "HTTP 404" in agent.bodies()[-1]["reason"]


async def test_from_env_factory_and_worker_spec(agent: FakeAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    """http_adapter_from_env and the HTTPAdapterFromEnv spec read ATLAS_HTTP_ADAPTER_* when called."""
    monkeypatch.setenv("ATLAS_HTTP_ADAPTER_URL", agent.url)
    monkeypatch.setenv("ATLAS_HTTP_ADAPTER_TIMEOUT_S", "7.5")
    monkeypatch.setenv("ATLAS_HTTP_ADAPTER_MAX_RETRIES", "1")
    monkeypatch.setenv("ATLAS_HTTP_ADAPTER_SESSION_EVENTS", "false")
    monkeypatch.setenv("ATLAS_HTTP_ADAPTER_AUTH_ENV", "MY_AGENT_AUTH")
    monkeypatch.setenv("MY_AGENT_AUTH", "Token abcdef123")
    built = http_adapter_from_env()
    assert (built.url, built.timeout_s, built.retry_policy.max_retries) == (agent.url, 7.5, 1)
    assert built.session_events is False
    loaded = load_adapter("worker.adapters:HTTPAdapterFromEnv", name="web")
    assert isinstance(loaded, HTTPAdapterFromEnv)
    try:
        assert loaded.name == "web"
        async with loaded.session(ctx("env")) as session:
            outcome = await session.step("hi")
    finally:
        await loaded.aclose()
    assert outcome.output == "env#1: hi (seen 1)"
    assert [b["event"] for b in agent.bodies()] == ["step"]
    assert agent.seen[0].headers["Authorization"] == "Token abcdef123"
    monkeypatch.delenv("ATLAS_HTTP_ADAPTER_URL")
    with pytest.raises(AdapterConfigError, match="ATLAS_HTTP_ADAPTER_URL"):
        load_adapter("worker.adapters:HTTPAdapterFromEnv", name="web")


def test_bad_configuration_is_rejected_without_values() -> None:
    """Bad URLs, header values with line breaks and negative retries raise; errors hide header values."""
    with pytest.raises(AdapterConfigError, match="http"):
        HTTPAdapter("ftp://example.com/agent")
    with pytest.raises(AdapterConfigError) as info:
        HTTPAdapter("http://127.0.0.1/agent", headers={"Authorization": "Bearer abc\r\nX-Evil: 1"})
    assert "Bearer abc" not in str(info.value)
    assert "Authorization" in str(info.value)
    with pytest.raises(AdapterConfigError, match="max_retries"):
        HTTPAdapter("http://127.0.0.1/agent", max_retries=-1)
    with pytest.raises(AdapterConfigError, match="timeout_s"):
        HTTPAdapter("http://127.0.0.1/agent", timeout_s=0)


def test_strip_url_and_retry_after() -> None:
    """URLs lose credentials and query strings; Retry-After accepts seconds and HTTP dates."""
    assert strip_url("https://user:pw@host:8443/v1/x?key=secret#frag") == "https://host:8443/v1/x"
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("-5") == 0.0
    from datetime import UTC, datetime

    now = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Mon, 01 Jan 2024 12:00:30 GMT", now=now) == 30.0
