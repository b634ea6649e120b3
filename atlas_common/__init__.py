"""What every atlas-pipeline service shares: logging, settings base, topology, URL checks and redaction."""

import importlib
from typing import TYPE_CHECKING, Final

# Loaded at once: these need nothing beyond the standard library and structlog, so the worker SDK can use
# them (Backoff, URL scrubbing) without loading the broker client, the database driver or pydantic.
from atlas_common._errors import BrokerUnavailable, PublishNotConfirmed
from atlas_common._logging import LogFormat, configure_logging
from atlas_common._loop import loop_factory, run
from atlas_common._resource import Resource
from atlas_common._retry import Backoff
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

if TYPE_CHECKING:
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
    from atlas_common._delivery import Consumer, Delivery, consume
    from atlas_common._metrics import DEFAULT_METRICS_HOST, MetricsServerError, serve_metrics
    from atlas_common._publish import persistent_copy, publish_confirmed
    from atlas_common._settings import (
        DEFAULT_DATABASE_URL,
        AmqpUrl,
        BrokerSettings,
        DatabaseUrl,
        load_settings,
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

_LAZY_MODULES: Final = {
    "_broker": ("BROKER_ERRORS", "BrokerConnection", "connect_any", "sleep_unless"),
    "_delivery": ("Consumer", "Delivery", "consume"),
    "_db": ("DB_ERRORS", "DB_TRANSIENT_ERRORS", "DbPooler", "connect_options", "pool_options"),
    "_deadletter": (
        "DEAD_AT_HEADER",
        "LAST_ERROR_HEADER",
        "REASON_HEADER",
        "RETRY_HEADER",
        "ROUTING_KEY_HEADER",
        "SOURCE_HEADER",
        "dead_letter_headers",
    ),
    "_metrics": ("DEFAULT_METRICS_HOST", "MetricsServerError", "serve_metrics"),
    "_publish": ("persistent_copy", "publish_confirmed"),
    "_settings": (
        "DEFAULT_DATABASE_URL",
        "AmqpUrl",
        "BrokerSettings",
        "DatabaseUrl",
        "load_settings",
        "settings_problems",
    ),
    "_topology": (
        "DEAD_TASK_ROUTING_KEY",
        "DEAD_TELEMETRY_ROUTING_KEY",
        "STREAM_FILE_HEADER",
        "STREAM_PUBLISHED_MS_HEADER",
        "STREAM_SESSIONS_HEADER",
        "TASK_ROUTING_KEY",
        "TELEMETRY_ROUTING_KEYS",
        "Topology",
    ),
}
"""The names whose modules load aio-pika, asyncpg, prometheus_client or pydantic: each module is imported on
first use of one of its names (PEP 562), so importing ``atlas_common`` for a light name loads none of them."""

_LAZY: Final = {name: module for module, names in _LAZY_MODULES.items() for name in names}

if not TYPE_CHECKING:  # mypy sees the imports above; a module __getattr__ would make every name Any to it

    def __getattr__(name: str) -> object:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value  # later look-ups find it without coming here
        return value


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
    "Consumer",
    "DatabaseUrl",
    "DbPooler",
    "Delivery",
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
    "consume",
    "dead_letter_headers",
    "load_settings",
    "loop_factory",
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
