"""The atlas-pipeline worker: adapter sessions and the Student that runs tasks in them."""

from worker._adapter import AgentAdapter, StatefulAgentAdapterMixin
from worker._context import SessionContext
from worker._demo import DemoAdapter, DemoFailureError
from worker._errors import (
    AdapterConfigError,
    AdapterError,
    OutcomeError,
    SessionClosedError,
    WorkerError,
)
from worker._imports import load_adapter, resolve_import
from worker._observer import CloseReport, OpenedInfo, SessionObserver, StepReport
from worker._outcome import StepOutcome, normalize_events, normalize_outcome, normalize_usage
from worker._plan import parse_plan
from worker._python_adapter import PythonAdapter
from worker._result import StudentResult
from worker._session import AgentSession, BaseSession, StatelessSession
from worker._student import Student

__all__ = [
    "AdapterConfigError",
    "AdapterError",
    "AgentAdapter",
    "AgentSession",
    "BaseSession",
    "CloseReport",
    "DemoAdapter",
    "DemoFailureError",
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
    "normalize_events",
    "normalize_outcome",
    "normalize_usage",
    "parse_plan",
    "resolve_import",
]
