"""What every atlas-pipeline service shares: logging, settings base, broker topology, URL redaction."""

from atlas_common._broker import BROKER_ERRORS, BrokerConnection, sleep_unless
from atlas_common._db import DB_TRANSIENT_ERRORS
from atlas_common._deadletter import (
    DEAD_AT_HEADER,
    REASON_HEADER,
    ROUTING_KEY_HEADER,
    SOURCE_HEADER,
    dead_letter_headers,
)
from atlas_common._logging import LogFormat, configure_logging
from atlas_common._retry import Backoff
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
    "BROKER_ERRORS",
    "DB_TRANSIENT_ERRORS",
    "DEAD_AT_HEADER",
    "DEAD_TASK_ROUTING_KEY",
    "DEAD_TELEMETRY_ROUTING_KEY",
    "REASON_HEADER",
    "ROUTING_KEY_HEADER",
    "SOURCE_HEADER",
    "TASK_ROUTING_KEY",
    "TELEMETRY_ROUTING_KEYS",
    "Backoff",
    "BrokerConnection",
    "BrokerSettings",
    "LogFormat",
    "Topology",
    "configure_logging",
    "dead_letter_headers",
    "redact_url",
    "sleep_unless",
]
