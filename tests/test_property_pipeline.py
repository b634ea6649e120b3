"""Property: whatever values tasks and adapters carry, each session is stored verbatim or by the documented
rule, or is accounted for with a reason, and every other session in the run is exact.

Hypothesis draws arbitrary JSON values and strings (NUL, lone surrogates, giant integers, NaN, nesting past
every limit, sizes past the message limit) for a task's metadata and for what the adapter returns (output,
events, final answer). They go end to end on real services: producer -> a worker process running
``tests._adapters:Echo`` (which returns what its task asks for) -> the ingestor -> PostgreSQL + JSONL.
The expected stored value is computed in this process by the rule itself (``schemas.storable`` over the
value the worker's normalisation makes), and independently checked: no NUL anywhere, nesting within the
limit, and an untouched value (no ``limits`` note) stored exactly as sent.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ingestor import read_lines
from producer._audit import run_audit
from schemas import SessionOpened, StepRecorded, TaskMessage, Usage, decode_task, encode, limits, storable
from tests._adapters import echo_output
from tests._json import json_depth, json_strings
from tests._pipeline import PipelineStack
from worker.sessions import normalize_outcome

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

_NOW = datetime(2026, 1, 1, tzinfo=UTC)

_text = st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(["\x00", "\ud800", "😀", '"', "\\"]))
_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    _text,
)
_json = st.recursive(
    _leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text.filter(bool), inner, max_size=3),
    max_leaves=12,
)


def _nest(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = {"n": value}
    return value


@st.composite
def _spec(draw: st.DrawFn) -> dict[str, Any]:
    depth = draw(st.sampled_from([0, 0, 0, 10, 70, 300]))
    return {
        "output": _nest(draw(_json), depth),
        "pad_bytes": draw(st.sampled_from([0, 0, 0, 1_200_000])),
        "events": [{"type": "probe", "v": draw(_json)} for _ in range(draw(st.integers(0, 3)))],
        "answer": draw(_text),
        "metadata": {"m": _nest(draw(_json), draw(st.sampled_from([0, 0, 5, 80])))},
    }


@pytest.fixture
async def running_stack(pipeline: PipelineStack) -> AsyncIterator[PipelineStack]:
    await pipeline.declare()
    pipeline.start_ingestor()
    pipeline.start_worker("w1", "--adapter", "echo=tests._adapters:Echo", "--concurrency", "8")
    yield pipeline
    pipeline.stop_all(signal.SIGTERM)


def _task(spec: dict[str, Any], task_id: str) -> TaskMessage | None:
    """The task for ``spec``, or None when the contract refuses it (metadata nested too deep): that is a
    rejection at submit, accounted for by the producer's error, not a session."""
    text = json.dumps({k: spec[k] for k in ("output", "events", "answer", "pad_bytes")})
    try:
        return TaskMessage(task_id=task_id, task=text, adapter="echo", metadata=spec["metadata"])
    except ValueError:
        return None


def _expected_output(task: TaskMessage) -> tuple[Any, dict[str, Any], list[Any]]:
    """What the rule makes of the adapter's output and events: (output, limits note, events)."""
    spec = json.loads(task.task)
    outcome = normalize_outcome({"output": echo_output(spec), "events": spec.get("events", [])})
    step = StepRecorded.model_construct(
        schema_version=1, kind="step", adapter_session_id="a", task_id=task.task_id, seq=1, step_id=1,
        phase="execute", description="", output=outcome.output, trace="", usage=Usage(),
        events=outcome.events, started_at=_NOW, finished_at=_NOW, status="ok", error=None, attempts=1,
        emitted_at=_NOW, limits={},
    )  # fmt: skip
    fixed, body = storable(step)
    decoded = orjson.loads(body)
    return (
        decoded["output"],
        {k: v for k, v in fixed.limits.items() if k in ("output", "events")},
        decoded["events"],
    )


def _expected_task_metadata(task: TaskMessage) -> Any:
    """The rule over the metadata as the worker receives it (through the wire: encode, then decode)."""
    received = decode_task(encode(task)).metadata
    opened = SessionOpened(adapter_session_id="a", task_id=task.task_id, adapter="echo", task="t")
    opened = opened.model_copy(update={"task_metadata": received})
    _, body = storable(opened)
    return orjson.loads(body)["task_metadata"]


def _same(stored: Any, expected: Any) -> bool:
    """Equal as JSON values, numbers compared as jsonb keeps them (``numeric``: 6.0514520743594e16 comes
    back as the integer 60514520743594190, the same decimal value)."""
    if isinstance(stored, int | float) and isinstance(expected, int | float):
        if isinstance(stored, bool) or isinstance(expected, bool):
            return stored is expected
        return math.isclose(stored, expected, rel_tol=1e-15, abs_tol=0.0) or stored == expected
    if isinstance(stored, dict) and isinstance(expected, dict):
        return stored.keys() == expected.keys() and all(_same(stored[k], expected[k]) for k in stored)
    if isinstance(stored, list) and isinstance(expected, list):
        return len(stored) == len(expected) and all(
            _same(a, b) for a, b in zip(stored, expected, strict=True)
        )
    return bool(stored == expected)


def _first_difference(a: Any, b: Any, path: str = "$") -> str:
    """Where two JSON values first differ (for assertion messages on deeply nested values)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{path}: keys {sorted(a)[:5]!r} != {sorted(b)[:5]!r}"
        return next((d for k in a if (d := _first_difference(a[k], b[k], f"{path}.{k}"))), "")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next(
            (
                d
                for i, (x, y) in enumerate(zip(a, b, strict=True))
                if (d := _first_difference(x, y, f"{path}[{i}]"))
            ),
            "",
        )
    return "" if a == b else f"{path}: {a!r:.200} != {b!r:.200}"


def _without_sizes(note: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in note.items() if k != "kept_bytes"}


def _nan_as_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_as_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_as_null(v) for v in value]
    return value


async def _wait_accounted(stack: PipelineStack, ids: list[str]) -> None:
    """Until every task is settled in the ledger and then (in that order: a task may succeed between two
    reads) the audit finds none of them missing."""
    deadline = time.monotonic() + 120
    while True:
        conn = await asyncpg.connect(stack.database_url)
        try:
            settled = await conn.fetchval(
                "SELECT count(*) FROM task_ledger WHERE task_id = ANY($1) AND state IN ('succeeded', 'dead')",
                ids,
            )
        finally:
            await conn.close()
        mine = []
        if settled == len(ids):
            report = await run_audit(stack.database_url, grace_s=0, since=None)
            mine = [f for f in report.findings if f.task_id in set(ids)]
            if not mine:
                return
        assert time.monotonic() < deadline, [f.to_json() for f in mine][:5]
        await asyncio.sleep(0.5)


@settings(
    max_examples=6,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking: each example is a pipeline run
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(specs=st.lists(_spec(), min_size=1, max_size=5))
async def test_any_values_are_stored_by_the_rule_or_accounted(
    running_stack: PipelineStack, specs: list[dict[str, Any]]
) -> None:
    """Each session: stored exactly once, its output, events and task metadata as the rule makes them (and
    verbatim when the rule did nothing); ordinary sessions beside them exact; nothing unexplained."""
    stack = running_stack
    run = uuid.uuid4().hex[:8]
    plain = [TaskMessage(task_id=f"{run}-plain-{i}", task=json.dumps({"output": {"i": i}}), adapter="echo")
             for i in range(3)]  # fmt: skip
    drawn = [_task(spec, f"{run}-{i}") for i, spec in enumerate(specs)]
    tasks = plain + [t for t in drawn if t is not None]
    ids = await stack.submit(tasks)
    await _wait_accounted(stack, ids)
    conn = await asyncpg.connect(stack.database_url)
    try:
        rows = {
            r["task_id"]: r
            for r in await conn.fetch(
                "SELECT l.task_id, l.state, s.adapter_session_id, s.status, s.metadata, s.export_file,"
                " r.output, r.metadata AS step_metadata, r.adapter_events"
                " FROM task_ledger l JOIN sessions s ON s.adapter_session_id = l.adapter_session_id"
                " JOIN step_results r ON r.session_id = s.id AND r.metadata->>'phase' = 'execute'"
                " WHERE l.task_id = ANY($1)",
                ids,
            )
        }
        ledger = [
            dict(r)
            for r in await conn.fetch(
                "SELECT l.task_id, s.id, s.status, (SELECT array_agg(r.metadata::text) FROM step_results r"
                " WHERE r.session_id = s.id) AS steps FROM task_ledger l LEFT JOIN sessions s"
                " ON s.adapter_session_id = l.adapter_session_id WHERE l.task_id = ANY($1)",
                ids,
            )
        ]
    finally:
        await conn.close()
    assert set(rows) == set(ids), ledger
    for task in tasks:
        row = rows[task.task_id]
        assert (row["state"], row["status"]) == ("succeeded", "succeeded")
        assert row["export_file"] is not None
        output, note, events = _expected_output(task)
        stored = row["output"] if isinstance(output, str) or output is None else orjson.loads(row["output"])
        step_limits = orjson.loads(row["step_metadata"]).get("limits", {})
        if note.get("output", {}).get("truncated"):
            # Cut to the record limit: where exactly depends on the rest of the real record, so the stored
            # head and the expected head are prefixes of one text, followed by the same marker.
            marker = output[output.rindex("…[truncated:") :]
            assert stored.endswith(marker)
            head, expected_head = stored[: -len(marker)], output[: -len(marker)]
            assert head.startswith(expected_head[:1000]) or expected_head.startswith(head)
            assert abs(len(head) - len(expected_head)) < 20_000
        else:
            assert stored == output, _first_difference(stored, output)
        assert _same(orjson.loads(row["adapter_events"]), events)
        assert {k: _without_sizes(step_limits[k]) for k in note} == {
            k: _without_sizes(v) for k, v in note.items()
        }
        if not note:  # untouched by the rule: exactly what the adapter returned (NaN/Infinity as null)
            sent = _nan_as_null(echo_output(json.loads(task.task)))
            assert stored == sent, _first_difference(stored, sent)
        metadata = orjson.loads(row["metadata"])
        assert _same(metadata["task_metadata"], _expected_task_metadata(task))
        for value in (stored, events, metadata):
            assert all("\x00" not in s for s in json_strings(value))
            assert json_depth(value) <= limits.MAX_JSON_DEPTH + 4
    asids = {r["adapter_session_id"] for r in rows.values()}
    files = [p for p in stack.jsonl_dir.iterdir() if not p.name.startswith(".")]
    found = Counter(
        line["adapter_session_id"]
        for line in (orjson.loads(raw) for path in files for raw in read_lines(path))
        if line["adapter_session_id"] in asids
    )
    assert found == Counter(dict.fromkeys(asids, 1))  # each session in exactly one finalised line
