"""The root of the queue runtime's own errors, apart from the SDK's."""

from __future__ import annotations

from worker.sessions import WorkerError


class WorkerRuntimeError(WorkerError):
    """Raised by the queue runtime, never by an adapter or the SDK: a service it needs is missing, behind or
    not answering (the task ledger, the schema, the broker's telemetry confirms). A :class:`WorkerError`
    still, so ``except WorkerError`` catches it as before."""
