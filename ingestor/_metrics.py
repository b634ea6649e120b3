"""Prometheus metrics of an ingestor (served on ``metrics_port`` when set)."""

from __future__ import annotations

from datetime import UTC, datetime
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from atlas_common import DEFAULT_METRICS_HOST, MetricsServerError, serve_metrics
from ingestor._errors import ConfigError

_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000)
_FLUSH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class IngestorMetrics:
    """Counters, histograms and the lag gauge, in a registry of their own (tests run many per process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.batches = Counter("atlas_ingestor_batches", "Batches written and acked", registry=self.registry)
        self.records = Counter("atlas_ingestor_records", "Telemetry records written", registry=self.registry)
        self.dead_lettered = Counter(
            "atlas_ingestor_dead_lettered",
            "Records or bodies sent to the dead-letter queue",
            registry=self.registry,
        )
        self.exported = Counter(
            "atlas_ingestor_sessions_exported", "Sessions assigned to a JSONL file", registry=self.registry
        )
        self.batch_records = Histogram(
            "atlas_ingestor_batch_records", "Records per batch", buckets=_SIZE_BUCKETS, registry=self.registry
        )
        self.flush_seconds = Histogram(
            "atlas_ingestor_flush_seconds",
            "Time to write a batch to Postgres and JSONL and ack it",
            buckets=_FLUSH_BUCKETS,
            registry=self.registry,
        )
        self.unaccounted = Gauge(
            "atlas_tasks_unaccounted",
            "Tasks the ledger calls succeeded whose session is not stored and exported after the grace period"
            " (python -m producer audit lists them)",
            registry=self.registry,
        )
        self.lag_seconds = Gauge(
            "atlas_ingestor_lag_seconds",
            "Age of the oldest record of the last batch when it was acked (emitted -> stored)",
            registry=self.registry,
        )

    def observe_batch(
        self, *, records: int, dead: int, exported: int, seconds: float, oldest: datetime | None
    ) -> None:
        self.batches.inc()
        self.records.inc(records)
        self.dead_lettered.inc(dead)
        self.exported.inc(exported)
        self.batch_records.observe(records)
        self.flush_seconds.observe(seconds)
        if oldest is not None:
            self.lag_seconds.set(max(0.0, (datetime.now(UTC) - oldest).total_seconds()))

    def serve(self, port: int, host: str = DEFAULT_METRICS_HOST) -> WSGIServer:
        """Serve the metrics on ``host:port``; one that cannot be bound is a :class:`ConfigError`."""
        try:
            return serve_metrics(self.registry, port, host)
        except MetricsServerError as exc:
            raise ConfigError(str(exc)) from None
