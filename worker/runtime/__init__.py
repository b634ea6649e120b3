"""The queue runtime that ``python -m worker`` runs: consume tasks, run each in one adapter session (through
the SDK, ``worker.sessions``), stream its telemetry, keep the task ledger, settle the delivery.

Adapters never import this package; only the service (and its tests) do.
"""

from atlas_common import BrokerUnavailable
from worker.runtime._errors import WorkerRuntimeError
from worker.runtime._ledger import LedgerUnavailable
from worker.runtime._metrics import WorkerMetrics
from worker.runtime._registry import AdapterRegistry
from worker.runtime._runtime import SchemaBehind, Worker
from worker.runtime._settings import WorkerSettings

__all__ = [
    "AdapterRegistry",
    "BrokerUnavailable",
    "LedgerUnavailable",
    "SchemaBehind",
    "Worker",
    "WorkerMetrics",
    "WorkerRuntimeError",
    "WorkerSettings",
]
