"""What every atlas-pipeline service shares: logging, settings base, broker topology, URL redaction."""

from atlas_common._logging import LogFormat, configure_logging
from atlas_common._settings import BrokerSettings
from atlas_common._topology import (
    DEAD_TASK_ROUTING_KEY,
    DEAD_TELEMETRY_ROUTING_KEY,
    TASK_ROUTING_KEY,
    TELEMETRY_ROUTING_KEYS,
    Topology,
)
from atlas_common._urls import redact_url

__all__ = [
    "DEAD_TASK_ROUTING_KEY",
    "DEAD_TELEMETRY_ROUTING_KEY",
    "TASK_ROUTING_KEY",
    "TELEMETRY_ROUTING_KEYS",
    "BrokerSettings",
    "LogFormat",
    "Topology",
    "configure_logging",
    "redact_url",
]
