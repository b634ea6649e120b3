"""The atlas-pipeline wire contract: task and telemetry messages, and the one way to decode them."""

from schemas._base import MAX_MESSAGE_BYTES, SCHEMA_VERSION, JsonObject
from schemas._codec import (
    DecodedBatch,
    RejectedRecord,
    decode_task,
    decode_telemetry,
    decode_telemetry_batch,
    encode,
    encode_telemetry_batch,
)
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
    TelemetryBatch,
    TelemetryMessage,
)
from schemas._usage import Event, Usage

__all__ = [
    "MAX_MESSAGE_BYTES",
    "ROUTING_KEYS",
    "SCHEMA_VERSION",
    "DecodeError",
    "DecodedBatch",
    "Event",
    "JsonObject",
    "Phase",
    "RejectedRecord",
    "SessionClosed",
    "SessionOpened",
    "SessionStatus",
    "StepRecorded",
    "TaskMessage",
    "TelemetryBatch",
    "TelemetryMessage",
    "Usage",
    "decode_task",
    "decode_telemetry",
    "decode_telemetry_batch",
    "encode",
    "encode_telemetry_batch",
    "json_schemas",
    "new_task_id",
    "utcnow",
    "write_json_schemas",
]
