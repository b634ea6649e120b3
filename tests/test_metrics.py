"""Prometheus metrics of the worker and the ingestor count what they are told (pure, no services)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client import generate_latest

from ingestor._metrics import IngestorMetrics
from schemas import SessionClosed, TaskMessage, Usage
from worker._metrics import WorkerMetrics
from worker._policy import Ack, DeadLetter, Retry
from worker._telemetry import TelemetryPublisher


def _sample(registry_text: bytes, name: str) -> float:
    for line in registry_text.decode().splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def test_worker_counts_outcomes_by_label() -> None:
    """Each settled outcome lands under its own label of atlas_worker_tasks_total."""
    metrics = WorkerMetrics()
    for outcome in (Ack(), Ack(), Ack(duplicate=True), Retry("x", 0), DeadLetter("y")):
        metrics.observe(outcome, 0.01)
    text = generate_latest(metrics.registry)
    assert _sample(text, 'atlas_worker_tasks_total{outcome="succeeded"}') == 2
    assert _sample(text, 'atlas_worker_tasks_total{outcome="duplicate"}') == 1
    assert _sample(text, 'atlas_worker_tasks_total{outcome="retried"}') == 1
    assert _sample(text, 'atlas_worker_tasks_total{outcome="dead_lettered"}') == 1
    assert _sample(text, "atlas_worker_task_seconds_count") == 5


def test_worker_session_metrics_come_from_the_publisher() -> None:
    """Step latencies by phase, the session latency and token totals are read off one session's publisher."""
    metrics = WorkerMetrics()
    publisher = TelemetryPublisher(None, TaskMessage(task="x"), adapter="demo", attempt=1)  # type: ignore[arg-type]
    opened = datetime(2026, 1, 1, tzinfo=UTC)
    publisher.opened_at = opened
    publisher.step_seconds = [("plan", 0.5), ("execute", 1.0), ("execute", 2.0)]
    publisher.close = SessionClosed(
        adapter_session_id="s",
        task_id="t",
        seq=4,
        steps=3,
        status="succeeded",
        totals=Usage(prompt_tokens=10, completion_tokens=4, total_tokens=14, calls=3),
        closed_at=opened + timedelta(seconds=3.5),
    )
    metrics.observe_session(publisher)
    text = generate_latest(metrics.registry)
    assert _sample(text, 'atlas_worker_step_seconds_count{phase="execute"}') == 2
    assert _sample(text, 'atlas_worker_step_seconds_sum{phase="execute"}') == 3.0
    assert _sample(text, 'atlas_worker_session_seconds_sum{status="succeeded"}') == 3.5
    assert _sample(text, 'atlas_worker_tokens_total{kind="prompt"}') == 10
    assert _sample(text, 'atlas_worker_tokens_total{kind="completion"}') == 4


def test_ingestor_batch_metrics_and_lag() -> None:
    """A batch adds its records, dead letters and exports, and sets the lag from its oldest record."""
    metrics = IngestorMetrics()
    oldest = datetime.now(UTC) - timedelta(seconds=5)
    metrics.observe_batch(records=300, dead=2, exported=40, seconds=0.02, oldest=oldest)
    metrics.observe_batch(records=100, dead=0, exported=10, seconds=0.01, oldest=None)
    text = generate_latest(metrics.registry)
    assert _sample(text, "atlas_ingestor_records_total") == 400
    assert _sample(text, "atlas_ingestor_dead_lettered_total") == 2
    assert _sample(text, "atlas_ingestor_sessions_exported_total") == 50
    assert _sample(text, "atlas_ingestor_batch_records_count") == 2
    assert 4.5 < _sample(text, "atlas_ingestor_lag_seconds") < 60
