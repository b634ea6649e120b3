"""JSON Schema export, for consumers written in other languages."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import orjson
from pydantic import TypeAdapter

from schemas._task import TaskMessage
from schemas._telemetry import SessionClosed, SessionOpened, StepRecorded, TelemetryBatch, TelemetryMessage

JSONSCHEMA_DIR: Final = Path(__file__).parent / "jsonschema"


def json_schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema of every wire message (the telemetry union included)."""
    return {
        "task.schema.json": TaskMessage.model_json_schema(),
        "session_opened.schema.json": SessionOpened.model_json_schema(),
        "step.schema.json": StepRecorded.model_json_schema(),
        "session_closed.schema.json": SessionClosed.model_json_schema(),
        "telemetry.schema.json": TypeAdapter(TelemetryMessage).json_schema(),
        "telemetry_batch.schema.json": TelemetryBatch.model_json_schema(),
    }


def render(schema: dict[str, Any]) -> bytes:
    return orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def write_json_schemas(directory: Path = JSONSCHEMA_DIR) -> list[Path]:
    """Write every schema under ``directory``; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas().items():
        path = directory / name
        path.write_bytes(render(schema))
        written.append(path)
    return written
