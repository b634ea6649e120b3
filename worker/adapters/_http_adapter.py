"""``HTTPAdapter``: a stateful adapter that POSTs every session event to an agent's HTTP endpoint.

Wire format (every request is ``POST <url>`` with a JSON body and the header
``X-Atlas-Session-Id: <adapter_session_id>``; the endpoint keys its per-session state on that id):

* open (only with ``session_events=True``, the default)::

    {"event": "open", "adapter_session_id", "task_id", "execution_mode", "task", "user_context",
     "tool_metadata"}

* each step (``step`` counts the session's steps from 1; a retried request repeats the same number)::

    {"event": "step", "adapter_session_id", "task_id", "execution_mode", "step", "payload", "metadata"}

* close (only with ``session_events=True``)::

    {"event": "close", "adapter_session_id", "task_id", "execution_mode", "reason", "steps"}

A step's reply is normalised by :func:`worker.sessions.normalize_outcome` when it is JSON (content type
``application/json`` or ``*+json``), so ``{"output": ..., "usage": {...}, "events": [...]}`` reports
usage and events; any other 2xx body is the output text. A JSON object replied to open is kept in the
session's metadata as ``endpoint``; one replied to close goes into the close metadata as ``endpoint``.
Timeouts, retries and error reporting are those of :mod:`worker.adapters._http`.

For a worker spec (``--adapter web=worker.adapters:HTTPAdapterFromEnv``) use
:class:`HTTPAdapterFromEnv`, which takes no arguments and reads ``ATLAS_HTTP_ADAPTER_*`` when built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Final

from pydantic_settings import SettingsConfigDict

from atlas_common import strip_url
from worker.adapters._env import AdapterEnvSettings, from_env
from worker.adapters._http import (
    JSONPoster,
    RetryPolicy,
    check_header_name,
    check_headers,
    check_url,
    secret_values,
)
from worker.sessions import (
    AdapterConfigError,
    AgentSession,
    BaseSession,
    SessionContext,
    StatefulAgentAdapterMixin,
    new_session_id,
    to_json_object,
    to_jsonable,
)

SESSION_HEADER: Final = "X-Atlas-Session-Id"


class HTTPAdapter(StatefulAgentAdapterMixin):
    """Posts each session's open, steps and close to ``url`` (see the module docstring for the wire format).

    One connection pool per adapter (created on first use; :meth:`aclose` closes it), one adapter session
    per Atlas session. ``headers`` are static extra headers; ``headers_from_env`` maps a header name to an
    environment variable whose value is sent verbatim (e.g. ``{"Authorization": "AGENT_TOKEN"}`` with
    ``AGENT_TOKEN="Bearer ..."``), read each time a session opens; an unset variable fails the open with
    :class:`AdapterConfigError`. Header values are never logged or shown in errors or reprs.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str = "http",
        headers: Mapping[str, str] | None = None,
        headers_from_env: Mapping[str, str] | None = None,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        retry_backoff_s: float = 0.2,
        max_retry_after_s: float = 30.0,
        session_events: bool = True,
    ) -> None:
        self.url = check_url(url, "HTTPAdapter url")
        self.name = name
        self.session_events = bool(session_events)
        self._headers = check_headers(headers, "HTTPAdapter headers")
        self._headers_from_env: dict[str, str] = {}
        for header, variable in (headers_from_env or {}).items():
            check_header_name(header, "HTTPAdapter headers_from_env")
            if not isinstance(variable, str) or not variable.strip():
                raise AdapterConfigError(
                    f"HTTPAdapter headers_from_env: header {header!r} needs an environment variable name"
                )
            self._headers_from_env[header] = variable.strip()
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

    @property
    def header_names(self) -> list[str]:
        """The names (never the values) of the extra headers sent, static and from the environment."""
        return sorted({*self._headers, *self._headers_from_env})

    def _session_headers(self) -> dict[str, str]:
        headers = dict(self._headers)
        for header, variable in self._headers_from_env.items():
            value = os.environ.get(variable)
            if value is None or not value.strip():
                raise AdapterConfigError(
                    f"adapter {self.name!r}: environment variable {variable} "
                    f"(for header {header!r}) is not set"
                )
            headers[header] = value.strip()
        return check_headers(headers, f"adapter {self.name!r}")

    async def open_session(self, context: SessionContext) -> AgentSession:
        session = _HTTPSession(self, context, self._session_headers())
        if self.session_events:
            await session.send_open()
        return session

    async def post(
        self, body: Mapping[str, Any], *, headers: Mapping[str, str], secrets: frozenset[str], what: str
    ) -> Any:
        """POST one event body; the decoded reply (JSON value or text)."""
        reply = await self._poster.post(self.url, body, headers=headers, secrets=secrets, what=what)
        return reply.decoded()

    async def aclose(self) -> None:
        """Close the connection pool (sessions opened later get a new one)."""
        await self._poster.aclose()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} name={self.name!r} url={strip_url(self.url)!r} "
            f"headers={self.header_names!r} session_events={self.session_events}>"
        )


class _HTTPSession(BaseSession):
    def __init__(self, adapter: HTTPAdapter, context: SessionContext, headers: Mapping[str, str]) -> None:
        super().__init__(
            new_session_id(context),
            {
                "adapter": adapter.name,
                "http": True,
                "url": strip_url(adapter.url),
                "task_id": context.task_id,
                "session_events": adapter.session_events,
            },
        )
        self._adapter = adapter
        self.context = context
        self._secrets = secret_values(headers.values())
        self._headers = {**headers, SESSION_HEADER: self.session_id}

    async def _post(self, body: Mapping[str, Any], what: str) -> Any:
        return await self._adapter.post(
            body, headers=self._headers, secrets=self._secrets, what=f"adapter {self._adapter.name!r} {what}"
        )

    def _envelope(self, event: str) -> dict[str, Any]:
        return {
            "event": event,
            "adapter_session_id": self.session_id,
            "task_id": self.context.task_id,
            "execution_mode": self.context.execution_mode,
        }

    async def send_open(self) -> None:
        body = {
            **self._envelope("open"),
            "task": to_jsonable(self.context.extra.get("task")),
            "user_context": to_jsonable(self.context.user_context),
            "tool_metadata": to_jsonable(self.context.tool_metadata),
        }
        reply = await self._post(body, "open")
        if isinstance(reply, dict) and reply:
            self.metadata["endpoint"] = reply

    async def _step(self, payload: Any, metadata: dict[str, Any]) -> Any:
        body = {
            **self._envelope("step"),
            "step": self.steps,
            "payload": to_jsonable(payload),
            "metadata": to_json_object(metadata),
        }
        return await self._post(body, f"step {self.steps}")

    async def _close(self, reason: str | None) -> Mapping[str, Any] | None:
        if not self._adapter.session_events:
            return None
        body = {**self._envelope("close"), "reason": reason, "steps": self.steps}
        reply = await self._post(body, "close")
        return {"endpoint": reply} if isinstance(reply, dict) and reply else None


class HTTPAdapterSettings(AdapterEnvSettings):
    """``ATLAS_HTTP_ADAPTER_*``; the defaults are :class:`HTTPAdapter`'s (a test holds them equal)."""

    model_config = SettingsConfigDict(env_prefix="ATLAS_HTTP_ADAPTER_")

    url: str
    timeout_s: float = 30.0
    max_retries: int = 3
    session_events: bool = True
    auth_env: str | None = None
    """The *name* of the variable whose value is sent as the ``Authorization`` header."""

    def adapter_arguments(self) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "url": self.url,
            "timeout_s": self.timeout_s,
            "max_retries": self.max_retries,
            "session_events": self.session_events,
        }
        if self.auth_env is not None:
            arguments["headers_from_env"] = {"Authorization": self.auth_env}
        return arguments


def _settings_from_env() -> dict[str, Any]:
    return from_env(HTTPAdapterSettings).adapter_arguments()


def http_adapter_from_env(*, name: str = "http") -> HTTPAdapter:
    """An :class:`HTTPAdapter` configured from the environment, read now (not at import).

    ``ATLAS_HTTP_ADAPTER_URL`` (required), ``ATLAS_HTTP_ADAPTER_TIMEOUT_S``,
    ``ATLAS_HTTP_ADAPTER_MAX_RETRIES``, ``ATLAS_HTTP_ADAPTER_SESSION_EVENTS`` (true/false) and
    ``ATLAS_HTTP_ADAPTER_AUTH_ENV``: the *name* of an environment variable whose value is sent as the
    ``Authorization`` header (read when each session opens).
    """
    return HTTPAdapter(**_settings_from_env(), name=name)


class HTTPAdapterFromEnv(HTTPAdapter):
    """:func:`http_adapter_from_env` as a class with a no-argument constructor, for worker specs.

    ``load_adapter("worker.adapters:HTTPAdapterFromEnv", name="web")`` instantiates it (reading the
    environment then) and names it ``web``; a plain factory function would be wrapped as a stateless
    callable instead.
    """

    def __init__(self, *, name: str = "http") -> None:
        super().__init__(**_settings_from_env(), name=name)
