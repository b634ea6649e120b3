"""Bytes <-> models, in one place. Bytes become a model only here, at the edge."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError

from schemas._base import SCHEMA_VERSION, WireModel
from schemas._errors import DecodeError
from schemas._task import TaskMessage
from schemas._telemetry import ROUTING_KEYS, SessionClosed, SessionOpened, StepRecorded, TelemetryMessage
from schemas.limits import MAX_MESSAGE_BYTES, MAX_TASK_BYTES

_TELEMETRY: Final[TypeAdapter[TelemetryMessage]] = TypeAdapter(TelemetryMessage)
_BATCH_OF: Final[dict[str, TypeAdapter[list[Any]]]] = {
    "session.opened": TypeAdapter(list[SessionOpened]),
    "step": TypeAdapter(list[StepRecorded]),
    "session.closed": TypeAdapter(list[SessionClosed]),
}
_MAX_ERRORS_SHOWN: Final = 5


def encode(message: WireModel) -> bytes:
    """Encode any wire model to compact UTF-8 JSON (pydantic-core's serializer, no Python dict between).

    Text that is not valid Unicode (a lone surrogate, e.g. from an adapter that mis-decoded bytes) cannot
    be UTF-8: rather than fail the whole message, such characters are replaced (U+FFFD's ASCII cousin '?').
    Values nested deeper than the serializer goes (a decoded record the worker's rule did not make, e.g.
    one the ingestor dead-letters) are written by the standard library instead. Raises ValueError only for
    a value deeper than Python itself can recurse.
    """
    try:
        return message.__pydantic_serializer__.to_json(message)
    except PydanticSerializationError:
        pass
    plain = _scrub(_fields(message))
    try:
        return orjson.dumps(plain)
    except TypeError:
        pass
    try:
        return json.dumps(plain, ensure_ascii=False, separators=(",", ":"), default=str).encode()
    except RecursionError:
        raise ValueError(f"a {type(message).__name__} nested too deeply to encode") from None


def _fields(value: Any) -> Any:
    """A model as plain values (its own fields only; JSON values inside are already plain)."""
    if isinstance(value, BaseModel):
        return {name: _fields(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list):
        return [_fields(v) for v in value]
    return value


def _scrub(value: Any) -> Any:
    """Lone surrogates replaced; iterative, so any depth Python can hold is fine."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8") if not value.isascii() else value
    root: list[Any] = [value]
    stack: list[tuple[Any, Any, Any]] = [(root, 0, value)]
    while stack:
        parent, key, item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                parent[key] = item.encode("utf-8", "replace").decode("utf-8")
        elif isinstance(item, dict):
            copy = {_scrub(k) if isinstance(k, str) else k: v for k, v in item.items()}
            parent[key] = copy
            stack.extend((copy, k, v) for k, v in copy.items())
        elif isinstance(item, list):
            copy_list = list(item)
            parent[key] = copy_list
            stack.extend((copy_list, i, v) for i, v in enumerate(copy_list))
    return root[0]


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


def decode_task(body: bytes, *, max_bytes: int = MAX_TASK_BYTES) -> TaskMessage:
    """Decode one task message, or raise :class:`DecodeError` saying what is wrong."""
    data = _load(body, max_bytes)
    try:
        return TaskMessage.model_validate(data)
    except ValidationError as exc:
        raise DecodeError("invalid", _describe(exc)) from None


def decode_telemetry(body: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> TelemetryMessage:
    """Decode one telemetry record (any kind), or raise :class:`DecodeError` saying what is wrong."""
    return _validate_record(_load(body, max_bytes))


def encode_telemetry_batch(records: Sequence[SessionOpened | StepRecorded | SessionClosed]) -> bytes:
    """One AMQP body for records of one kind (see :class:`schemas.TelemetryBatch`)."""
    if not records:
        raise ValueError("a telemetry batch needs at least one record")
    kind = records[0].kind
    return orjson.dumps(
        {
            "schema_version": SCHEMA_VERSION,
            "kind": kind,
            "records": [r.model_dump(mode="json") for r in records],
        }
    )


@dataclass(frozen=True, slots=True)
class RejectedRecord:
    """One record of a batch that failed validation: its position, its own JSON, and why."""

    index: int
    body: bytes
    error: DecodeError


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    kind: str
    records: list[TelemetryMessage]
    rejects: list[RejectedRecord]


def decode_telemetry_batch(body: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> DecodedBatch:
    """Decode a telemetry AMQP body: a batch envelope (or, leniently, one bare record).

    The envelope itself being wrong (not JSON, wrong version, no records) raises :class:`DecodeError`;
    a bad record inside a good envelope is returned in ``rejects`` with its own JSON, so the caller
    dead-letters just that record and keeps the rest.
    """
    data = _load(body, max_bytes)
    if "records" not in data:
        record = _validate_record(data)
        return DecodedBatch(kind=record.kind, records=[record], rejects=[])
    kind = data.get("kind")
    records = data.get("records")
    extra = set(data) - {"schema_version", "kind", "records"}
    if kind not in ROUTING_KEYS:
        raise DecodeError("invalid", f"kind: batch kind must be one of {list(ROUTING_KEYS)}, got {kind!r}")
    if not isinstance(records, list) or not records:
        raise DecodeError("invalid", "records: a batch needs a non-empty list of records")
    if extra:
        raise DecodeError("invalid", f"unknown batch field(s): {sorted(extra)}")
    try:  # the common case, all records valid: one call, validated without returning to Python per record
        return DecodedBatch(kind=str(kind), records=_BATCH_OF[str(kind)].validate_python(records), rejects=[])
    except ValidationError:
        pass  # some record is bad: validate one by one, to name it and keep the others
    good: list[TelemetryMessage] = []
    rejects: list[RejectedRecord] = []
    for index, item in enumerate(records):
        try:
            record = _batch_record(item, str(kind))
        except DecodeError as exc:
            rejects.append(RejectedRecord(index, orjson.dumps(item), exc))
            continue
        good.append(record)
    return DecodedBatch(kind=str(kind), records=good, rejects=rejects)


def _batch_record(item: object, kind: str) -> TelemetryMessage:
    if not isinstance(item, dict):
        raise DecodeError("not_an_object", f"record is a {type(item).__name__}, not an object")
    record = _validate_record(item)
    if record.kind != kind:
        raise DecodeError("invalid", f"a {kind!r} batch holds a {record.kind!r} record")
    return record


def _validate_record(data: dict[str, Any]) -> TelemetryMessage:
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise DecodeError("unsupported_version", f"schema_version {version!r} is not supported")
    try:
        return _TELEMETRY.validate_python(data)
    except ValidationError as exc:
        raise DecodeError("invalid", _describe(exc)) from None
