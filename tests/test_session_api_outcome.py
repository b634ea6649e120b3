"""Normalising step results: ``normalize_outcome``, ``normalize_usage``, ``normalize_events``."""

from __future__ import annotations

import collections
import dataclasses
import enum
from collections.abc import Mapping
from datetime import date, datetime
from datetime import time as dtime
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from schemas import Usage, json_text
from worker.sessions import (
    OutcomeError,
    StepOutcome,
    normalize_events,
    normalize_outcome,
    normalize_usage,
    to_jsonable,
)


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelReply(BaseModel):
    content: str
    usage: OpenAIUsage


class PlainModel(BaseModel):
    answer: int


@dataclasses.dataclass
class DataReply:
    text: str
    usage: dict[str, int]


def test_step_outcome_passes_through_unchanged() -> None:
    """A StepOutcome is returned as the same object."""
    outcome = StepOutcome(output="x")
    assert normalize_outcome(outcome) is outcome


def test_bare_string_stays_a_string_with_one_call() -> None:
    """A bare string is the output unchanged (not JSON-parsed), with usage of one call and no events."""
    outcome = normalize_outcome('{"looks": "like json"}')
    assert outcome.output == '{"looks": "like json"}'
    assert outcome.usage == Usage(calls=1)
    assert outcome.events == []


def test_bare_values_become_json() -> None:
    """Numbers, lists, tuples and None are bare values made JSON-able."""
    assert normalize_outcome(3).output == 3
    assert normalize_outcome((1, "a")).output == [1, "a"]
    assert normalize_outcome(None).output is None


def test_dict_envelope_with_content_usage_events() -> None:
    """A dict with content/usage/events splits into output, usage (total computed) and events."""
    raw = {"content": "hi", "usage": {"prompt_tokens": 3, "completion_tokens": 2}, "events": [{"type": "t"}]}
    outcome = normalize_outcome(raw)
    assert outcome.output == "hi"
    assert outcome.usage == Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5, calls=1)
    assert outcome.events == [{"type": "t"}]
    assert outcome.raw is raw


def test_output_key_priority_output_then_content_then_text() -> None:
    """With several output keys, 'output' wins over 'content', which wins over 'text'."""
    assert normalize_outcome({"output": 1, "content": 2, "text": 3}).output == 1
    assert normalize_outcome({"content": 2, "text": 3}).output == 2
    assert normalize_outcome({"text": 3, "usage": None}).output == 3


def test_extra_keys_dropped_from_output_when_output_key_is_explicit() -> None:
    """Other keys are not part of the output when an explicit output key exists (they stay in raw)."""
    outcome = normalize_outcome({"text": "t", "score": 9})
    assert outcome.output == "t"
    assert outcome.raw == {"text": "t", "score": 9}


def test_envelope_without_output_key_keeps_other_keys_as_output() -> None:
    """A dict with usage/events but no output key uses its remaining keys as the output."""
    outcome = normalize_outcome({"answer": 42, "usage": {"completion_tokens": 1}, "events": []})
    assert outcome.output == {"answer": 42}
    assert outcome.usage.completion_tokens == 1
    assert normalize_outcome({"usage": {"calls": 2}}).output is None


def test_dict_without_envelope_keys_is_a_bare_value() -> None:
    """A dict with none of the envelope keys is the output as a whole."""
    outcome = normalize_outcome({"rows": [1, 2], 3: "x"})
    assert outcome.output == {"rows": [1, 2], "3": "x"}
    assert outcome.usage == Usage(calls=1)


def test_object_with_attributes_is_read_like_an_envelope() -> None:
    """An object with output/usage/events attributes is normalised through its attributes."""
    obj = SimpleNamespace(output=["a"], usage=SimpleNamespace(input_tokens=4, output_tokens=6), events=None)
    outcome = normalize_outcome(obj)
    assert outcome.output == ["a"]
    assert outcome.usage == Usage(prompt_tokens=4, completion_tokens=6, total_tokens=10, calls=1)
    assert outcome.events == []


def test_pydantic_model_reply_and_pydantic_usage() -> None:
    """A pydantic reply with a pydantic usage model normalises both."""
    reply = ModelReply(content="ok", usage=OpenAIUsage(prompt_tokens=1, completion_tokens=2, total_tokens=7))
    outcome = normalize_outcome(reply)
    assert outcome.output == "ok"
    assert outcome.usage == Usage(prompt_tokens=1, completion_tokens=2, total_tokens=7, calls=1)


def test_pydantic_model_without_envelope_fields_is_dumped() -> None:
    """A pydantic model without envelope fields becomes its JSON dump."""
    assert normalize_outcome(PlainModel(answer=5)).output == {"answer": 5}


def test_dataclass_reply() -> None:
    """A dataclass with text/usage fields is an envelope."""
    outcome = normalize_outcome(DataReply(text="d", usage={"prompt_tokens": 2}))
    assert outcome.output == "d"
    assert outcome.usage.total_tokens == 2


def test_usage_from_json_string() -> None:
    """Usage given as a JSON string is parsed."""
    usage = normalize_usage('{"input_tokens": 10, "output_tokens": 5, "calls": 2}')
    assert usage == Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15, calls=2)


def test_usage_aliases_and_explicit_total_kept() -> None:
    """OpenAI-style aliases map to prompt/completion; an explicit total_tokens is kept as reported."""
    usage = normalize_usage({"input_tokens": 1, "output_tokens": 2, "total_tokens": 9})
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (1, 2, 9)


def test_usage_model_fills_total_and_calls_when_unset() -> None:
    """A schemas.Usage with unset total/calls gets total = prompt + completion and calls = 1."""
    assert normalize_usage(Usage(prompt_tokens=2, completion_tokens=3)) == Usage(
        prompt_tokens=2, completion_tokens=3, total_tokens=5, calls=1
    )
    full = Usage(prompt_tokens=1, total_tokens=1, calls=4)
    assert normalize_usage(full) is full


def test_usage_none_is_one_call() -> None:
    """No usage means one call and zero tokens."""
    assert normalize_usage(None) == Usage(calls=1)


@pytest.mark.parametrize("bad", ["not json", "[1, 2]", {"prompt_tokens": -1}, {"prompt_tokens": "many"}, 7])
def test_bad_usage_raises_outcome_error(bad: Any) -> None:
    """Usage that is not an object of non-negative integers raises OutcomeError."""
    with pytest.raises(OutcomeError):
        normalize_usage(bad)


def test_usage_numeric_strings_and_integral_floats_accepted() -> None:
    """'12' and 3.0 are accepted as token counts."""
    assert normalize_usage({"prompt_tokens": "12", "completion_tokens": 3.0}).total_tokens == 15


def test_typeless_events_are_wrapped_not_dropped() -> None:
    """Events without a non-empty string type are wrapped as adapter_event; typed ones are kept."""
    events = normalize_events([{"type": "tool_call", "tool": "x"}, {"tool": "y"}, "note", {"type": ""}])
    assert events == [
        {"type": "tool_call", "tool": "x"},
        {"type": "adapter_event", "data": {"tool": "y"}},
        {"type": "adapter_event", "data": "note"},
        {"type": "adapter_event", "data": {"type": ""}},
    ]


def test_single_event_is_a_one_event_list() -> None:
    """A single event dict (not in a list) is accepted."""
    assert normalize_events({"type": "sql", "rows": 1}) == [{"type": "sql", "rows": 1}]
    assert normalize_events(None) == []


def test_outputs_are_made_json_able() -> None:
    """Non-JSON values inside outputs (sets, bytes, objects) become JSON-able."""
    outcome = normalize_outcome({"output": {"s": {1}, "b": b"hi", "o": object}})
    assert outcome.output == {"s": [1], "b": "hi", "o": str(object)}


def test_text_of_values_orjson_refuses() -> None:
    """Prompts and answers are built from any output: integers past 64 bits and deep nesting included (a
    step output of 10**30 used to fail the next step's prompt with TypeError, a poison pill)."""
    from worker.sessions._json import to_text

    assert to_text({"n": 10**30}) == '{"n":1000000000000000000000000000000}'
    deep: object = 1
    for _ in range(300):
        deep = [deep]
    assert to_text(deep) == "[" * 200 + '"' + "[" * 100 + "1" + "]" * 100 + '"' + "]" * 200


# --- to_jsonable: the plain-value fast path means what the general rules say -------------------------------


class _Colour(enum.IntEnum):
    RED = 1


class _Tag(enum.Enum):
    A = "a"


class _Key(str):
    pass


def _reference_to_jsonable(value: Any, depth: int = 0) -> Any:  # noqa: PLR0911 -- the rules, written plainly
    """The general rules of ``to_jsonable``, with no fast path (what it must equal)."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if depth >= 200:
        return json_text(value)
    if isinstance(value, Mapping):
        return {str(k): _reference_to_jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_reference_to_jsonable(v, depth + 1) for v in value]
    if isinstance(value, BaseModel):
        return _reference_to_jsonable(value.model_dump(mode="json"), depth + 1)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _reference_to_jsonable(getattr(value, f.name), depth + 1)
            for f in dataclasses.fields(value)
        }
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, datetime | date | dtime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return _reference_to_jsonable(value.value, depth + 1)
    return str(value)


_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.datetimes(),
    st.times(),
    st.sampled_from([_Colour.RED, _Tag.A, _Key("k"), 3 + 4j]),
)
_keys = st.one_of(st.text(max_size=3), st.integers(), st.none(), st.sampled_from([_Colour.RED, _Key("k")]))


def _nesting(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(children, max_size=4)
        | st.dictionaries(_keys, children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=3), children, max_size=3).map(collections.OrderedDict)
    )


@settings(max_examples=300, deadline=None)
@given(value=st.recursive(_leaves, _nesting, max_leaves=40), wrap=st.integers(min_value=0, max_value=205))
def test_to_jsonable_means_what_its_general_rules_say(value: Any, wrap: int) -> None:
    """Any value, plain or not, nested up to past the depth guard: the fast path for plain dicts and lists
    gives exactly what the general rules give, and never returns a caller's container itself."""
    for _ in range(wrap):
        value = [value]
    converted = to_jsonable(value)
    assert converted == _reference_to_jsonable(value)
    if isinstance(value, dict | list):
        assert converted is not value
