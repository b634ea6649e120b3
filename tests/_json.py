"""Walking JSON values in tests: every string (keys too) and the nesting depth."""

from __future__ import annotations

from typing import Any


def json_depth(value: Any) -> int:
    """Nesting levels of containers (a scalar is 0, ``{}`` is 1)."""
    if isinstance(value, dict):
        return 1 + max((json_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((json_depth(v) for v in value), default=0)
    return 0


def json_strings(value: Any) -> list[str]:
    """Every string in a JSON value, object keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *json_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in json_strings(v)]
    return []
