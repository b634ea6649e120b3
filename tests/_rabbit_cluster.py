"""The three-node RabbitMQ cluster of the cluster tests: :mod:`bench._rabbit_cluster` runs it (the cluster
benchmark starts the same one); this adds the pytest side, a skip where RabbitMQ is not installed (a
failure when ``$CI`` is set) and the session fixture."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench._rabbit_cluster import MISSING_SCRIPTS, RabbitCluster, RabbitNode, find_scripts, node_names

__all__ = ["RabbitCluster", "RabbitNode", "node_names", "rabbit_cluster", "require_scripts"]


def require_scripts() -> Path:
    """The scripts, else skip the test (fail it when ``$CI`` is set: CI must not silently skip)."""
    scripts = find_scripts()
    if scripts is None:
        reason = f"the RabbitMQ cluster tests: {MISSING_SCRIPTS}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return scripts


@pytest.fixture(scope="session")
def rabbit_cluster() -> Iterator[RabbitCluster]:
    """A three-node RabbitMQ cluster for this test session (started on first use, removed at the end;
    skipped where no RabbitMQ server is installed, failed instead when $CI is set)."""
    with RabbitCluster(scripts=require_scripts()) as cluster:
        yield cluster
