"""Turning arbitrary adapter values into JSON-able values and text, without surprises."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from datetime import date, datetime, time
from typing import Any, Final

import orjson
from pydantic import BaseModel, JsonValue

from schemas import json_text

# A guard against cycles and Python's recursion limit, well past the contract's MAX_JSON_DEPTH: the
# storable rule applies the real limit later, and notes it in the record (schemas.storable).
_MAX_DEPTH: Final = 200


_PLAIN: Final = frozenset({str, int, float, bool, type(None)})
"""Exact types that are JSON as they are (subclasses, e.g. an IntEnum, take the general path)."""


def to_jsonable(value: Any, _depth: int = 0) -> JsonValue:
    """A JSON-able copy of ``value``: strings stay strings, models/dataclasses become objects.

    Mappings get string keys, sequences and sets become lists, bytes are decoded as UTF-8 (with
    replacement), dates become ISO strings, enums their value; anything nested deeper than 200 levels (a
    cycle too) becomes its JSON text, as the storable rule writes what is deeper than ``MAX_JSON_DEPTH``
    (:func:`schemas.storable`, which applies that limit and notes it); anything else becomes
    ``str(value)``.
    """
    # Plain dicts and lists of plain values (what adapters return: events, outputs, tool arguments) are
    # copied without the general checks below; they cost a tool-calling step 118 us for 20 events (ABC
    # isinstance checks and a call per leaf), now 45.
    kind = type(value)
    if kind in _PLAIN:
        return value  # type: ignore[no-any-return]
    if _depth < _MAX_DEPTH:
        depth = _depth + 1
        if kind is dict:
            return {
                (k if type(k) is str else str(k)): (v if type(v) in _PLAIN else to_jsonable(v, depth))
                for k, v in value.items()
            }
        if kind is list:
            return [v if type(v) in _PLAIN else to_jsonable(v, depth) for v in value]
    return _general(value, _depth)


def _general(value: Any, _depth: int) -> JsonValue:  # noqa: PLR0911 -- one return per kind
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if _depth >= _MAX_DEPTH:
        return json_text(value)
    depth = _depth + 1
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, depth) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v, depth) for v in value]
    if isinstance(value, BaseModel):
        return to_jsonable(value.model_dump(mode="json"), depth)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name), depth) for f in dataclasses.fields(value)}
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value, depth)
    return str(value)


def to_json_object(value: Mapping[str, Any] | None) -> dict[str, JsonValue]:
    """A JSON-able copy of a mapping (``{}`` for ``None``)."""
    if not value:
        return {}
    return {str(k): to_jsonable(v, 1) for k, v in value.items()}


def to_text(value: Any) -> str:
    """Text for prompts, traces and final answers: strings as is, ``None`` as ``""``, else compact JSON."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    try:  # fast path: already JSON-able (the common case)
        return orjson.dumps(value).decode()
    except TypeError:  # objects, and JSON orjson refuses (integers past 64 bits, nesting past 255)
        return json_text(to_jsonable(value))
