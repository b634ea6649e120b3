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
from worker._http import AdapterHTTPError
from worker._http_adapter import HTTPAdapter, HTTPAdapterFromEnv, http_adapter_from_env
from worker._imports import load_adapter, resolve_import
from worker._observer import CloseReport, OpenedInfo, SessionObserver, StepReport
from worker._openai_adapter import OpenAIChatAdapter, OpenAIChatAdapterFromEnv, openai_adapter_from_env
from worker._outcome import StepOutcome, normalize_events, normalize_outcome, normalize_usage
from worker._plan import parse_plan
from worker._python_adapter import PythonAdapter
from worker._registry import AdapterRegistry
from worker._result import StudentResult
from worker._runtime import Worker
from worker._session import AgentSession, BaseSession, StatelessSession
from worker._settings import WorkerSettings
from worker._student import Student

__all__ = [
    "AdapterConfigError",
    "AdapterError",
    "AdapterHTTPError",
    "AdapterRegistry",
    "AgentAdapter",
    "AgentSession",
    "BaseSession",
    "CloseReport",
    "DemoAdapter",
    "DemoFailureError",
    "HTTPAdapter",
    "HTTPAdapterFromEnv",
    "OpenAIChatAdapter",
    "OpenAIChatAdapterFromEnv",
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
    "Worker",
    "WorkerError",
    "WorkerSettings",
    "http_adapter_from_env",
    "load_adapter",
    "normalize_events",
    "normalize_outcome",
    "normalize_usage",
    "openai_adapter_from_env",
    "parse_plan",
    "resolve_import",
]
