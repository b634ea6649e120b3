"""The atlas-pipeline wire contract: task and telemetry messages, the one way to decode them, and its
limits (``schemas.limits``) with the rule that makes a record storable (``schemas.storable``)."""

from schemas import limits
from schemas._base import SCHEMA_VERSION, Identifier, JsonObject, json_depth_exceeds
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
from schemas._storable import (
    NUL_ESCAPE,
    clean_json,
    cut_chars,
    cut_text,
    json_text,
    storable,
    storable_fields,
)
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
from schemas.limits import MAX_MESSAGE_BYTES

__all__ = [
    "MAX_MESSAGE_BYTES",
    "NUL_ESCAPE",
    "ROUTING_KEYS",
    "SCHEMA_VERSION",
    "DecodeError",
    "DecodedBatch",
    "Event",
    "Identifier",
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
    "clean_json",
    "cut_chars",
    "cut_text",
    "decode_task",
    "decode_telemetry",
    "decode_telemetry_batch",
    "encode",
    "encode_telemetry_batch",
    "json_depth_exceeds",
    "json_schemas",
    "json_text",
    "limits",
    "new_task_id",
    "storable",
    "storable_fields",
    "utcnow",
    "write_json_schemas",
]
