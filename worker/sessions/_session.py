"""The session protocol, a base class that makes ``close`` idempotent, and the stateless proxy."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from worker.sessions._context import SessionContext
from worker.sessions._errors import SessionClosedError, describe_exception
from worker.sessions._json import to_json_object
from worker.sessions._outcome import StepOutcome, normalize_outcome


@runtime_checkable
class AgentSession(Protocol):
    """One open adapter session: steps share its state until ``close``.

    ``step`` returns a normalised :class:`StepOutcome`; ``close`` returns JSON-able close metadata, and a
    second ``close`` is a no-op returning the same metadata.
    """

    @property
    def session_id(self) -> str: ...

    @property
    def metadata(self) -> dict[str, Any]: ...

    async def step(self, payload: Any, metadata: Mapping[str, Any] | None = None) -> StepOutcome: ...

    async def close(self, reason: str | None = None) -> dict[str, Any]: ...


class SupportsAinvoke(Protocol):
    """What the stateless proxy needs from an adapter."""

    name: str

    async def ainvoke(self, prompt: Any, metadata: Mapping[str, Any] | None = None) -> Any: ...


def new_session_id(context: SessionContext) -> str:
    """``context.session_id`` if given, else a fresh ``uuid4().hex``."""
    return context.session_id or uuid.uuid4().hex


class BaseSession:
    """A convenient base for session implementations.

    Subclasses implement ``_step`` (any result; it is normalised) and optionally ``_close`` (returning a
    mapping merged into the close metadata). ``close`` runs ``_close`` at most once: the close metadata is
    ``{"adapter_session_id", "reason", "steps", **hook_result}``; if ``_close`` raises, the error text is
    recorded as ``close_error`` instead of being raised (a close must not fail a finished run), except for
    cancellation, which is recorded and re-raised. ``step`` after ``close`` raises ``SessionClosedError``.
    """

    def __init__(self, session_id: str, metadata: Mapping[str, Any] | None = None) -> None:
        self._session_id = session_id
        self._metadata: dict[str, Any] = dict(metadata or {})
        self._steps = 0
        self._close_metadata: dict[str, Any] | None = None

    @property
    def session_id(self) -> str:
        return self._session_id

    @property
    def metadata(self) -> dict[str, Any]:
        return self._metadata

    @property
    def closed(self) -> bool:
        return self._close_metadata is not None

    @property
    def steps(self) -> int:
        """How many ``step`` calls were made (including failed ones)."""
        return self._steps

    async def _step(self, payload: Any, metadata: dict[str, Any]) -> Any:
        raise NotImplementedError

    async def _close(self, reason: str | None) -> Mapping[str, Any] | None:  # noqa: ARG002 -- a no-op hook
        return None

    def _call_metadata(self, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
        merged = dict(metadata) if metadata else {}
        merged["adapter_session_id"] = self._session_id
        return merged

    async def step(self, payload: Any, metadata: Mapping[str, Any] | None = None) -> StepOutcome:
        if self._close_metadata is not None:
            raise SessionClosedError(f"adapter session {self._session_id} is closed")
        self._steps += 1
        return normalize_outcome(await self._step(payload, self._call_metadata(metadata)))

    async def close(self, reason: str | None = None) -> dict[str, Any]:
        if self._close_metadata is not None:
            return self._close_metadata
        result: dict[str, Any] = {
            "adapter_session_id": self._session_id,
            "reason": reason,
            "steps": self._steps,
        }
        self._close_metadata = result  # set first: a concurrent second close gets this same dict
        try:
            extra = await self._close(reason)
        except BaseException as exc:
            result["close_error"] = describe_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            if extra:
                result.update(to_json_object(extra))
        return result


class StatelessSession(BaseSession):
    """A session proxy over an adapter's ``ainvoke``: no state is kept between steps.

    Each ``step`` calls ``adapter.ainvoke(payload, metadata)`` where ``metadata`` is the caller's metadata
    plus ``adapter_session_id`` (the session's id wins over a caller's key of that name). Nothing is
    called on ``close``. ``metadata`` starts as ``{"adapter", "stateless": True, "task_id",
    "execution_mode"}`` plus anything passed as ``metadata`` (e.g. ``fallback``).
    """

    def __init__(
        self,
        adapter: SupportsAinvoke,
        context: SessionContext,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        base = {
            "adapter": adapter.name,
            "stateless": True,
            "task_id": context.task_id,
            "execution_mode": context.execution_mode,
        }
        super().__init__(new_session_id(context), {**base, **(metadata or {})})
        self._adapter = adapter
        self.context = context

    async def _step(self, payload: Any, metadata: dict[str, Any]) -> Any:
        return await self._adapter.ainvoke(payload, metadata)
