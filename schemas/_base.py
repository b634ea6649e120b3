"""The base every wire model shares: immutable, closed to unknown fields, versioned."""

from __future__ import annotations

from typing import Annotated, Any, Final

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from schemas.limits import MAX_INT4, MAX_JSON_DEPTH

SCHEMA_VERSION: Final = 1
"""The version every message carries; a decoder refuses any other (see ``schemas.decode_*``)."""

Json = Any
"""Any JSON value. Not validated node by node (pydantic's ``JsonValue`` walks every node in Python, the
largest cost of a worker's record): decoded bodies are JSON by construction, and ``encode`` (orjson)
refuses anything that is not."""

JsonObject = dict[str, Json]


_CONTAINERS: Final = (dict, list, tuple)


def json_depth_exceeds(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` nests containers more than ``limit`` levels deep: a dict, list or tuple at depth
    ``limit`` or more, ``value`` itself at depth 0 (iterative: any depth is safe). Only containers are
    visited; the worker asks this of every record with many brackets (``schemas.storable``)."""
    if not isinstance(value, _CONTAINERS):
        return False
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth >= limit:
            return True
        deeper = depth + 1
        # A plain loop: a generator into stack.extend measured twice as slow (most children are leaves).
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, _CONTAINERS):
                stack.append((child, deeper))  # noqa: PERF401
    return False


def _bounded_depth(value: dict[str, Any]) -> dict[str, Any]:
    if json_depth_exceeds(value):
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels (the limit)")
    return value


BoundedJsonObject = Annotated[JsonObject, AfterValidator(_bounded_depth)]
"""A JSON object nested at most ``MAX_JSON_DEPTH`` levels (task metadata: refused, not rewritten)."""

Int4 = Annotated[int, Field(ge=0, le=MAX_INT4)]
"""A non-negative count or index that a PostgreSQL ``integer`` column holds."""

Identifier = Annotated[
    str,
    Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]*$"),
]
"""Ids and adapter names: printable, no spaces, safe in logs, routing headers and file names."""


class WireModel(BaseModel):
    """Frozen, closed models: a message is a value, and an unknown field is a contract error, not data."""

    # ser_json_inf_nan: NaN and Infinity are not JSON; a record carrying one would make its whole envelope
    # (other sessions' records too) undecodable downstream, so they are written as null.
    model_config = ConfigDict(frozen=True, extra="forbid", str_max_length=1_000_000, ser_json_inf_nan="null")
