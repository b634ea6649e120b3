"""The atlas-pipeline worker, in three packages:

- ``worker.sessions``: the adapter session SDK (adapters, sessions, the Student); the names adapter authors
  import most are re-exported here.
- ``worker.adapters``: the built-in adapters (demo, HTTP, OpenAI-compatible chat).
- ``worker.runtime``: the queue runtime that ``python -m worker`` runs.

Only the SDK is re-exported: importing an adapter's base class must not load the broker, database and
HTTP stacks, so ``Worker``/``WorkerSettings`` stay in ``worker.runtime`` and ``DemoAdapter`` in
``worker.adapters``.
"""

from worker.sessions import (
    AdapterConfigError,
    AdapterError,
    AgentAdapter,
    AgentSession,
    BaseSession,
    PythonAdapter,
    SessionContext,
    StatefulAgentAdapterMixin,
    StatelessSession,
    StepOutcome,
    Student,
)

__all__ = [
    "AdapterConfigError",
    "AdapterError",
    "AgentAdapter",
    "AgentSession",
    "BaseSession",
    "PythonAdapter",
    "SessionContext",
    "StatefulAgentAdapterMixin",
    "StatelessSession",
    "StepOutcome",
    "Student",
]
