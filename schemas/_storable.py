"""The storable rule: how a telemetry record that storage could not hold as it is gets made storable.

The worker passes every record it publishes through :func:`storable`, so nothing it sends is refused
downstream (by the ingestor's size limit, by PostgreSQL, or by the JSONL encoder). The rule, applied in
this order (the README's "Limits" section says the same):

1. NUL (U+0000), which PostgreSQL ``text`` and ``jsonb`` cannot hold, becomes the six characters ``\\u0000``
   in any text or object key. A lone surrogate (text that is not Unicode) becomes ``?``.
2. In free JSON values (outputs, events, metadata, plans): an integer outside 64 bits (``MIN_JSON_INT`` ..
   ``MAX_JSON_INT``) becomes its decimal digits as a string; NaN and Infinity become null; a subtree nested
   deeper than ``MAX_JSON_DEPTH`` becomes its JSON text (a string), so nothing is lost but the nesting.
3. A close keeps the newest ``MAX_SESSION_EVENTS`` events of its session aggregate.
4. A record still larger than ``MAX_RECORD_BYTES`` is shrunk field by field, in a fixed order per kind,
   until it fits: text keeps its head and ends with ``…[truncated: N bytes in all]``; a list of events
   keeps its newest events; a structured output becomes its JSON text, cut the same way; an object field
   becomes ``{"truncated": true, "original_bytes": N, "preview": "<head of its JSON text>"}``.

Whatever the rule changed is listed in the record's ``limits`` object (field name -> what was done, e.g.
``{"output": {"truncated": true, "original_bytes": 1500000, "kept_bytes": 1040000}}``); the ingestor keeps
it in the step's or the session's metadata, so a trainer can tell a cut value from a short one.

The common record needs none of this, and finding that out costs a few scans of its encoded bytes:
:func:`storable_fields` encodes a record given as plain fields with orjson (which refuses what the rule
must rewrite: integers past 64 bits, lone surrogates, nesting past 255) and scans the bytes for the rest;
only a record that fails goes through the model and the rule.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, Final

import orjson
from pydantic_core import PydanticSerializationError

from schemas._base import json_depth_exceeds
from schemas._telemetry import SessionClosed, SessionOpened, StepRecorded
from schemas._usage import Usage
from schemas.limits import (
    MAX_JSON_DEPTH,
    MAX_JSON_INT,
    MAX_REASON_CHARS,
    MAX_RECORD_BYTES,
    MAX_SESSION_EVENTS,
    MAX_TASK_CHARS,
    MAX_TRACE_CHARS,
    MIN_JSON_INT,
    SHRINK_PREVIEW_CHARS,
)

Record = SessionOpened | StepRecorded | SessionClosed

NUL_ESCAPE: Final = "\\u0000"
_NUL_BYTES: Final = b"\\u0000"
_TEXT_FIELDS: Final = {
    "session.opened": ("task",),
    "step": ("description", "trace", "error"),
    "session.closed": ("reason", "final_answer"),
}
_TEXT_CHARS: Final = {
    "task": MAX_TASK_CHARS,
    "description": MAX_TASK_CHARS,
    "trace": MAX_TRACE_CHARS,
    "final_answer": MAX_TRACE_CHARS,
    "error": MAX_REASON_CHARS,
    "reason": MAX_REASON_CHARS,
}
_JSON_FIELDS: Final = {
    "session.opened": ("metadata", "task_metadata"),
    "step": ("output", "events"),
    "session.closed": ("plan", "events", "close_metadata"),
}
# What gives way first when a record is too large: the bulk an adapter produced, then what it echoed,
# and the task itself last (only a task near the task size limit next to large adapter metadata).
_SHRINK_ORDER: Final = {
    "session.opened": ("metadata", "task_metadata", "task"),
    "step": ("output", "trace", "events", "description", "error"),
    "session.closed": ("final_answer", "events", "close_metadata", "plan", "reason"),
}
_SMALLEST_TEXT_LIMIT: Final = min(_TEXT_CHARS.values())
_OBJECT_FIELDS: Final = frozenset({"metadata", "task_metadata", "close_metadata", "plan"})
_NOTE_SLACK: Final = 512  # bytes the ``limits`` note and a marker may add while shrinking


def _to_json(record: Record) -> bytes | None:
    try:
        return record.__pydantic_serializer__.to_json(record)
    except PydanticSerializationError:  # a lone surrogate, or nesting past the serializer's limit
        return None


_MODELS: Final[dict[str, type[Record]]] = {
    "session.opened": SessionOpened,
    "step": StepRecorded,
    "session.closed": SessionClosed,
}


def _plain(value: Any) -> Any:
    """orjson's hook for what it does not know: the wire's Usage model (its fields); anything else is not
    plain JSON and sends the record down the slow path."""
    if isinstance(value, Usage):
        return value.__dict__
    raise TypeError(f"not JSON: {type(value).__name__}")


def _plainly_storable(kind: str, body: bytes, field: Callable[[str], Any]) -> bool:
    """True when no rule but the record size (4) and a close's event count (3) can apply: cheap scans of
    the encoded bytes (each one an upper bound); integers past 64 bits and lone surrogates never get here
    (the encoder refused them)."""
    if _NUL_BYTES in body:
        return False
    # Nesting past MAX_JSON_DEPTH takes more than MAX_JSON_DEPTH brackets, so a record with fewer has none.
    # One with more (tool calls, code in an output: common) has its JSON fields walked the way the rule
    # measures depth instead of going down the slow path for nothing (a 3.4 KB step with 20 tool events:
    # 104 us on the slow path, 33 us walked).
    if body.count(b"{") + body.count(b"[") > MAX_JSON_DEPTH and any(
        json_depth_exceeds(field(name)) for name in _JSON_FIELDS[kind]
    ):
        return False
    # A text has no more characters than its record has bytes: a small record is within every text limit.
    return len(body) <= _SMALLEST_TEXT_LIMIT or all(
        len(field(name) or "") <= _TEXT_CHARS[name] for name in _TEXT_FIELDS[kind]
    )


def _encoded(fields: dict[str, Any]) -> bytes | None:
    try:
        return orjson.dumps(fields, default=_plain)
    except TypeError:  # an integer past 64 bits, a lone surrogate, nesting past 255, a non-JSON value
        return None


def _plainly(fields: dict[str, Any]) -> bytes | None:
    """The record's bytes when no rule can apply, else None."""
    if fields["kind"] == "session.closed" and len(fields.get("events") or ()) > MAX_SESSION_EVENTS:
        return None
    body = _encoded(fields)
    if body is None or len(body) > MAX_RECORD_BYTES:
        return None
    return body if _plainly_storable(fields["kind"], body, fields.get) else None


def _newest_events(record: Record) -> tuple[Record, bytes] | None:
    """Rule 3 alone, without the slow path: a close with more than ``MAX_SESSION_EVENTS`` events (a long
    tool-calling session: common) and nothing else the rule changes, dropped events included, keeps the
    newest, noted as the rule notes them; None when more applies (or the result is too large)."""
    if not isinstance(record, SessionClosed) or len(record.events) <= MAX_SESSION_EVENTS:
        return None
    whole = _encoded(record.__dict__)
    if whole is None or not _plainly_storable(record.kind, whole, record.__dict__.get):
        return None
    dropped = len(record.events) - MAX_SESSION_EVENTS
    notes = {**record.limits, "events": {"kept_events": MAX_SESSION_EVENTS, "dropped_events": dropped}}
    kept = record.model_copy(update={"events": record.events[-MAX_SESSION_EVENTS:], "limits": notes})
    body = _encoded(kept.__dict__)
    if body is None or len(body) > MAX_RECORD_BYTES:
        return None
    return kept, body


def storable_fields(fields: dict[str, Any]) -> bytes:
    """The wire bytes of a record given as its plain fields (``kind`` included), made storable by the rule
    above (``len <= MAX_RECORD_BYTES``). The worker's hot path: no model is built for a record the rule
    leaves alone."""
    body = _plainly(fields)
    if body is not None:
        return body
    return _apply_rule(_MODELS[fields["kind"]].model_construct(**fields))[1]


def storable(record: Record) -> tuple[Record, bytes]:
    """``record`` made storable by the rule above, and its encoding (``len <= MAX_RECORD_BYTES``)."""
    # A wire model's __dict__ holds exactly its fields (extra="forbid"), in order; it is only read here.
    body = _plainly(record.__dict__)
    if body is not None:
        return record, body
    return _newest_events(record) or _apply_rule(record)


def _apply_rule(record: Record) -> tuple[Record, bytes]:
    """The slow path: clean every text and JSON field (rules 1-3), then shrink to fit (rule 4)."""
    notes: dict[str, Any] = dict(record.limits)
    updates: dict[str, Any] = {}
    for name in _TEXT_FIELDS[record.kind]:
        value = getattr(record, name)
        if isinstance(value, str):
            note: dict[str, Any] = {}
            cleaned = clean_text(value, note)
            if len(cleaned) > _TEXT_CHARS[name]:
                original = len(cleaned.encode("utf-8"))
                cleaned = cut_chars(cleaned, _TEXT_CHARS[name])
                note.update(truncated=True, original_bytes=original, kept_bytes=len(cleaned.encode("utf-8")))
            if note:
                updates[name] = cleaned
                notes[name] = note
    for name in _JSON_FIELDS[record.kind]:
        note = {}
        cleaned = clean_json(getattr(record, name), 0, note)
        if name == "events" and isinstance(record, SessionClosed) and len(cleaned) > MAX_SESSION_EVENTS:
            note.update(kept_events=MAX_SESSION_EVENTS, dropped_events=len(cleaned) - MAX_SESSION_EVENTS)
            cleaned = cleaned[-MAX_SESSION_EVENTS:]
        if note:
            updates[name] = cleaned
            notes[name] = note
    if updates:
        record = record.model_copy(update={**updates, "limits": notes})
    body = _to_json(record)
    if body is None:  # cannot happen after cleaning; never publish what does not encode
        raise ValueError(f"a {record.kind} record does not encode even after the storable rule")
    if len(body) > MAX_RECORD_BYTES:
        record, body = _shrink(record, body, notes)
    return record, body


def clean_text(text: str, note: dict[str, Any]) -> str:
    """Rule 1 for one string (``note`` says what changed)."""
    if "\x00" in text:
        text = text.replace("\x00", NUL_ESCAPE)
        note["nul_escaped"] = True
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "replace").decode("utf-8")
            note["invalid_unicode_replaced"] = True
    return text


def clean_json(value: Any, depth: int, note: dict[str, Any]) -> Any:  # noqa: PLR0911 -- one return per kind
    """Rules 1 and 2 for one JSON value at nesting ``depth``; ``value`` itself when nothing changed."""
    kind = type(value)
    if kind is str:
        return clean_text(value, note)
    if value is None or kind is bool:
        return value
    if kind is int:
        if MIN_JSON_INT <= value <= MAX_JSON_INT:
            return value
        note["ints_as_text"] = True
        return str(value)
    if kind is float:
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        if depth >= MAX_JSON_DEPTH:
            note["deep_values_as_text"] = True
            return json_text(value)
        out: dict[str, Any] = {}
        changed = False
        for key, item in value.items():
            new_key = clean_text(key, note) if isinstance(key, str) else str(key)
            new_item = clean_json(item, depth + 1, note)
            changed = changed or new_key is not key or new_item is not item
            out[new_key] = new_item
        return out if changed else value
    if isinstance(value, list | tuple):
        if depth >= MAX_JSON_DEPTH:
            note["deep_values_as_text"] = True
            return json_text(value)
        items = [clean_json(item, depth + 1, note) for item in value]
        changed = kind is not list or any(a is not b for a, b in zip(items, value, strict=True))
        return items if changed else value
    note["non_json_as_text"] = True
    return clean_text(str(value), note)


def json_text(value: Any) -> str:
    """Compact JSON text of any value, however deep (what a too-deep subtree is stored as)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # deeper than orjson goes, an integer past 64 bits, a surrogate, a non-JSON leaf
        pass
    try:
        return json.dumps(value, ensure_ascii=True, separators=(",", ":"), default=str)
    except (ValueError, RecursionError, TypeError):  # a cycle, or deeper than Python recurses
        return "<a value that cannot be written as JSON>"


def _marker(text: str) -> str:
    return f"…[truncated: {len(text.encode('utf-8'))} bytes in all]"


def cut_chars(text: str, max_chars: int) -> str:
    """``text`` within ``max_chars`` characters: its head and the truncation marker."""
    if len(text) <= max_chars:
        return text
    marker = _marker(text)
    return text[: max(0, max_chars - len(marker))] + marker


def cut_text(text: str, budget: int) -> str:
    """``text`` itself if its JSON encoding fits ``budget`` bytes, else its head and a marker that fit."""
    encoded_size = len(orjson.dumps(text))
    if encoded_size <= budget:
        return text
    marker = _marker(text)
    room = budget - len(orjson.dumps(marker))
    if room <= 0:
        return marker
    keep = len(text) * room // encoded_size
    head = text[:keep]
    while keep > 0 and len(orjson.dumps(head)) > room:
        keep = keep * 9 // 10
        head = text[:keep]
    return head + marker


def _newest_that_fit(events: list[Any], budget: int) -> list[Any]:
    kept: list[Any] = []
    used = 2
    for event in reversed(events):
        size = len(orjson.dumps(event)) + 1
        if used + size > budget:
            break
        kept.append(event)
        used += size
    kept.reverse()
    return kept


def _shrunk(name: str, value: Any, budget: int) -> tuple[Any, dict[str, Any]]:
    """``value`` of field ``name`` cut to about ``budget`` encoded bytes, and the note saying how."""
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    original = len(text.encode("utf-8"))
    if name == "events":
        kept = _newest_that_fit(value, budget)
        return kept, {"kept_events": len(kept), "dropped_events": len(value) - len(kept)}
    if name in _OBJECT_FIELDS:
        preview = cut_text(text, max(0, min(budget - 100, SHRINK_PREVIEW_CHARS)))
        return {"truncated": True, "original_bytes": original, "preview": preview}, {
            "truncated": True,
            "original_bytes": original,
        }
    cut = cut_text(text, max(0, budget))
    note: dict[str, Any] = {"truncated": True, "original_bytes": original}
    note["kept_bytes"] = len(cut.encode("utf-8"))
    if not isinstance(value, str):
        note["original_type"] = type(value).__name__
    return cut, note


def _shrink(record: Record, body: bytes, notes: dict[str, Any]) -> tuple[Record, bytes]:
    """Rule 4: shrink fields in order until the record fits (a second, harsher pass if it must)."""
    for harsh in (False, True):
        for name in _SHRINK_ORDER[record.kind]:
            excess = len(body) - MAX_RECORD_BYTES
            if excess <= 0:
                return record, body
            value = getattr(record, name)
            if value is None:
                continue
            size = len(orjson.dumps(value))
            budget = 0 if harsh else size - excess - _NOTE_SLACK
            if size <= 2 or budget >= size:
                continue
            new_value, note = _shrunk(name, value, max(0, budget))
            notes[name] = {**notes.get(name, {}), **note}
            record = record.model_copy(update={name: new_value, "limits": dict(notes)})
            encoded = _to_json(record)
            if encoded is None:  # pragma: no cover - shrinking only removes content
                raise ValueError(f"a {record.kind} record stopped encoding while it was shrunk")
            body = encoded
    if len(body) > MAX_RECORD_BYTES:  # pragma: no cover - every variable-size field is shrinkable
        raise ValueError(f"a {record.kind} record of {len(body)} bytes cannot be shrunk to fit")
    return record, body
