"""The worker's exceptions. Everything the session API raises on purpose derives from ``WorkerError``."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.sessions._result import StudentResult


class WorkerError(Exception):
    """Root of every error the worker raises deliberately."""


class AdapterConfigError(WorkerError):
    """An adapter cannot be built: a bad import string, a target with no usable entry point, a bad hook."""


class OutcomeError(WorkerError, ValueError):
    """A step result cannot be normalised (e.g. usage that is not a JSON object of non-negative integers)."""


class SessionClosedError(WorkerError):
    """``step`` was called on a session that is already closed."""


class AdapterError(WorkerError):
    """The adapter failed during a run. ``reason`` is the close reason; ``result`` the partial result.

    Raised by :meth:`worker.sessions.Student.run` after the session was closed with ``reason`` and the
    observer (if any) saw the failing step and a ``failed`` close. ``phase`` and ``step_id`` say where it
    failed (``None`` when the failure was not in a step).
    """

    def __init__(
        self,
        reason: str,
        *,
        result: StudentResult | None = None,
        phase: str | None = None,
        step_id: int | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.result = result
        self.phase = phase
        self.step_id = step_id


def describe_exception(exc: BaseException) -> str:
    """The text used as a close reason: ``"cancelled"`` for cancellation, else ``str(exc)`` or the type."""
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return str(exc) or type(exc).__name__
