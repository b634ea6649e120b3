"""Normalising whatever an adapter returns for one step into a :class:`StepOutcome`.

Rules (each is tested in ``tests/test_session_api_outcome.py``):

* A :class:`StepOutcome` is returned unchanged.
* A mapping is an *envelope* when it has at least one of ``output``, ``content``, ``text``, ``usage``,
  ``events``. Its output is the first of ``output`` > ``content`` > ``text`` that is present; when none of
  the three is present, the output is the mapping's other keys (without ``usage``/``events``), or ``None``
  if there are none. With an explicit output key, the other keys are dropped from the output (they stay
  in ``raw``). A mapping with none of those keys is a bare value: the whole mapping is the output.
* A pydantic model or dataclass is read like the mapping of its fields; any other object that has one of
  those attributes is read through its attributes; anything else (str, number, list, ...) is a bare value.
* Output is made JSON-able (:func:`worker.sessions._json.to_jsonable`); strings stay strings (never parsed).
* Usage comes from a mapping, a pydantic model, an object with attributes, or a JSON string. Token fields
  accept OpenAI/Anthropic aliases (``input_tokens`` -> ``prompt_tokens``, ``output_tokens`` ->
  ``completion_tokens``); ``total_tokens`` defaults to prompt + completion; ``calls`` defaults to 1 (one
  step call) unless reported. A value that is not a non-negative integer, or is over
  ``schemas.limits.MAX_COUNT``, raises :class:`OutcomeError` (the step fails, saying why).
* Events must be JSON objects with a non-empty string ``type`` (the wire ``schemas.Event``). Anything
  else (a typeless dict, a string, ...) is *wrapped*, not dropped: ``{"type": "adapter_event", "data": x}``.
  A single event (not in a list) is accepted as a one-event list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from pydantic import BaseModel, JsonValue

from schemas import Usage, limits
from worker.sessions._errors import OutcomeError
from worker.sessions._json import to_jsonable

_OUTPUT_KEYS: Final = ("output", "content", "text")
_ENVELOPE_KEYS: Final = frozenset({*_OUTPUT_KEYS, "usage", "events"})
_PROMPT_KEYS: Final = ("prompt_tokens", "input_tokens")
_COMPLETION_KEYS: Final = ("completion_tokens", "output_tokens")
_ALL_USAGE_KEYS: Final = (*_PROMPT_KEYS, *_COMPLETION_KEYS, "total_tokens", "calls")
WRAPPED_EVENT_TYPE: Final = "adapter_event"

EventDict = dict[str, JsonValue]


def _one_call() -> Usage:
    return Usage(calls=1)


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """One normalised step result: JSON-able ``output``, ``usage``, typed ``events``, the ``raw`` value."""

    output: JsonValue = None
    usage: Usage = field(default_factory=_one_call)
    events: list[EventDict] = field(default_factory=list)
    raw: Any = None


def _count(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise OutcomeError(f"usage field {key!r} must be a non-negative integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or value < 0:
        raise OutcomeError(f"usage field {key!r} must be a non-negative integer, got {value!r}")
    if value > limits.MAX_COUNT:
        # Storage holds counts up to MAX_COUNT; a larger one is a broken report: the step fails with why.
        raise OutcomeError(f"usage field {key!r} is {value}, over the limit of {limits.MAX_COUNT}")
    return value


def _pick(data: Mapping[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = data.get(key)
        if value is not None:
            return _count(key, value)
    return None


def normalize_usage(value: Any) -> Usage:
    """A :class:`schemas.Usage` from any usage report (see the module docstring); ``None`` is one call."""
    if value is None:
        return _one_call()
    if isinstance(value, Usage):
        given = value.model_fields_set
        if "total_tokens" in given and "calls" in given:
            return value
        data: Mapping[str, Any] = {k: getattr(value, k) for k in given}
    elif isinstance(value, str | bytes | bytearray):
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise OutcomeError(f"usage string is not JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise OutcomeError(f"usage JSON must be an object, got {type(parsed).__name__}")
        data = parsed
    elif isinstance(value, BaseModel):
        data = value.model_dump()
    elif isinstance(value, Mapping):
        data = value
    elif isinstance(value, int | float | list | tuple):
        raise OutcomeError(f"usage must be an object, got {type(value).__name__}")
    else:
        data = {k: getattr(value, k) for k in _ALL_USAGE_KEYS if getattr(value, k, None) is not None}
    prompt = _pick(data, _PROMPT_KEYS) or 0
    completion = _pick(data, _COMPLETION_KEYS) or 0
    total = _pick(data, ("total_tokens",))
    calls = _pick(data, ("calls",))
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion if total is None else total,
        calls=1 if calls is None else calls,
    )


def _event(item: Any) -> EventDict:
    data = to_jsonable(item)
    if isinstance(data, dict):
        kind = data.get("type")
        if isinstance(kind, str) and kind:
            return data
    return {"type": WRAPPED_EVENT_TYPE, "data": data}


def normalize_events(value: Any) -> list[EventDict]:
    """Events as typed JSON objects; typeless items become ``{"type": "adapter_event", "data": x}``."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [_event(item) for item in value]
    return [_event(value)]


def _fields(value: Any) -> Mapping[str, Any] | None:
    """The value's fields as a mapping, or ``None`` when it is not an envelope-shaped object."""
    if isinstance(value, Mapping):
        return value
    if value is None or isinstance(value, str | bytes | bytearray | int | float | list | tuple | set):
        return None
    if isinstance(value, BaseModel):
        return {name: getattr(value, name) for name in type(value).model_fields}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    present = {key: getattr(value, key) for key in _ENVELOPE_KEYS if hasattr(value, key)}
    return present or None


def normalize_outcome(value: Any) -> StepOutcome:
    """Normalise one step result (a :class:`StepOutcome`, an envelope mapping/object, or a bare value)."""
    if isinstance(value, StepOutcome):
        return value
    fields = _fields(value)
    if fields is None or _ENVELOPE_KEYS.isdisjoint(fields.keys()):
        return StepOutcome(output=to_jsonable(value), usage=_one_call(), events=[], raw=value)
    for key in _OUTPUT_KEYS:
        if key in fields:
            output: Any = fields[key]
            break
    else:
        rest = {k: v for k, v in fields.items() if k not in ("usage", "events")}
        output = rest or None
    return StepOutcome(
        output=to_jsonable(output),
        usage=normalize_usage(fields.get("usage")),
        events=normalize_events(fields.get("events")),
        raw=value,
    )
