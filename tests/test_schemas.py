"""The wire contract: round-trips (hypothesis) and every kind of bad input raising one typed error."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    DecodeError,
    SessionClosed,
    SessionOpened,
    StepRecorded,
    TaskMessage,
    TelemetryBatch,
    Usage,
    decode_task,
    decode_telemetry,
    decode_telemetry_batch,
    encode,
    encode_telemetry_batch,
    json_schemas,
)
from schemas._export import JSONSCHEMA_DIR, render

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,40}", fullmatch=True)
text = st.text(max_size=200)
json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=5)
# hypothesis takes naive bounds and attaches the timezone itself
times = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC))  # noqa: DTZ001
usages = st.builds(
    Usage,
    prompt_tokens=st.integers(0, 10**9),
    completion_tokens=st.integers(0, 10**9),
    total_tokens=st.integers(0, 10**9),
    calls=st.integers(0, 10**6),
)
events = st.lists(
    st.fixed_dictionaries({"type": st.text(min_size=1, max_size=10)}, optional={"x": json_values}), max_size=3
)


@given(ids, st.text(min_size=1, max_size=300), st.none() | ids, json_objects, times)
def test_task_round_trips(
    task_id: str, task: str, adapter: str | None, metadata: dict[str, Any], at: datetime
) -> None:
    """Any valid task encodes and decodes to an equal model."""
    message = TaskMessage(task_id=task_id, task=task, adapter=adapter, metadata=metadata, submitted_at=at)
    assert decode_task(encode(message)) == message


@settings(max_examples=60)
@given(
    ids,
    ids,
    st.integers(1, 10**6),
    st.integers(0, 50),
    st.sampled_from(["plan", "execute", "synthesize"]),
    json_values,
    text,
    usages,
    events,
    times,
    st.floats(0, 1000),
)
def test_step_round_trips(
    asid: str,
    task_id: str,
    seq: int,
    step_id: int,
    phase: str,
    output: Any,
    trace: str,
    usage: Usage,
    evs: list[dict[str, Any]],
    start: datetime,
    secs: float,
) -> None:
    """Any valid step record survives encode/decode unchanged, alone and inside a batch."""
    step = StepRecorded(
        adapter_session_id=asid,
        task_id=task_id,
        seq=seq,
        step_id=step_id,
        phase=phase,  # type: ignore[arg-type]
        output=output,
        trace=trace,
        usage=usage,
        events=evs,
        started_at=start,
        finished_at=start + timedelta(seconds=secs),
    )
    assert decode_telemetry(encode(step)) == step
    batch = decode_telemetry_batch(encode_telemetry_batch([step, step]))
    assert batch.records == [step, step]
    assert batch.rejects == []


@given(
    ids, ids, st.integers(0, 100), st.sampled_from(["succeeded", "failed", "abandoned"]), json_objects, usages
)
def test_close_round_trips(
    asid: str, task_id: str, steps: int, status: str, meta: dict[str, Any], totals: Usage
) -> None:
    """Closes round-trip, and their seq is tied to the number of steps."""
    close = SessionClosed(
        adapter_session_id=asid,
        task_id=task_id,
        seq=steps + 1,
        steps=steps,
        status=status,  # type: ignore[arg-type]
        totals=totals,
        close_metadata=meta,
        plan={"steps": []},
    )
    assert decode_telemetry(encode(close)) == close


def _opened(**overrides: Any) -> SessionOpened:
    fields: dict[str, Any] = {"adapter_session_id": "s1", "task_id": "t1", "adapter": "demo", "task": "x"}
    fields.update(overrides)
    return SessionOpened(**fields)


@pytest.mark.parametrize(
    ("body", "reason", "fragment"),
    [
        (b"{not json", "not_json", "not JSON"),
        (b"[1, 2]", "not_an_object", "list"),
        (b'"text"', "not_an_object", "str"),
        (b'{"task": "x", "schema_version": 2}', "unsupported_version", "schema_version 2"),
        (b'{"tusk": "x"}', "invalid", "tusk"),
        (b'{"task": ""}', "invalid", "task"),
        (b'{"task": "x", "task_id": "has space"}', "invalid", "task_id"),
        (b'{"task": "x", "submitted_at": "2026-01-01T00:00:00"}', "invalid", "submitted_at"),
        (b'{"task": "x", "metadata": [1]}', "invalid", "metadata"),
    ],
)
def test_bad_task_bytes_raise_decode_error_saying_what(body: bytes, reason: str, fragment: str) -> None:
    """Each kind of bad task body raises DecodeError with its reason code and a message naming the problem."""
    with pytest.raises(DecodeError) as info:
        decode_task(body)
    assert info.value.reason == reason
    assert fragment in str(info.value)


def test_oversized_body_is_refused_before_parsing() -> None:
    """A body over the limit is refused as too_large, whatever it contains."""
    with pytest.raises(DecodeError) as info:
        decode_task(b'{"task": "' + b"x" * 2000 + b'"}', max_bytes=1024)
    assert info.value.reason == "too_large"
    assert "1024" in str(info.value)


@pytest.mark.parametrize(
    ("record", "fragment"),
    [
        (
            {
                "kind": "step",
                "adapter_session_id": "s",
                "task_id": "t",
                "seq": 0,
                "step_id": 1,
                "phase": "execute",
                "started_at": "2026-01-01T00:00:00Z",
                "finished_at": "2026-01-01T00:00:01Z",
            },
            "seq",
        ),
        (
            {
                "kind": "step",
                "adapter_session_id": "s",
                "task_id": "t",
                "seq": 1,
                "step_id": 1,
                "phase": "execute",
                "started_at": "2026-01-01T00:00:02Z",
                "finished_at": "2026-01-01T00:00:01Z",
            },
            "before started_at",
        ),
        (
            {
                "kind": "step",
                "adapter_session_id": "s",
                "task_id": "t",
                "seq": 1,
                "step_id": 1,
                "phase": "think",
                "started_at": "2026-01-01T00:00:00Z",
                "finished_at": "2026-01-01T00:00:01Z",
            },
            "phase",
        ),
        (
            {
                "kind": "step",
                "adapter_session_id": "s",
                "task_id": "t",
                "seq": 1,
                "step_id": 1,
                "phase": "execute",
                "events": [{"no_type": 1}],
                "started_at": "2026-01-01T00:00:00Z",
                "finished_at": "2026-01-01T00:00:01Z",
            },
            "type",
        ),
        (
            {
                "kind": "session.closed",
                "adapter_session_id": "s",
                "task_id": "t",
                "seq": 5,
                "steps": 2,
                "status": "succeeded",
            },
            "steps + 1",
        ),
        (
            {
                "kind": "session.closed",
                "adapter_session_id": "s",
                "task_id": "t",
                "seq": 1,
                "steps": 0,
                "status": "done",
            },
            "status",
        ),
        ({"kind": "session.exploded", "adapter_session_id": "s", "task_id": "t", "seq": 0}, "kind"),
        (
            {
                "kind": "session.opened",
                "adapter_session_id": "s",
                "task_id": "t",
                "seq": 0,
                "adapter": "d",
                "task": "x",
                "usage": {},
            },
            "usage",
        ),
    ],
)
def test_bad_telemetry_records_name_the_field(record: dict[str, Any], fragment: str) -> None:
    """Wrong-shaped telemetry raises DecodeError(invalid) whose message names the offending field."""
    with pytest.raises(DecodeError) as info:
        decode_telemetry(orjson.dumps(record))
    assert info.value.reason == "invalid"
    assert fragment in str(info.value)


def test_batch_keeps_good_records_and_returns_bad_ones_with_their_json() -> None:
    """One bad record in a batch is rejected with its own JSON and index; the good ones are decoded."""
    good = _opened()
    body = orjson.dumps(
        {
            "schema_version": 1,
            "kind": "session.opened",
            "records": [good.model_dump(mode="json"), {"kind": "session.opened", "oops": 1}, 7],
        }
    )
    batch = decode_telemetry_batch(body)
    assert batch.records == [good]
    assert [r.index for r in batch.rejects] == [1, 2]
    assert orjson.loads(batch.rejects[0].body) == {"kind": "session.opened", "oops": 1}
    assert batch.rejects[1].error.reason == "not_an_object"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"schema_version": 1, "kind": "step", "records": []}', "non-empty"),
        (b'{"schema_version": 1, "kind": "nope", "records": [{}]}', "kind"),
        (b'{"schema_version": 1, "kind": "step", "records": [], "x": 1}', "records"),
        (b'{"schema_version": 3, "kind": "step", "records": [{}]}', "schema_version 3"),
    ],
)
def test_bad_batch_envelopes_raise(body: bytes, fragment: str) -> None:
    """A broken envelope is one DecodeError for the whole message (it is dead-lettered whole)."""
    with pytest.raises(DecodeError) as info:
        decode_telemetry_batch(body)
    assert fragment in str(info.value)


def test_mixed_kind_batch_rejects_the_stranger() -> None:
    """A record of another kind inside a batch is rejected, not silently routed under the wrong key."""
    body = encode_telemetry_batch([_opened()])
    data = orjson.loads(body)
    data["kind"] = "step"
    batch = decode_telemetry_batch(orjson.dumps(data))
    assert batch.records == []
    assert "session.opened" in str(batch.rejects[0].error)


def test_models_are_frozen_and_closed() -> None:
    """Messages are immutable values and unknown fields are refused at construction."""
    message = TaskMessage(task="x")
    with pytest.raises(ValueError, match="frozen"):
        message.task = "y"  # type: ignore[misc]
    with pytest.raises(ValueError, match="extra"):
        TaskMessage(task="x", colour="blue")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match=r"one kind|holds"):
        TelemetryBatch(kind="step", records=[_opened()])


def test_committed_json_schemas_match_the_models() -> None:
    """schemas/jsonschema/*.json is what `python -m schemas` would write now (no stale contract)."""
    for name, schema in json_schemas().items():
        assert (JSONSCHEMA_DIR / name).read_bytes() == render(schema), (
            f"{name} is stale: run python -m schemas"
        )
