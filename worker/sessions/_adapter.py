"""Adapters: the base class (stateless by default) and the mixin for adapters with real sessions."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from worker.sessions._context import SessionContext
from worker.sessions._errors import describe_exception
from worker.sessions._outcome import StepOutcome
from worker.sessions._session import AgentSession, StatelessSession


async def close_after_error(session: AgentSession, exc: BaseException) -> None:
    """Close ``session`` with ``exc``'s text as reason; a failing close is noted on ``exc``, not raised."""
    try:
        await session.close(describe_exception(exc))
    except Exception as close_exc:  # noqa: BLE001 -- the original error is the one to report
        exc.add_note(f"closing adapter session {session.session_id} also failed: {close_exc!r}")


class AgentAdapter:
    """Base adapter. A subclass that only implements ``ainvoke`` works with sessions unchanged.

    ``open_session`` returns a :class:`StatelessSession` proxy whose ``step`` calls ``ainvoke`` with
    ``adapter_session_id`` in the call's metadata. Adapters with real per-session state inherit
    :class:`StatefulAgentAdapterMixin` (or set ``supports_sessions = True``) and override ``open_session``.
    """

    name: str = "adapter"
    supports_sessions: bool = False

    async def ainvoke(self, prompt: Any, metadata: Mapping[str, Any] | None = None) -> Any:
        """One stateless call. The base class has none; subclasses override this or ``open_session``."""
        raise NotImplementedError(f"adapter {self.name!r} does not implement ainvoke")

    async def open_session(self, context: SessionContext) -> AgentSession:
        """Open a session; the base returns a stateless proxy over ``ainvoke``."""
        return StatelessSession(self, context)

    @asynccontextmanager
    async def session(self, context: SessionContext) -> AsyncIterator[AgentSession]:
        """``async with adapter.session(ctx) as s``: open, yield, and always close.

        On an exception (including cancellation) the session is closed with the exception text as the
        reason (``"cancelled"`` for cancellation) and the exception is re-raised unchanged.
        """
        session = await self.open_session(context)
        try:
            yield session
        except BaseException as exc:
            await close_after_error(session, exc)
            raise
        await session.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} supports_sessions={self.supports_sessions}>"


class StatefulAgentAdapterMixin(AgentAdapter):
    """For adapters whose sessions keep state: ``supports_sessions = True``; implement ``open_session``.

    ``ainvoke`` is provided as a one-shot session (open, one step, close), so such an adapter can also be
    called statelessly. Its context takes ``task_id``/``execution_mode``/``adapter_session_id`` from the
    call's metadata when present.
    """

    supports_sessions: bool = True

    async def open_session(self, context: SessionContext) -> AgentSession:
        raise NotImplementedError(f"stateful adapter {self.name!r} must implement open_session")

    async def ainvoke(self, prompt: Any, metadata: Mapping[str, Any] | None = None) -> Any:
        return await invoke_once(self, prompt, metadata)


async def invoke_once(adapter: AgentAdapter, prompt: Any, metadata: Mapping[str, Any] | None) -> StepOutcome:
    """A one-shot session: open, one step, close. The context comes from the call's metadata if present."""
    call = dict(metadata or {})
    context = SessionContext(
        task_id=str(call.get("task_id") or uuid.uuid4().hex),
        execution_mode=str(call.get("execution_mode") or "single_shot"),
        session_id=str(call.get("adapter_session_id") or "") or None,
    )
    async with adapter.session(context) as session:
        return await session.step(prompt, call)
