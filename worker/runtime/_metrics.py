"""Prometheus metrics of a worker (served on ``--metrics-port`` when set).

The per-task figures (outcomes, task, session and step latencies, tokens: about ten observations a task)
are plain Python tallies that the registry renders when it is scraped (:class:`_Tally`):
``prometheus_client``'s own metrics take a lock and walk their buckets per observation, 17 us a task here,
~3 % of the worker's CPU; these take ~3 us. Only the worker's event loop writes them; a scrape (the
metrics server's thread) copies each series first, so it reads every bucket of one series from one moment.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from atlas_common import DEFAULT_METRICS_HOST, MetricsServerError, serve_metrics
from worker.runtime._policy import Ack, DeadLetter, Outcome, Retry
from worker.runtime._telemetry import TelemetryPublisher
from worker.sessions import WorkerError

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


class _Histogram:
    """One histogram family: per label value, the count of each bucket (the last one +Inf), then the sum."""

    def __init__(self, name: str, documentation: str, label: str | None) -> None:
        self._name, self._documentation, self._label = name, documentation, label
        self._bounds = tuple(float(b) for b in _LATENCY_BUCKETS)
        self._les = [*(repr(b) for b in self._bounds), "+Inf"]  # what prometheus_client writes
        self.series: dict[str, list[float]] = {}

    def observe(self, value: float, label_value: str = "") -> None:
        series = self.series.get(label_value)
        if series is None:
            series = self.series[label_value] = [0.0] * (len(self._bounds) + 2)
        series[bisect_left(self._bounds, value)] += 1  # the first bucket whose bound is >= value (le)
        series[-1] += value

    def collect(self) -> Metric:
        labels = [self._label] if self._label is not None else []
        family = HistogramMetricFamily(self._name, self._documentation, labels=labels)
        for label_value, series in list(self.series.items()):
            snapshot = list(series)
            buckets = list(zip(self._les, accumulate(snapshot[:-1]), strict=True))
            family.add_metric([label_value] if labels else [], buckets, snapshot[-1])
        return family


class _Counter:
    """One counter family by one label: value per label value."""

    def __init__(self, name: str, documentation: str, label: str) -> None:
        self._name, self._documentation, self._label = name, documentation, label
        self.values: dict[str, float] = {}

    def inc(self, label_value: str, amount: float = 1) -> None:
        self.values[label_value] = self.values.get(label_value, 0) + amount

    def collect(self) -> Metric:
        family = CounterMetricFamily(self._name, self._documentation, labels=[self._label])
        for label_value, value in list(self.values.items()):
            family.add_metric([label_value], value)
        return family


class _Tally:
    """The per-task figures, rendered by the registry at scrape time."""

    def __init__(self) -> None:
        self.tasks = _Counter("atlas_worker_tasks", "Tasks settled, by outcome", "outcome")
        self.task_seconds = _Histogram(
            "atlas_worker_task_seconds", "Task wall time from delivery to settle", None
        )
        self.session_seconds = _Histogram(
            "atlas_worker_session_seconds", "Adapter session wall time, open to close", "status"
        )
        self.step_seconds = _Histogram("atlas_worker_step_seconds", "Adapter step call time", "phase")
        self.tokens = _Counter("atlas_worker_tokens", "Tokens reported by adapters", "kind")

    def collect(self) -> Iterator[Metric]:
        for metric in (self.tasks, self.task_seconds, self.session_seconds, self.step_seconds, self.tokens):
            yield metric.collect()


class WorkerMetrics:
    """The worker's metrics, in a registry of their own (tests can build many workers per process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._tally = _Tally()
        self.registry.register(self._tally)
        self.infra_errors = Counter(
            "atlas_worker_infrastructure_errors",
            "Tasks left unacked after a broker/ledger failure",
            registry=self.registry,
        )

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
        self._tally.tasks.inc(label)
        self._tally.task_seconds.observe(seconds)

    def observe_session(self, publisher: TelemetryPublisher) -> None:
        """Session, step and token figures from what the publisher saw of one session."""
        tally = self._tally
        for phase, seconds in publisher.step_seconds:
            tally.step_seconds.observe(seconds, phase)
        close = publisher.close
        if close is None or publisher.opened_at is None:
            return
        seconds = max(0.0, (close.closed_at - publisher.opened_at).total_seconds())
        tally.session_seconds.observe(seconds, close.status)
        tally.tokens.inc("prompt", close.totals.prompt_tokens)
        tally.tokens.inc("completion", close.totals.completion_tokens)

    def serve(self, port: int, host: str = DEFAULT_METRICS_HOST) -> WSGIServer:
        """Serve the metrics on ``host:port``; one that cannot be bound is a :class:`WorkerError`."""
        try:
            return serve_metrics(self.registry, port, host)
        except MetricsServerError as exc:
            raise WorkerError(str(exc)) from None
