"""The contract's limits and the storable rule (schemas.limits, schemas.storable), without services."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import schemas._storable as storable_module
from atlas_common import PublishNotConfirmed
from schemas import (
    NUL_ESCAPE,
    DecodeError,
    SessionClosed,
    SessionOpened,
    StepRecorded,
    TaskMessage,
    Usage,
    decode_task,
    decode_telemetry,
    encode,
    json_depth_exceeds,
    limits,
    storable,
    storable_fields,
)
from schemas._storable import _apply_rule, _plainly
from tests._json import json_depth, json_strings
from worker.runtime._batcher import TelemetryBatcher
from worker.sessions import OutcomeError, normalize_usage

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def _step(**fields: Any) -> StepRecorded:
    values: dict[str, Any] = {
        "schema_version": 1,
        "kind": "step",
        "adapter_session_id": "s1",
        "task_id": "t1",
        "seq": 1,
        "step_id": 1,
        "phase": "execute",
        "description": "d",
        "output": None,
        "trace": "",
        "usage": Usage(),
        "events": [],
        "started_at": NOW,
        "finished_at": NOW,
        "status": "ok",
        "error": None,
        "attempts": 1,
        "emitted_at": NOW,
        "limits": {},
    }
    values.update(fields)
    return StepRecorded.model_construct(**values)


def _close(**fields: Any) -> SessionClosed:
    values: dict[str, Any] = {
        "schema_version": 1,
        "kind": "session.closed",
        "adapter_session_id": "s1",
        "task_id": "t1",
        "seq": 1,
        "steps": 0,
        "status": "succeeded",
        "reason": None,
        "final_answer": "",
        "plan": None,
        "totals": Usage(),
        "events": [],
        "close_metadata": {},
        "closed_at": NOW,
        "emitted_at": NOW,
        "limits": {},
    }
    values.update(fields)
    return SessionClosed.model_construct(**values)


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


def test_an_ordinary_record_is_untouched() -> None:
    """The common record passes unchanged (the same object), and its bytes decode to it."""
    record = _step(output="fine", events=[{"type": "tool_call", "tool": "search"}])
    same, body = storable(record)
    assert same is record
    assert decode_telemetry(body) == record
    assert storable_fields({name: getattr(record, name) for name in StepRecorded.model_fields}) == body


def test_nul_is_escaped_in_text_keys_and_values() -> None:
    """NUL (which PostgreSQL refuses) becomes the six characters \\u0000 everywhere, and the note says so."""
    record = _step(trace="a\x00b", output={"k\x00": ["v\x00"]})
    fixed, body = storable(record)
    decoded = decode_telemetry(body)
    assert isinstance(decoded, StepRecorded)
    assert decoded.trace == f"a{NUL_ESCAPE}b"
    assert decoded.output == {f"k{NUL_ESCAPE}": [f"v{NUL_ESCAPE}"]}
    assert decoded.limits == {"trace": {"nul_escaped": True}, "output": {"nul_escaped": True}}
    assert all("\x00" not in s for s in json_strings(decoded.model_dump(mode="json")))
    assert fixed.limits == decoded.limits


def test_giant_integers_become_text_and_the_ingestor_can_encode_them() -> None:
    """An integer past 64 bits becomes its digits as a string (lossless); orjson can write the record."""
    fixed, body = storable(_step(output={"n": 10**30, "small": 7}))
    decoded = decode_telemetry(body)
    assert decoded.output == {"n": str(10**30), "small": 7}  # type: ignore[union-attr]
    assert fixed.limits == {"output": {"ints_as_text": True}}
    orjson.dumps(decoded.model_dump(mode="json"))


@pytest.mark.parametrize("depth", [65, 254, 256, 2000])
def test_deep_values_keep_their_content_as_json_text(depth: int) -> None:
    """A value nested past MAX_JSON_DEPTH keeps its content: the deep subtree becomes its JSON text."""
    fixed, body = storable(_step(output=_nested(depth)))
    decoded = decode_telemetry(body)
    assert json_depth(decoded.output) <= limits.MAX_JSON_DEPTH  # type: ignore[union-attr]
    assert fixed.limits == {"output": {"deep_values_as_text": True}}
    # Downstream nesting (session metadata, JSONL line) stays well within orjson's limit of 255.
    orjson.dumps([[[[[[decoded.model_dump(mode="json")]]]]]])
    inner = decoded.output  # type: ignore[union-attr]
    for _ in range(limits.MAX_JSON_DEPTH - 1):
        inner = inner["k"]
    assert isinstance(inner["k"], str)
    if depth < 256:  # orjson's own limit: deeper text is the stdlib's encoding of the same value
        assert orjson.loads(inner["k"]) == _nested(depth - limits.MAX_JSON_DEPTH)


def test_an_oversized_output_is_cut_with_a_marker_and_its_size_kept() -> None:
    """A 1.5 MB output fits the record limit: its head, a marker naming the size, the size in the note."""
    fixed, body = storable(_step(output="x" * 1_500_000))
    assert len(body) <= limits.MAX_RECORD_BYTES
    decoded = decode_telemetry(body)
    assert isinstance(decoded, StepRecorded)
    assert isinstance(decoded.output, str)
    assert decoded.output.startswith("xxxx")
    assert decoded.output.endswith("…[truncated: 1500000 bytes in all]")
    note = fixed.limits["output"]
    assert note["truncated"] is True
    assert note["original_bytes"] == 1_500_000
    assert note["kept_bytes"] == len(decoded.output.encode())


def test_a_structured_output_too_large_becomes_cut_json_text() -> None:
    """A structured output too large to keep becomes its JSON text cut to fit, its type noted."""
    output = {"rows": [{"i": i, "pad": "p" * 100} for i in range(20_000)]}
    fixed, body = storable(_step(output=output))
    assert len(body) <= limits.MAX_RECORD_BYTES
    assert fixed.limits["output"]["original_type"] == "dict"
    assert isinstance(decode_telemetry(body).output, str)  # type: ignore[union-attr]


def test_a_close_keeps_the_newest_events() -> None:
    """A close carries the newest MAX_SESSION_EVENTS events of 500, and says how many it dropped."""
    events = [{"type": "tool_call", "i": i, "pad": "p" * 1000} for i in range(500)]
    fixed, body = storable(_close(events=events))
    decoded = decode_telemetry(body)
    assert isinstance(decoded, SessionClosed)
    assert [e["i"] for e in decoded.events] == list(range(450, 500))
    assert fixed.limits == {"events": {"kept_events": 50, "dropped_events": 450}}


def test_a_close_with_huge_events_still_fits() -> None:
    """Fifty events of 100 KB each: the close is shrunk to the record limit, newest events first kept."""
    events = [{"type": "blob", "i": i, "data": "d" * 100_000} for i in range(50)]
    fixed, body = storable(_close(events=events, final_answer="a" * 300_000))
    assert len(body) <= limits.MAX_RECORD_BYTES
    decoded = decode_telemetry(body)
    assert isinstance(decoded, SessionClosed)
    assert decoded.events[-1]["i"] == 49
    assert fixed.limits["events"]["dropped_events"] > 0


def test_an_emoji_task_fits_its_opened_record() -> None:
    """A 200,000-emoji task (800 KB) opens a session whose record fits; its text is kept whole."""
    task = TaskMessage(task="😀" * 200_000)
    assert len(encode(task)) <= limits.MAX_TASK_BYTES
    opened = SessionOpened(
        adapter_session_id="s1",
        task_id=task.task_id,
        adapter="demo",
        task=task.task,
        metadata={"m": "z" * 300_000},
    )
    fixed, body = storable(opened)
    assert len(body) <= limits.MAX_RECORD_BYTES
    assert isinstance(fixed, SessionOpened)
    assert fixed.task == task.task
    assert fixed.limits["metadata"]["truncated"] is True


def test_task_metadata_nested_too_deep_is_refused() -> None:
    """A task whose metadata nests past MAX_JSON_DEPTH is refused at decode, with the limit named."""
    body = json.dumps({"task": "t", "metadata": _nested(300)}).encode()
    with pytest.raises(DecodeError, match="nested deeper than 64"):
        decode_task(body)
    decode_task(orjson.dumps({"task": "t", "metadata": _nested(limits.MAX_JSON_DEPTH)}))


def test_a_task_over_the_size_limit_is_refused() -> None:
    """A task message over MAX_TASK_BYTES is refused before it is parsed."""
    body = orjson.dumps({"task": "t", "metadata": {"pad": "p" * limits.MAX_TASK_BYTES}})
    with pytest.raises(DecodeError) as err:
        decode_task(body)
    assert err.value.reason == "too_large"


def test_token_counts_past_the_limit_fail_the_step_and_sums_saturate() -> None:
    """A usage report of 10**30 tokens is a broken report (the step fails, saying why); totals saturate."""
    with pytest.raises(OutcomeError, match="over the limit"):
        normalize_usage({"prompt_tokens": 10**30})
    with pytest.raises(OutcomeError, match="over the limit"):
        normalize_usage({"completion_tokens": 1e30})
    big = Usage(prompt_tokens=limits.MAX_COUNT, total_tokens=limits.MAX_COUNT)
    total = big + big
    assert total.prompt_tokens == limits.MAX_COUNT
    with pytest.raises(ValueError, match="less than or equal"):
        Usage(prompt_tokens=limits.MAX_COUNT + 1)


def test_wire_integers_fit_postgres_integer_columns() -> None:
    """seq, step_id, steps and attempts past PostgreSQL's integer range are refused at decode."""
    record = _step(step_id=2**31)
    with pytest.raises(DecodeError, match="step_id"):
        decode_telemetry(encode(record))


_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(["\x00", "\ud800", "é", "😀"])),
)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)


_json = st.recursive(_json_leaf, _containers, max_leaves=30)


def _deep(draw_depth: int, leaf: Any) -> Any:
    value = leaf
    for _ in range(draw_depth):
        value = [value]
    return value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    output=_json,
    event=st.dictionaries(st.text(max_size=5), _json, max_size=3),
    trace=st.text(alphabet=st.characters(codec="utf-8") | st.just("\x00")),
    depth=st.integers(min_value=0, max_value=400),
    size=st.sampled_from([0, 10, 2_000_000]),
)
def test_any_value_becomes_a_storable_record(
    output: Any, event: Any, trace: str, depth: int, size: int
) -> None:
    """Whatever an adapter returns, the record is valid, within the limits, NUL-free and encodable by the
    ingestor's encoder with its downstream nesting."""
    record = _step(
        output=_deep(depth, output),
        events=[{**event, "type": "t"}],
        trace=trace + "y" * size,
    )
    _, body = storable(record)
    assert len(body) <= limits.MAX_RECORD_BYTES
    decoded = decode_telemetry(body)
    dumped = decoded.model_dump(mode="json")
    assert all("\x00" not in s for s in json_strings(dumped))
    assert json_depth(decoded.output) <= limits.MAX_JSON_DEPTH  # type: ignore[union-attr]
    orjson.dumps([[[[[[dumped]]]]]])
    for value in json_strings(dumped):
        value.encode("utf-8")  # valid Unicode throughout (no lone surrogate survives)


@settings(max_examples=200, deadline=None)
@given(value=_json, wrap=st.integers(min_value=0, max_value=80), limit=st.integers(min_value=0, max_value=70))
def test_depth_check_agrees_with_the_nesting_of_any_value(value: Any, wrap: int, limit: int) -> None:
    """json_depth_exceeds(value, limit) says exactly whether containers nest more than ``limit`` deep."""
    nested = _deep(wrap, value)
    assert json_depth_exceeds(nested, limit) is (json_depth(nested) > limit)


def test_a_record_with_many_brackets_but_no_deep_value_takes_the_fast_path() -> None:
    """A tool-calling step (many small objects, code in its output) has more brackets than MAX_JSON_DEPTH
    but nothing nested that deep: it is not sent down the rule's slow path, and its bytes mean what the
    slow path's would."""
    events = [{"type": "tool_call", "name": f"t{i}", "arguments": {"q": [1, {"y": i}]}} for i in range(30)]
    record = _step(output="return {'a': {'b': [1]}}\n" * 40, events=events)
    fields = {name: getattr(record, name) for name in StepRecorded.model_fields}
    body = _plainly(fields)
    assert body is not None
    assert body.count(b"{") + body.count(b"[") > limits.MAX_JSON_DEPTH
    assert storable_fields(fields) == body
    assert decode_telemetry(body) == decode_telemetry(_apply_rule(record)[1]) == record


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    output=_json,
    events=st.lists(st.dictionaries(st.text(max_size=5), _json, max_size=3), max_size=30),
    depth=st.integers(min_value=0, max_value=90),
)
def test_the_fast_path_and_the_rule_agree_on_any_record(output: Any, events: list[Any], depth: int) -> None:
    """Whatever the fields hold, a record the fast path takes means exactly what the rule makes of it (the
    rule then notes no change), and storable_fields gives the rule's bytes for the others."""
    record = _step(output=_deep(depth, output), events=[{**e, "type": "t"} for e in events])
    fields = {name: getattr(record, name) for name in StepRecorded.model_fields}
    fixed, slow = _apply_rule(record)
    fast = _plainly(fields)
    if fast is not None:  # (NaN and infinities are null on both paths, with no note)
        assert decode_telemetry(fast) == decode_telemetry(slow)
        assert fixed.limits == {}
    assert storable_fields(fields) == (fast if fast is not None else slow)


def test_a_long_sessions_close_keeps_its_newest_events_without_the_slow_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A close with 80 ordinary events (a long tool-calling session) keeps the newest 50 and notes it, as
    the rule does, without going through the rule's slow path."""
    events = [{"type": "tool_call", "i": i, "arguments": {"q": [i, {"k": "v"}]}} for i in range(80)]
    close = _close(events=events, limits={"final_answer": {"truncated": True}})
    expected, expected_body = storable_module._apply_rule(close)

    def no_slow_path(record: Any) -> Any:
        raise AssertionError("the slow path ran")

    monkeypatch.setattr(storable_module, "_apply_rule", no_slow_path)
    fixed, body = storable(close)
    assert fixed == expected
    assert fixed.limits == {
        "final_answer": {"truncated": True},
        "events": {"kept_events": 50, "dropped_events": 30},
    }
    assert decode_telemetry(body) == decode_telemetry(expected_body) == fixed


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(min_value=40, max_value=120),
    odd=st.sampled_from(["none", "nul", "deep", "giant", "nan", "long answer"]),
    where=st.floats(min_value=0, max_value=1, exclude_max=True),
    depth=st.integers(min_value=60, max_value=70),
)
def test_a_close_made_storable_means_what_the_rule_makes_of_it(
    count: int, odd: str, where: float, depth: int
) -> None:
    """A close with 40-120 events and one odd value (NUL, a deep value, an integer past 64 bits, NaN) in
    an event that is dropped or kept, or a final answer past its limit: the fast paths give exactly what
    the rule gives, notes included."""
    events: list[dict[str, Any]] = [{"type": "tool_call", "i": i, "args": {"q": [i]}} for i in range(count)]
    at = int(where * count)
    odd_values = {"nul": "a\x00b", "deep": _deep(depth, 1), "giant": 10**30, "nan": float("nan")}
    if odd in odd_values:
        events[at]["odd"] = odd_values[odd]
    answer = "a" * (limits.MAX_TRACE_CHARS + 10) if odd == "long answer" else "done"
    close = _close(events=events, final_answer=answer)
    fixed, body = storable(close)
    expected, expected_body = storable_module._apply_rule(close)
    assert fixed.limits == expected.limits
    assert decode_telemetry(body) == decode_telemetry(expected_body)


class _Exchange:
    """Stands in for an aio-pika exchange: records every body published and confirms it."""

    name = "fake-telemetry"

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def publish(self, message: Any, routing_key: str, **options: Any) -> Any:
        import aiormq

        self.bodies.append(message.body)
        return aiormq.spec.Basic.Ack()


class _NackingExchange(_Exchange):
    """Nacks every publish, like a channel that a dead cluster node left in a bad state."""

    async def publish(self, message: Any, routing_key: str, **options: Any) -> Any:
        import aiormq

        self.bodies.append(message.body)
        return aiormq.spec.Basic.Nack()


async def test_envelopes_refused_in_a_row_ask_for_a_new_connection() -> None:
    """Nacked envelopes fail their records; the fifth in a row calls on_refused once (the runtime then
    reconnects), and a confirmed envelope starts the count again."""
    exchange = _NackingExchange()
    calls: list[int] = []
    async with TelemetryBatcher(exchange, linger_s=0, on_refused=lambda: calls.append(1)) as batcher:  # type: ignore[arg-type]
        for n in range(7):
            with pytest.raises(PublishNotConfirmed):
                await batcher.send("step", encode(_step(seq=n + 1)))
        assert calls == [1]
        exchange.publish = _Exchange.publish.__get__(exchange)  # type: ignore[method-assign]
        await batcher.send("step", encode(_step(seq=9)))
        exchange.publish = _NackingExchange.publish.__get__(exchange)  # type: ignore[method-assign]
        for n in range(5):
            with pytest.raises(PublishNotConfirmed):
                await batcher.send("step", encode(_step(seq=10 + n)))
    assert calls == [1, 1]


async def test_envelopes_never_pass_the_message_limit() -> None:
    """Records near the record limit among small ones: every envelope stays within MAX_MESSAGE_BYTES,
    and every record is in exactly one envelope."""
    exchange = _Exchange()
    sizes = [200, 900_000, 300, 1_000_000, 50, 700_000, 400_000, 100]
    parts = [encode(_step(seq=i + 1, output="o" * size)) for i, size in enumerate(sizes)]
    parts = [storable(decode_telemetry(p))[1] for p in parts]
    async with TelemetryBatcher(exchange, linger_s=0.01) as batcher:  # type: ignore[arg-type]
        await asyncio.gather(*(batcher.send("step", p) for p in parts))
    assert all(len(b) <= limits.MAX_MESSAGE_BYTES for b in exchange.bodies)
    seqs = sorted(r["seq"] for b in exchange.bodies for r in orjson.loads(b)["records"])
    assert seqs == list(range(1, len(sizes) + 1))
    assert len(exchange.bodies) > 1


def test_fields_take_the_same_rule_as_models() -> None:
    """A record given as plain fields (the worker's hot path) is made storable exactly like its model:
    the same bytes when a rule applies, since both go through the model then."""
    for output in ({"n": 10**30}, {"s": "a\x00b"}, _nested(100), "x" * 1_500_000):
        record = _step(output=output)
        fields = {name: getattr(record, name) for name in StepRecorded.model_fields}
        assert storable_fields(fields) == storable(record)[1]


def test_usage_built_without_validation_is_a_normal_usage() -> None:
    """Usage.of (the hot path's constructor) gives what validation gives: equal, same JSON, copyable."""
    fast = Usage.of(1, 2, 3, 1)
    slow = Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3, calls=1)
    assert fast == slow
    assert fast.model_dump_json() == slow.model_dump_json()
    assert fast.model_fields_set == slow.model_fields_set
    assert fast.model_copy(update={"calls": 2}).calls == 2
    assert (fast + slow).total_tokens == 6
