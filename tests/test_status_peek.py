"""The ingestion-lag peek is skipped where a peek would count against a quorum queue's delivery limit."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from producer._status import broker_major_version, peek_ingestion_lag


def _connection(version: Any) -> Any:
    return SimpleNamespace(
        transport=SimpleNamespace(connection=SimpleNamespace(server_properties={"version": version}))
    )


@pytest.mark.parametrize(
    ("version", "major"), [("3.10.8", 3), (b"4.0.2", 4), ("4.1.0-rc.1", 4), (None, None), ("weird", None)]
)
def test_broker_major_version_reads_the_server_properties(version, major):
    """The major version comes from the connection's server properties, text or bytes; else None."""
    assert broker_major_version(_connection(version)) == major


@pytest.mark.parametrize("version", ["4.0.2", None])
async def test_no_peek_on_rabbitmq_4_or_an_unknown_version(version):
    """On RabbitMQ 4+ (or a broker that does not say) the lag is not peeked: a handed-back peek would count
    as a delivery there, and repeated peeks (a console refreshing) would drop the head message."""
    lag = await peek_ingestion_lag(_connection(version), "atlas.telemetry.ingestor")
    assert lag.state == "unreadable"
    assert lag.detail is not None
    assert "delivery" in lag.detail
