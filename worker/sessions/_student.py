"""``Student``: runs a task as plan -> execute per plan step -> synthesize in ONE adapter session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final

import structlog

from atlas_common import Backoff
from schemas import new_task_id
from worker.sessions._adapter import AgentAdapter, close_after_error
from worker.sessions._context import SessionContext
from worker.sessions._errors import describe_exception
from worker.sessions._observer import SessionObserver
from worker.sessions._result import StudentResult
from worker.sessions._run import Run
from worker.sessions._session import AgentSession, StatelessSession

log = structlog.get_logger("worker.sessions")

_MAX_OPEN_BACKOFF_S: Final = 30.0
"""The longest wait between two attempts to open a session."""


class Student:
    """Drives one adapter through sessions.

    Opening a session is tried ``max_open_attempts`` times, sleeping ``open_backoff_s * 2**(n-1)`` (up
    to 20 % less: jitter; at most 30 s) after the n-th failure; after the last failure
    a :class:`StatelessSession` over the adapter's ``ainvoke`` is used instead, with ``metadata``
    ``{"fallback": True, "open_error": ..., "open_attempts": ...}``. Every session opened is closed,
    whatever happens.
    """

    def __init__(
        self, adapter: AgentAdapter, *, max_open_attempts: int = 3, open_backoff_s: float = 0.05
    ) -> None:
        if max_open_attempts < 1:
            raise ValueError("max_open_attempts must be at least 1")
        if open_backoff_s < 0:
            raise ValueError("open_backoff_s must not be negative")
        self.adapter = adapter
        self.max_open_attempts = max_open_attempts
        self.open_backoff_s = open_backoff_s

    @staticmethod
    def _context(
        task: str,
        execution_mode: str,
        *,
        user_context: Mapping[str, Any] | None,
        task_id: str | None,
        session_id: str | None,
    ) -> SessionContext:
        return SessionContext(
            task_id=task_id or new_task_id(),
            execution_mode=execution_mode,
            user_context=user_context,
            session_id=session_id,
            extra={"task": task},
        )

    async def _open(self, context: SessionContext) -> tuple[AgentSession, int, bool]:
        """``(session, attempts, fallback)``. Cancellation while opening propagates."""
        error = ""
        backoff = Backoff(initial_s=min(self.open_backoff_s, _MAX_OPEN_BACKOFF_S), max_s=_MAX_OPEN_BACKOFF_S)
        for attempt in range(1, self.max_open_attempts + 1):
            try:
                return await self.adapter.open_session(context), attempt, False
            except Exception as exc:  # noqa: BLE001 -- any open failure is retried, then falls back
                error = describe_exception(exc)
                log.warning(
                    "session.open_failed",
                    adapter=self.adapter.name,
                    attempt=attempt,
                    max_attempts=self.max_open_attempts,
                    error=error,
                )
                if attempt < self.max_open_attempts:
                    await asyncio.sleep(backoff.next())
        fallback = StatelessSession(
            self.adapter,
            context,
            metadata={
                "fallback": True,
                "open_error": error,
                "open_attempts": self.max_open_attempts,
            },
        )
        return fallback, self.max_open_attempts, True

    @asynccontextmanager
    async def session_scope(
        self,
        task: str,
        execution_mode: str,
        *,
        user_context: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        session_id: str | None = None,
    ) -> AsyncIterator[AgentSession]:
        """Open exactly one session (with retries/fallback), yield it, and always close it.

        The context's ``extra`` is ``{"task": task}``. On an exception the session is closed with its
        text (``"cancelled"`` for cancellation) as the reason and the exception is re-raised.
        """
        context = self._context(
            task, execution_mode, user_context=user_context, task_id=task_id, session_id=session_id
        )
        session, _, _ = await self._open(context)
        try:
            yield session
        except BaseException as exc:
            await close_after_error(session, exc)
            raise
        await session.close()

    async def run(
        self,
        task: str,
        execution_mode: str = "stepwise",
        *,
        task_id: str | None = None,
        session_id: str | None = None,
        observer: SessionObserver | None = None,
    ) -> StudentResult:
        """Plan, execute each plan step, synthesize: all in one session, which is always closed.

        Raises :class:`AdapterError` (with the partial result) when an adapter step fails, after the
        observer got the error step and a ``failed`` close. An observer exception or cancellation closes
        the session (reason: the exception text / ``"cancelled"``) and propagates unchanged.
        """
        context = self._context(
            task, execution_mode, user_context=None, task_id=task_id, session_id=session_id
        )
        session, attempts, fallback = await self._open(context)
        run = Run(
            adapter_name=self.adapter.name,
            session=session,
            context=context,
            task=task,
            observer=observer,
            open_attempts=attempts,
            fallback=fallback,
        )
        return await run.execute()
