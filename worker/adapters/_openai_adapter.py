"""``OpenAIChatAdapter``: a stateful adapter over any OpenAI-compatible ``/v1/chat/completions`` server.

Works with OpenAI, vLLM, Ollama, llama.cpp's server, ... Each session keeps its conversation: the system
prompt (if any), every user message sent and every assistant reply, so step 2 sees step 1. A step's
payload becomes the user message (a string as is, anything else as compact JSON); a mapping with a
``role`` (e.g. a ``{"role": "tool", "tool_call_id": ..., "content": ...}`` result), or a list of such
mappings, is appended to the conversation as is. A failed request leaves the conversation unchanged.

Per step: output = the reply's ``content`` (``""`` when ``null``; text parts joined when it is a list),
usage = the response's ``usage``, events = ``{"type": "llm_call", "model", "finish_reason"}`` followed by
one ``{"type": "tool_call", "id", "name", "arguments"}`` per tool call in the reply (``arguments`` parsed
from its JSON string when it parses, else the string).

The API key is read from the environment variable named by ``api_key_env`` when a session opens, sent as
``Authorization: Bearer ...`` and never logged, put in a repr or in an error; no key (or
``api_key_env=None``) sends no ``Authorization`` header, for servers that need none. Timeouts, retries
(429/5xx/connection errors, honouring ``Retry-After`` up to ``max_retry_after_s``) are those of
:mod:`worker.adapters._http`.

For a worker spec (``--adapter llm=worker.adapters:OpenAIChatAdapterFromEnv``) use
:class:`OpenAIChatAdapterFromEnv`, which takes no arguments and reads ``ATLAS_OPENAI_*`` when built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Final

import orjson
import structlog
from pydantic import JsonValue
from pydantic_settings import SettingsConfigDict

from atlas_common import strip_url
from worker.adapters._env import AdapterEnvSettings, from_env
from worker.adapters._http import (
    AdapterHTTPError,
    JSONPoster,
    RetryPolicy,
    check_url,
    secret_values,
    snippet,
)
from worker.sessions import (
    AdapterConfigError,
    AgentSession,
    BaseSession,
    EventDict,
    SessionContext,
    StatefulAgentAdapterMixin,
    StepOutcome,
    new_session_id,
    normalize_usage,
    to_json_object,
    to_jsonable,
    to_text,
)

log = structlog.get_logger("worker.adapters")

_RESERVED_BODY_KEYS: Final = frozenset({"model", "messages"})

Message = dict[str, JsonValue]


class OpenAIChatAdapter(StatefulAgentAdapterMixin):
    """Chat completions at ``{base_url}/chat/completions`` (``base_url`` like ``http://host:8000/v1``).

    ``temperature``/``max_tokens``/``tools`` are sent only when given; ``extra_body`` is merged into every
    request body (it may not set ``model`` or ``messages``). See the module docstring for the rest.
    """

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        name: str = "openai",
        system_prompt: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        retry_backoff_s: float = 0.5,
        max_retry_after_s: float = 30.0,
        tools: Sequence[Mapping[str, Any]] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        self.base_url = check_url(base_url, "OpenAIChatAdapter base_url").rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        if not isinstance(model, str) or not model.strip():
            raise AdapterConfigError("OpenAIChatAdapter model must be a non-empty string")
        self.model = model.strip()
        if api_key_env is not None and (not isinstance(api_key_env, str) or not api_key_env.strip()):
            raise AdapterConfigError(
                "OpenAIChatAdapter api_key_env must be None or an environment variable name"
            )
        self.api_key_env = api_key_env.strip() if api_key_env else None
        self.name = name
        self.system_prompt = system_prompt or None
        if temperature is not None and (
            isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature < 0
        ):
            raise AdapterConfigError("OpenAIChatAdapter temperature must be None or a non-negative number")
        self.temperature = temperature
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            raise AdapterConfigError("OpenAIChatAdapter max_tokens must be None or a positive integer")
        self.max_tokens = max_tokens
        self.tools: list[JsonValue] | None = [to_jsonable(t) for t in tools] if tools else None
        extra = to_json_object(extra_body)
        reserved = sorted(_RESERVED_BODY_KEYS & extra.keys())
        if reserved:
            raise AdapterConfigError(f"OpenAIChatAdapter extra_body must not set {', '.join(reserved)}")
        self.extra_body = extra
        self._poster = JSONPoster(
            RetryPolicy(
                max_retries=max_retries, backoff_s=retry_backoff_s, max_retry_after_s=max_retry_after_s
            ),
            timeout_s=timeout_s,
        )

    @property
    def timeout_s(self) -> float:
        return self._poster.timeout_s

    @property
    def retry_policy(self) -> RetryPolicy:
        return self._poster.policy

    def request_body(self, messages: Sequence[Message]) -> dict[str, Any]:
        """The JSON body of one chat completion request for ``messages``."""
        body: dict[str, Any] = {**self.extra_body, "model": self.model, "messages": list(messages)}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.tools:
            body["tools"] = self.tools
        return body

    def _auth_headers(self) -> dict[str, str]:
        if self.api_key_env is None:
            return {}
        key = os.environ.get(self.api_key_env, "").strip()
        if not key:
            return {}
        if any(ch in key for ch in "\r\n\0"):
            raise AdapterConfigError(
                f"adapter {self.name!r}: environment variable {self.api_key_env} contains a line break or NUL"
            )
        return {"Authorization": f"Bearer {key}"}

    async def open_session(self, context: SessionContext) -> AgentSession:
        return _ChatSession(self, context, self._auth_headers())

    async def complete(
        self, messages: Sequence[Message], *, headers: Mapping[str, str], secrets: frozenset[str]
    ) -> dict[str, Any]:
        """POST one chat completion; the response object (an error if it is not a JSON object)."""
        what = f"adapter {self.name!r} chat completion"
        reply = await self._poster.post(
            self.url, self.request_body(messages), headers=headers, secrets=secrets, what=what
        )
        data = reply.decoded()
        if not isinstance(data, dict):
            raise AdapterHTTPError(
                f"{what}: {strip_url(self.url)} replied with something other than a JSON object: "
                f"{snippet(reply.body, secrets)}",
                url=strip_url(self.url),
                status=reply.status,
                attempts=reply.attempts,
            )
        return data

    async def aclose(self) -> None:
        """Close the connection pool (sessions opened later get a new one)."""
        await self._poster.aclose()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} name={self.name!r} model={self.model!r} "
            f"base_url={strip_url(self.base_url)!r} api_key_env={self.api_key_env!r}>"
        )


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": "..."}, ...]
        texts = [part.get("text") for part in content if isinstance(part, dict)]
        return "".join(t for t in texts if isinstance(t, str))
    return to_text(content)


def _arguments(raw: Any) -> JsonValue:
    if isinstance(raw, str):
        try:
            parsed: JsonValue = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw
        return parsed
    return to_jsonable(raw)


def _tool_call_event(call: Any) -> EventDict:
    call = call if isinstance(call, dict) else {}
    function = call.get("function")
    function = function if isinstance(function, dict) else {}
    return {
        "type": "tool_call",
        "id": to_jsonable(call.get("id")),
        "name": to_jsonable(function.get("name")),
        "arguments": _arguments(function.get("arguments")),
    }


def _user_messages(payload: Any) -> list[Message]:
    if isinstance(payload, Mapping) and "role" in payload:
        return [to_json_object(payload)]
    if (
        isinstance(payload, list | tuple)
        and payload
        and all(isinstance(item, Mapping) and "role" in item for item in payload)
    ):
        return [to_json_object(item) for item in payload]
    return [{"role": "user", "content": to_text(payload)}]


class _ChatSession(BaseSession):
    def __init__(self, adapter: OpenAIChatAdapter, context: SessionContext, headers: dict[str, str]) -> None:
        super().__init__(
            new_session_id(context),
            {
                "adapter": adapter.name,
                "model": adapter.model,
                "base_url": strip_url(adapter.base_url),
                "task_id": context.task_id,
                "authenticated": bool(headers),
            },
        )
        self._adapter = adapter
        self.context = context
        self._headers = headers
        self._secrets = secret_values(headers.values())
        self._messages: list[Message] = []
        if adapter.system_prompt:
            self._messages.append({"role": "system", "content": adapter.system_prompt})

    @property
    def messages(self) -> list[Message]:
        """A copy of the conversation so far."""
        return [dict(m) for m in self._messages]

    async def _step(self, payload: Any, metadata: dict[str, Any]) -> StepOutcome:  # noqa: ARG002 -- not sent to the model
        new = _user_messages(payload)
        data = await self._adapter.complete(
            [*self._messages, *new], headers=self._headers, secrets=self._secrets
        )
        choices = data.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
            url = strip_url(self._adapter.url)
            raise AdapterHTTPError(
                f"adapter {self._adapter.name!r} chat completion: {url} replied without choices[0].message: "
                f"{snippet(orjson.dumps(data), self._secrets)}",
                url=url,
                status=200,
            )
        message: dict[str, Any] = choice["message"]
        tool_calls = message.get("tool_calls") or []
        tool_calls = tool_calls if isinstance(tool_calls, list) else [tool_calls]
        reply: Message = {"role": "assistant", "content": to_jsonable(message.get("content"))}
        if tool_calls:
            reply["tool_calls"] = to_jsonable(tool_calls)
        usage = normalize_usage(data.get("usage"))
        model = data.get("model") if isinstance(data.get("model"), str) else self._adapter.model
        finish_reason = to_jsonable(choice.get("finish_reason"))
        events: list[EventDict] = [{"type": "llm_call", "model": model, "finish_reason": finish_reason}]
        events.extend(_tool_call_event(call) for call in tool_calls)
        self._messages.extend([*new, reply])
        log.debug(
            "openai.chat_completion",
            adapter=self._adapter.name,
            model=model,
            finish_reason=finish_reason,
            tool_calls=len(tool_calls),
            total_tokens=usage.total_tokens,
        )
        return StepOutcome(output=_content_text(message.get("content")), usage=usage, events=events, raw=data)

    async def _close(self, reason: str | None) -> Mapping[str, Any]:  # noqa: ARG002 -- base records it
        return {"model": self._adapter.model, "messages": len(self._messages)}


class OpenAIChatSettings(AdapterEnvSettings):
    """``ATLAS_OPENAI_*``; the defaults are :class:`OpenAIChatAdapter`'s (a test holds them equal)."""

    model_config = SettingsConfigDict(env_prefix="ATLAS_OPENAI_")

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    """The *name* of the key's variable; the key itself is read when each session opens."""
    system_prompt: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    timeout_s: float = 60.0
    max_retries: int = 3


def _settings_from_env() -> dict[str, Any]:
    return from_env(OpenAIChatSettings).model_dump()


def openai_adapter_from_env(*, name: str = "openai") -> OpenAIChatAdapter:
    """An :class:`OpenAIChatAdapter` configured from the environment, read now (not at import).

    Required: ``ATLAS_OPENAI_BASE_URL`` (e.g. ``http://localhost:8000/v1``), ``ATLAS_OPENAI_MODEL``.
    Optional: ``ATLAS_OPENAI_API_KEY_ENV`` (the *name* of the key's variable, default
    ``OPENAI_API_KEY``; the key itself is read when each session opens), ``ATLAS_OPENAI_SYSTEM_PROMPT``,
    ``ATLAS_OPENAI_TEMPERATURE``, ``ATLAS_OPENAI_MAX_TOKENS``, ``ATLAS_OPENAI_TIMEOUT_S``,
    ``ATLAS_OPENAI_MAX_RETRIES``.
    """
    return OpenAIChatAdapter(**_settings_from_env(), name=name)


class OpenAIChatAdapterFromEnv(OpenAIChatAdapter):
    """:func:`openai_adapter_from_env` as a class with a no-argument constructor, for worker specs.

    ``load_adapter("worker.adapters:OpenAIChatAdapterFromEnv", name="llm")`` instantiates it
    (reading the environment then) and names it ``llm``.
    """

    def __init__(self, *, name: str = "openai") -> None:
        super().__init__(**_settings_from_env(), name=name)
