"""Prometheus metrics of a worker (served on ``--metrics-port`` when set)."""

from __future__ import annotations

from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram

from atlas_common import DEFAULT_METRICS_HOST, MetricsServerError, serve_metrics
from worker.runtime._policy import Ack, DeadLetter, Outcome, Retry
from worker.runtime._telemetry import TelemetryPublisher
from worker.sessions import WorkerError

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


class WorkerMetrics:
    """Counters and histograms in a registry of their own (tests can build many workers per process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tasks = Counter(
            "atlas_worker_tasks", "Tasks settled, by outcome", ["outcome"], registry=self.registry
        )
        self.task_seconds = Histogram(
            "atlas_worker_task_seconds",
            "Task wall time from delivery to settle",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.session_seconds = Histogram(
            "atlas_worker_session_seconds",
            "Adapter session wall time, open to close",
            ["status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.step_seconds = Histogram(
            "atlas_worker_step_seconds",
            "Adapter step call time",
            ["phase"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "atlas_worker_tokens", "Tokens reported by adapters", ["kind"], registry=self.registry
        )
        self._children: dict[tuple[Any, ...], Any] = {}
        self.infra_errors = Counter(
            "atlas_worker_infrastructure_errors",
            "Tasks left unacked after a broker/ledger failure",
            registry=self.registry,
        )

    def _child(self, metric: Any, **label: str) -> Any:
        """A labelled child, looked up once: ``labels()`` costs more than the observation it labels."""
        key = (id(metric), *label.items())
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(**label)
        return child

    def observe(self, outcome: Outcome, seconds: float) -> None:
        match outcome:
            case Ack(duplicate=True):
                label = "duplicate"
            case Ack():
                label = "succeeded"
            case Retry():
                label = "retried"
            case DeadLetter():
                label = "dead_lettered"
        self._child(self.tasks, outcome=label).inc()
        self.task_seconds.observe(seconds)

    def observe_session(self, publisher: TelemetryPublisher) -> None:
        """Session, step and token figures from what the publisher saw of one session."""
        for phase, seconds in publisher.step_seconds:
            self._child(self.step_seconds, phase=phase).observe(seconds)
        close = publisher.close
        if close is None or publisher.opened_at is None:
            return
        self._child(self.session_seconds, status=close.status).observe(
            max(0.0, (close.closed_at - publisher.opened_at).total_seconds())
        )
        self._child(self.tokens, kind="prompt").inc(close.totals.prompt_tokens)
        self._child(self.tokens, kind="completion").inc(close.totals.completion_tokens)

    def serve(self, port: int, host: str = DEFAULT_METRICS_HOST) -> WSGIServer:
        """Serve the metrics on ``host:port``; one that cannot be bound is a :class:`WorkerError`."""
        try:
            return serve_metrics(self.registry, port, host)
        except MetricsServerError as exc:
            raise WorkerError(str(exc)) from None
