"""Prometheus metrics of the worker and the ingestor: what they count, and where they serve it."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import generate_latest

from ingestor._errors import ConfigError
from ingestor._metrics import IngestorMetrics
from ingestor._settings import IngestorSettings
from schemas import SessionClosed, TaskMessage, Usage
from tests._pipeline import ROOT, PipelineStack
from worker.runtime import WorkerMetrics, WorkerSettings
from worker.runtime._policy import Ack, DeadLetter, Retry
from worker.runtime._telemetry import TelemetryPublisher
from worker.sessions import WorkerError

ALL_INTERFACES = "0.0.0.0"  # noqa: S104 -- compose's value, read back from the settings, never bound here


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


@contextlib.contextmanager
def _held_port() -> Iterator[int]:
    """A loopback port some other socket is listening on, for as long as the block runs."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.mark.parametrize("metrics_class", [WorkerMetrics, IngestorMetrics])
def test_metrics_bind_loopback_by_default(metrics_class: type[WorkerMetrics | IngestorMetrics]) -> None:
    """Without a host the metrics server listens on 127.0.0.1 only, and answers there."""
    metrics = metrics_class()
    server = metrics.serve(_free_port())
    try:
        host, port = server.socket.getsockname()[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            assert reply.status == 200
            assert b"atlas_" in reply.read()
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_host_settings_default_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """WORKER_METRICS_HOST / INGESTOR_METRICS_HOST default to 127.0.0.1 and are read from the environment."""
    assert WorkerSettings().metrics_host == "127.0.0.1"
    assert IngestorSettings().metrics_host == "127.0.0.1"
    monkeypatch.setenv("WORKER_METRICS_HOST", ALL_INTERFACES)
    monkeypatch.setenv("INGESTOR_METRICS_HOST", ALL_INTERFACES)
    assert WorkerSettings().metrics_host == ALL_INTERFACES
    assert IngestorSettings().metrics_host == ALL_INTERFACES


def test_port_in_use_is_a_clear_error_in_process() -> None:
    """serve() on a port another socket holds raises the service's own error naming host, port and cause."""
    with _held_port() as port:
        with pytest.raises(WorkerError) as worker_err:
            WorkerMetrics().serve(port)
        with pytest.raises(ConfigError) as ingestor_err:
            IngestorMetrics().serve(port)
    for err in (worker_err, ingestor_err):
        assert f"127.0.0.1:{port}" in str(err.value)
        assert "in use" in str(err.value)


@pytest.mark.integration
@pytest.mark.parametrize("service", ["worker", "ingestor"])
def test_port_in_use_is_one_line_and_exit_2(pipeline: PipelineStack, service: str) -> None:
    """python -m worker / ingestor with its metrics port taken: exit 2, one line, no traceback."""
    with _held_port() as port:
        result = subprocess.run(
            [sys.executable, "-m", service],
            env=pipeline.env(WORKER_METRICS_PORT=str(port), INGESTOR_METRICS_PORT=str(port)),
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"127.0.0.1:{port}" in lines[0]
    assert "in use" in lines[0]


def test_worker_tallies_render_what_prometheus_client_metrics_would() -> None:
    """The worker's plain tallies scrape as the same samples prometheus_client's Histogram and Counter give
    for the same observations (bucket bounds, cumulative counts, a value on a bound, _count, _sum)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from worker.runtime._metrics import _LATENCY_BUCKETS

    metrics = WorkerMetrics()
    reference = CollectorRegistry()
    steps = Histogram(
        "atlas_worker_step_seconds", "x", ["phase"], buckets=_LATENCY_BUCKETS, registry=reference
    )
    tasks = Histogram("atlas_worker_task_seconds", "x", buckets=_LATENCY_BUCKETS, registry=reference)
    outcomes = Counter("atlas_worker_tasks", "x", ["outcome"], registry=reference)
    publisher = TelemetryPublisher(None, TaskMessage(task="x"), adapter="demo", attempt=1)  # type: ignore[arg-type]
    seconds = [0.0, 0.005, 0.0051, 0.7, 1.0, 3.0, 1800.0, 5000.0]
    publisher.step_seconds = [("execute", s) for s in seconds] + [("plan", 0.02)]
    metrics.observe_session(publisher)
    for phase, s in publisher.step_seconds:
        steps.labels(phase=phase).observe(s)
    for s in seconds:
        metrics.observe(Ack(), s)
        tasks.observe(s)
        outcomes.labels(outcome="succeeded").inc()

    def samples(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
        return {
            (s.name, tuple(sorted(s.labels.items())), s.value)
            for family in registry.collect()
            for s in family.samples
            if not s.name.endswith("_created")
            and s.name.startswith(("atlas_worker_step", "atlas_worker_task"))
        }

    assert samples(metrics.registry) == samples(reference)
