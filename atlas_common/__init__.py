"""What every atlas-pipeline service shares: logging, settings base, topology, URL checks and redaction."""

from atlas_common._broker import BROKER_ERRORS, BrokerConnection, connect_any, sleep_unless
from atlas_common._db import DB_ERRORS, DB_TRANSIENT_ERRORS, DbPooler, connect_options, pool_options
from atlas_common._deadletter import (
    DEAD_AT_HEADER,
    LAST_ERROR_HEADER,
    REASON_HEADER,
    RETRY_HEADER,
    ROUTING_KEY_HEADER,
    SOURCE_HEADER,
    dead_letter_headers,
)
from atlas_common._errors import BrokerUnavailable, PublishNotConfirmed
from atlas_common._logging import LogFormat, configure_logging
from atlas_common._loop import run
from atlas_common._metrics import DEFAULT_METRICS_HOST, MetricsServerError, serve_metrics
from atlas_common._publish import persistent_copy, publish_confirmed
from atlas_common._resource import Resource
from atlas_common._retry import Backoff
from atlas_common._settings import (
    DEFAULT_DATABASE_URL,
    AmqpUrl,
    BrokerSettings,
    DatabaseUrl,
    settings_problems,
)
from atlas_common._topology import (
    DEAD_TASK_ROUTING_KEY,
    DEAD_TELEMETRY_ROUTING_KEY,
    STREAM_FILE_HEADER,
    STREAM_PUBLISHED_MS_HEADER,
    STREAM_SESSIONS_HEADER,
    TASK_ROUTING_KEY,
    TELEMETRY_ROUTING_KEYS,
    Topology,
)
from atlas_common._urls import (
    SECRET_QUERY_KEYS,
    check_amqp_url,
    check_database_url,
    redact_url,
    scrub_secrets,
    scrub_text,
    split_urls,
    strip_url,
    url_secrets,
)

__all__ = [
    "BROKER_ERRORS",
    "DB_ERRORS",
    "DB_TRANSIENT_ERRORS",
    "DEAD_AT_HEADER",
    "DEAD_TASK_ROUTING_KEY",
    "DEAD_TELEMETRY_ROUTING_KEY",
    "DEFAULT_DATABASE_URL",
    "DEFAULT_METRICS_HOST",
    "LAST_ERROR_HEADER",
    "REASON_HEADER",
    "RETRY_HEADER",
    "ROUTING_KEY_HEADER",
    "SECRET_QUERY_KEYS",
    "SOURCE_HEADER",
    "STREAM_FILE_HEADER",
    "STREAM_PUBLISHED_MS_HEADER",
    "STREAM_SESSIONS_HEADER",
    "TASK_ROUTING_KEY",
    "TELEMETRY_ROUTING_KEYS",
    "AmqpUrl",
    "Backoff",
    "BrokerConnection",
    "BrokerSettings",
    "BrokerUnavailable",
    "DatabaseUrl",
    "DbPooler",
    "LogFormat",
    "MetricsServerError",
    "PublishNotConfirmed",
    "Resource",
    "Topology",
    "check_amqp_url",
    "check_database_url",
    "configure_logging",
    "connect_any",
    "connect_options",
    "dead_letter_headers",
    "persistent_copy",
    "pool_options",
    "publish_confirmed",
    "redact_url",
    "run",
    "scrub_secrets",
    "scrub_text",
    "serve_metrics",
    "settings_problems",
    "sleep_unless",
    "split_urls",
    "strip_url",
    "url_secrets",
]
