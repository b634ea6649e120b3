"""The value a :class:`worker.sessions.Student` run returns (carried, partial, by ``AdapterError.result``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import JsonValue

from schemas import Usage
from worker.sessions._observer import RunStatus, StepReport


@dataclass(frozen=True, slots=True)
class StudentResult:
    """The outcome of one run in one adapter session.

    ``plan`` is ``{"steps": [{"id", "description", "depends_on"}, ...]}`` (``None`` if the plan step
    failed); ``steps`` are the step reports in order (the same objects the observer received); ``usage``
    sums them (``calls`` counts every step call, failed ones included). ``metadata["adapter_session"]``
    holds ``adapter_session_id``, ``adapter``, ``usage`` (as a dict), ``events``, ``metadata`` (the
    session's), ``close_metadata``, ``fallback`` (True if the stateless fallback was used) and
    ``open_attempts``; ``metadata["plan_fallback"]`` is True when the adapter's plan was unusable.
    """

    task_id: str
    task: str
    execution_mode: str
    adapter_session_id: str
    plan: dict[str, JsonValue] | None
    steps: list[StepReport]
    final_answer: str
    status: RunStatus
    usage: Usage
    metadata: dict[str, Any]
