"""The adapter session SDK: what an adapter author writes against, and the Student that drives it.

An adapter is an :class:`AgentAdapter` (stateless: implement ``ainvoke``) or a
:class:`StatefulAgentAdapterMixin` (implement ``open_session`` returning an :class:`AgentSession`, usually a
:class:`BaseSession` subclass); any plain Python object with hooks becomes one through
:class:`PythonAdapter`, and ``load_adapter("module:attr")`` resolves the specs a worker is configured with.
:class:`Student` runs a task in ONE session (plan -> execute per plan step -> synthesize) and reports each
step to a :class:`SessionObserver`. Helpers for adapter code: :func:`new_session_id` (the context's session
id, or a fresh one), :func:`to_jsonable` / :func:`to_json_object` / :func:`to_text` (any value as JSON or
text, as the worker stores it) and :data:`EventDict` (one entry of ``StepOutcome.events``).

This package never imports the queue runtime (``worker.runtime``) nor the built-in adapters
(``worker.adapters``): an adapter, its tests and offline tools load only this (``tests/test_worker_layout.py``
holds it to that).
"""

from worker.sessions._adapter import AgentAdapter, StatefulAgentAdapterMixin
from worker.sessions._context import SessionContext
from worker.sessions._errors import (
    AdapterConfigError,
    AdapterError,
    OutcomeError,
    SessionClosedError,
    WorkerError,
)
from worker.sessions._imports import load_adapter
from worker.sessions._json import to_json_object, to_jsonable, to_text
from worker.sessions._observer import CloseReport, OpenedInfo, SessionObserver, StepReport
from worker.sessions._outcome import (
    EventDict,
    StepOutcome,
    normalize_events,
    normalize_outcome,
    normalize_usage,
)
from worker.sessions._python_adapter import PythonAdapter
from worker.sessions._result import StudentResult
from worker.sessions._session import AgentSession, BaseSession, StatelessSession, new_session_id
from worker.sessions._student import Student

__all__ = [
    "AdapterConfigError",
    "AdapterError",
    "AgentAdapter",
    "AgentSession",
    "BaseSession",
    "CloseReport",
    "EventDict",
    "OpenedInfo",
    "OutcomeError",
    "PythonAdapter",
    "SessionClosedError",
    "SessionContext",
    "SessionObserver",
    "StatefulAgentAdapterMixin",
    "StatelessSession",
    "StepOutcome",
    "StepReport",
    "Student",
    "StudentResult",
    "WorkerError",
    "load_adapter",
    "new_session_id",
    "normalize_events",
    "normalize_outcome",
    "normalize_usage",
    "to_json_object",
    "to_jsonable",
    "to_text",
]
