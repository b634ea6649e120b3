"""Bytes <-> models, in one place. Bytes become a model only here, at the edge."""

from __future__ import annotations

from typing import Any, Final

import orjson
from pydantic import TypeAdapter, ValidationError

from schemas._base import MAX_MESSAGE_BYTES, SCHEMA_VERSION, WireModel
from schemas._errors import DecodeError
from schemas._task import TaskMessage
from schemas._telemetry import TelemetryMessage

_TELEMETRY: Final[TypeAdapter[TelemetryMessage]] = TypeAdapter(TelemetryMessage)
_MAX_ERRORS_SHOWN: Final = 5


def encode(message: WireModel) -> bytes:
    """Encode any wire model to compact UTF-8 JSON."""
    return orjson.dumps(message.model_dump(mode="json"))


def _load(body: bytes, max_bytes: int) -> dict[str, Any]:
    if len(body) > max_bytes:
        raise DecodeError("too_large", f"message is {len(body)} bytes; the limit is {max_bytes}")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("not_json", f"body is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DecodeError("not_an_object", f"expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        detail = f"schema_version {version!r} is not supported (this build reads {SCHEMA_VERSION})"
        raise DecodeError("unsupported_version", detail)
    return data


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False)[:_MAX_ERRORS_SHOWN]:
        where = ".".join(str(p) for p in error["loc"]) or "<message>"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - len(parts)
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def decode_task(body: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> TaskMessage:
    """Decode one task message, or raise :class:`DecodeError` saying what is wrong."""
    data = _load(body, max_bytes)
    try:
        return TaskMessage.model_validate(data)
    except ValidationError as exc:
        raise DecodeError("invalid", _describe(exc)) from None


def decode_telemetry(body: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> TelemetryMessage:
    """Decode one telemetry message (any kind), or raise :class:`DecodeError` saying what is wrong."""
    data = _load(body, max_bytes)
    try:
        return _TELEMETRY.validate_python(data)
    except ValidationError as exc:
        raise DecodeError("invalid", _describe(exc)) from None
