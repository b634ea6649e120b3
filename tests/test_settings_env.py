"""Which environment names each service's settings read: bare (unprefixed) names only where they were
read before the service got its prefix."""

from __future__ import annotations

import warnings

import pytest

from feed import FeedSettings
from ingestor import IngestorSettings
from worker.runtime import WorkerSettings


def test_worker_settings_ignore_bare_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """CONCURRENCY, METRICS_PORT and SHUTDOWN_GRACE_S change nothing for a worker, and nothing warns:
    only WORKER_<NAME> is its own."""
    monkeypatch.setenv("CONCURRENCY", "3")
    monkeypatch.setenv("METRICS_PORT", "9999")
    monkeypatch.setenv("SHUTDOWN_GRACE_S", "1.5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        settings = WorkerSettings()
    assert (settings.concurrency, settings.metrics_port, settings.shutdown_grace_s) == (16, None, 30.0)
    monkeypatch.setenv("WORKER_CONCURRENCY", "5")
    assert WorkerSettings().concurrency == 5


def test_feed_settings_ignore_bare_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """PREFETCH and POLL_INTERVAL_S change nothing for the feed, and nothing warns: only FEED_<NAME> is
    its own."""
    monkeypatch.setenv("PREFETCH", "7")
    monkeypatch.setenv("POLL_INTERVAL_S", "9")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        settings = FeedSettings()
    assert (settings.prefetch, settings.poll_interval_s) == (256, 1.0)
    monkeypatch.setenv("FEED_PREFETCH", "8")
    assert FeedSettings().prefetch == 8


def test_ingestor_settings_still_read_bare_names_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ingestor, whose variables were bare before, still reads PREFETCH and METRICS_PORT, each with a
    FutureWarning naming its INGESTOR_ name."""
    monkeypatch.setenv("PREFETCH", "7")
    monkeypatch.setenv("METRICS_PORT", "9999")
    with pytest.warns(FutureWarning) as warned:
        settings = IngestorSettings()
    assert (settings.prefetch, settings.metrics_port) == (7, 9999)
    assert sorted(str(w.message) for w in warned) == [
        "environment variable METRICS_PORT is deprecated: use INGESTOR_METRICS_PORT",
        "environment variable PREFETCH is deprecated: use INGESTOR_PREFETCH",
    ]
