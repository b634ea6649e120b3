"""The atlas-pipeline wire contract: task and telemetry messages, and the one way to decode them."""

from schemas._base import MAX_MESSAGE_BYTES, SCHEMA_VERSION, JsonObject
from schemas._codec import decode_task, decode_telemetry, encode
from schemas._errors import DecodeError
from schemas._export import json_schemas, write_json_schemas
from schemas._task import TaskMessage, new_task_id, utcnow
from schemas._telemetry import (
    ROUTING_KEYS,
    Phase,
    SessionClosed,
    SessionOpened,
    SessionStatus,
    StepRecorded,
    TelemetryMessage,
)
from schemas._usage import Event, Usage

__all__ = [
    "MAX_MESSAGE_BYTES",
    "ROUTING_KEYS",
    "SCHEMA_VERSION",
    "DecodeError",
    "Event",
    "JsonObject",
    "Phase",
    "SessionClosed",
    "SessionOpened",
    "SessionStatus",
    "StepRecorded",
    "TaskMessage",
    "TelemetryMessage",
    "Usage",
    "decode_task",
    "decode_telemetry",
    "encode",
    "json_schemas",
    "new_task_id",
    "utcnow",
    "write_json_schemas",
]
