"""Property: whatever values tasks and adapters carry, each session is stored verbatim or by the documented
rule, or is accounted for with a reason, and every other session in the run is exact.

Hypothesis draws arbitrary JSON values and strings (NUL, lone surrogates, giant integers, NaN, nesting past
every limit, sizes past the message limit) for a task's metadata, for the task's own text (raw NUL, lone
surrogates, up to the task's size limits) and for what the adapter returns (output, events, a final answer
up to past the trace limit). The traces are the prompts the worker sends the adapter, made from the task's
text and the outputs (no adapter sets its own), so they carry all of it too. Everything goes end to end on
real services: producer -> a worker process running ``tests._adapters:Echo`` (which returns what its task
asks for) -> the ingestor -> PostgreSQL + JSONL.

The expected stored records are made in this process by the worker's own code (the same adapter run by a
``Student`` into the worker's ``TelemetryPublisher``, so ``schemas.storable`` applies the rule), and checked
independently of it: no NUL anywhere, nesting within the limit, a value the rule left alone (no ``limits``
note) stored exactly as the run made it, a value it only cleaned stored as the README's rule 1 says (NUL as
``\\u0000``, a lone surrogate as ``?``), and a cut one stored as a head of that text and the marker naming the
size the note gives.
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
from typing import Any, Final

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from ingestor import read_lines
from producer._audit import run_audit
from schemas import NUL_ESCAPE, TaskMessage, decode_task, encode, limits
from tests._adapters import Echo, echo_answer, echo_output, echo_spec
from tests._json import json_depth, json_strings
from tests._pipeline import PipelineStack
from worker.runtime._telemetry import TelemetryPublisher
from worker.sessions import Student, load_adapter

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

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
# What a large text is made of: raw NUL and lone surrogates among ordinary, multi-byte and escaped characters.
_unit = st.text(
    alphabet=st.sampled_from(["x", "é", "😀", "\x00", "\udc80", '"', "\\", "\n"]), min_size=1, max_size=3
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
        "answer_chars": draw(st.sampled_from([None, None, None, 300_000, 1_100_000])),
        "metadata": {"m": _nest(draw(_json), draw(st.sampled_from([0, 0, 5, 80])))},
        "free_text": draw(_text),
        "free_unit": draw(_unit),
        "free_chars": draw(st.sampled_from([0, 0, 0, 60_000, limits.MAX_TASK_CHARS])),
    }


_PLAIN_SPEC: Final = {"output": "o", "pad_bytes": 0, "events": [], "answer": "", "answer_chars": None,
                      "metadata": {}, "free_text": "", "free_unit": "x", "free_chars": 0}  # fmt: skip
_BOUNDARY_ANSWER: Final = {**_PLAIN_SPEC, "answer": "ascii ", "answer_chars": limits.MAX_TRACE_CHARS + 1}
"""A final answer one character past the limit, with nothing for rule 1 to do: only its size is cut."""
_BOUNDARY_TASK: Final = {
    **_PLAIN_SPEC,
    "answer": "a\x00",
    "free_unit": "\x00\ud800😀",
    "free_chars": limits.MAX_TASK_CHARS,
}
"""A task text at the character limit, with NUL (past the limit once escaped) and lone surrogates."""


_ECHO: Final = "tests._adapters:Echo"


@pytest.fixture
async def running_stack(pipeline: PipelineStack) -> AsyncIterator[PipelineStack]:
    await pipeline.declare()
    pipeline.start_ingestor(INGESTOR_JSONL_MAX_AGE_S="0.5")
    pipeline.start_worker("w1", "--adapter", f"echo={_ECHO}", "--concurrency", "8")
    yield pipeline
    pipeline.stop_all(signal.SIGTERM)


def _task(spec: dict[str, Any], task_id: str) -> TaskMessage | None:
    """The task for ``spec``: its JSON head (what Echo returns), a newline, then the free text (``free_text``,
    then ``free_unit`` repeated to ``free_chars`` characters), as much of it as the task's limits (characters,
    then encoded bytes) allow. None when the contract refuses the task (metadata nested too deep): that is
    a rejection at submit, accounted for by the producer's error."""
    head = json.dumps({k: spec[k] for k in ("output", "events", "answer", "answer_chars", "pad_bytes")})
    unit, chars = spec["free_unit"], spec["free_chars"]
    free = spec["free_text"] + unit * (chars // len(unit) + 1 if chars else 0)
    text = f"{head}\n{free}"[: limits.MAX_TASK_CHARS]
    try:
        task = TaskMessage(task_id=task_id, task=text, adapter="echo", metadata=spec["metadata"])
    except ValueError:
        return None
    while len(encode(task)) > limits.MAX_TASK_BYTES:
        keep = len(head) + 1 + (len(task.task) - len(head) - 1) * 3 // 4
        task = task.model_copy(update={"task": task.task[:keep]})
    return task


class _Sent:
    """The worker's telemetry batcher as far as a publisher sees it: keeps each record's bytes, confirmed."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def send(self, kind: str, body: bytes) -> asyncio.Future[None]:
        self.bodies.append(body)
        confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        confirmed.set_result(None)
        return confirmed


class _Seeing:
    """:class:`Echo`, keeping what each call was sent (a trace is that prompt) and what it returned."""

    def __init__(self) -> None:
        self.echo = Echo()
        self.prompts: dict[str, str] = {}
        self.returned: dict[str, Any] = {}

    def on_step(self, payload: str, metadata: dict[str, Any]) -> Any:
        phase = str(metadata["phase"])
        self.prompts[phase] = payload
        self.returned[phase] = self.echo.on_step(metadata)
        return self.returned[phase]


_STEP_IDS: Final = {"plan": 0, "execute": 1, "synthesize": 2}  # Echo plans one step


def _key(record: dict[str, Any]) -> str:
    kind = record["kind"]
    return f"step {record['step_id']}" if kind == "step" else kind.removeprefix("session.")


async def _as_the_worker_sends(task: TaskMessage) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(made, sent)``: what the run made of ``task`` before any limit applied (the task text as received,
    each call's prompt as ``trace <step_id>``, the final answer the adapter returned), and each record of
    the session ("opened", "step <id>", "closed") as the worker publishes it: the worker's own code (Student,
    TelemetryPublisher, so the storable rule) run here on the task as received."""
    received = decode_task(encode(task))
    seeing = _Seeing()
    sent = _Sent()
    publisher = TelemetryPublisher(sent, received, adapter="echo", attempt=1)  # type: ignore[arg-type]
    student = Student(load_adapter(seeing, name="echo"))
    await student.run(received.task, received.execution_mode, task_id=received.task_id, observer=publisher)
    publisher.publish_close()
    records = {_key(record): record for record in map(orjson.loads, sent.bodies)}
    assert set(records) == {"opened", "closed", "step 0", "step 1", "step 2"}
    made = {f"trace {_STEP_IDS[phase]}": prompt for phase, prompt in seeing.prompts.items()}
    made.update(task=received.task, final_answer=seeing.returned["synthesize"])
    return made, records


def _rule1(text: str) -> str:
    """The README's rule 1, written out: NUL as the six characters \\u0000, a lone surrogate as '?'."""
    return text.replace("\x00", NUL_ESCAPE).encode("utf-8", "replace").decode("utf-8")


def _without_sizes(note: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in note.items() if k != "kept_bytes"}


def _notes(record_limits: dict[str, Any]) -> dict[str, Any]:
    return {k: _without_sizes(v) for k, v in record_limits.items()}


def _check_text(
    where: str, stored: str, stored_note: dict[str, Any], made: str, expected: str, limit: int
) -> None:
    """A text field as the rule stores it (``made``: as the run made it, before any limit): untouched (no
    note) exactly as made; only cleaned, by rule 1; cut, a head of the cleaned text and the marker naming
    the size the note gives (where exactly depends on the whole record, whose times differ from this
    process's by a few bytes: within a few hundred characters of the cut made here)."""
    assert "\x00" not in stored, where
    assert len(stored) <= limit, (where, len(stored))
    cleaned = _rule1(made)
    if not stored_note:
        assert stored == made, (where, len(stored), len(made), stored[-60:])
    elif not stored_note.get("truncated"):
        assert stored == cleaned == expected, where
    else:
        marker = f"…[truncated: {stored_note['original_bytes']} bytes in all]"
        assert stored.endswith(marker), (where, stored[-80:], stored_note)
        assert expected.endswith(marker), (where, expected[-80:])
        head, expected_head = stored[: -len(marker)], expected[: -len(marker)]
        assert cleaned.startswith(head), where
        assert abs(len(head) - len(expected_head)) < 1_000, (where, len(head), len(expected_head))


def _check_output(
    where: str, stored: Any, stored_note: dict[str, Any], sent: dict[str, Any], returned: Any
) -> None:
    """The execute step's output as the rule makes it (and, when the rule did nothing, what the adapter
    returned: NaN and Infinity as null)."""
    output, note = sent["output"], sent["limits"].get("output", {})
    if note.get("truncated"):
        # Cut to the record limit: where exactly depends on the rest of the real record, so the stored
        # head and the expected head are prefixes of one text, followed by the same marker.
        marker = output[output.rindex("…[truncated:") :]
        assert stored.endswith(marker), where
        head, expected_head = stored[: -len(marker)], output[: -len(marker)]
        assert head.startswith(expected_head[:1000]) or expected_head.startswith(head), where
        assert abs(len(head) - len(expected_head)) < 20_000, where
    else:
        assert stored == output, (where, _first_difference(stored, output))
    if not stored_note:
        assert stored == _nan_as_null(returned), (where, _first_difference(stored, _nan_as_null(returned)))


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
        await asyncio.sleep(0.2)


async def _stored(stack: PipelineStack, ids: list[str]) -> tuple[dict[str, Any], dict[str, dict[int, Any]]]:
    """The ledger-and-session rows of the tasks ``ids``, and their step rows by step_id."""
    conn = await asyncpg.connect(stack.database_url)
    try:
        sessions = {
            r["task_id"]: r
            for r in await conn.fetch(
                "SELECT l.task_id, l.state, s.id, s.adapter_session_id, s.status, s.task, s.final_answer,"
                " s.metadata, s.export_file FROM task_ledger l LEFT JOIN sessions s"
                " ON s.adapter_session_id = l.adapter_session_id WHERE l.task_id = ANY($1)",
                ids,
            )
        }
        steps: dict[str, dict[int, Any]] = {task_id: {} for task_id in sessions}
        for r in await conn.fetch(
            "SELECT s.task_id, r.step_id, r.trace, r.output, r.metadata, r.adapter_events FROM step_results r"
            " JOIN sessions s ON s.id = r.session_id"
            " JOIN task_ledger l ON l.adapter_session_id = s.adapter_session_id WHERE l.task_id = ANY($1)",
            ids,
        ):
            steps[r["task_id"]][r["step_id"]] = r
    finally:
        await conn.close()
    return sessions, steps


@settings(
    max_examples=40,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking: each example is a pipeline run
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(specs=st.lists(_spec(), min_size=1, max_size=5))
@example(specs=[_BOUNDARY_ANSWER, _BOUNDARY_TASK])
async def test_any_values_are_stored_by_the_rule_or_accounted(
    running_stack: PipelineStack, specs: list[dict[str, Any]]
) -> None:
    """Each session: stored exactly once, its task text, traces, output, events, task metadata and final
    answer as the rule makes them (and verbatim when the rule did nothing); ordinary sessions beside them
    exact; nothing unexplained."""
    stack = running_stack
    run = uuid.uuid4().hex[:8]
    plain = [TaskMessage(task_id=f"{run}-plain-{i}", task=json.dumps({"output": {"i": i}}), adapter="echo")
             for i in range(3)]  # fmt: skip
    drawn = [_task(spec, f"{run}-{i}") for i, spec in enumerate(specs)]
    tasks = plain + [t for t in drawn if t is not None]
    ids = await stack.submit(tasks)
    await _wait_accounted(stack, ids)
    sessions, steps = await _stored(stack, ids)
    for task in tasks:
        where, row = task.task_id, sessions[task.task_id]
        assert (row["state"], row["status"]) == ("succeeded", "succeeded"), where
        assert row["export_file"] is not None, where
        made, sent = await _as_the_worker_sends(task)
        assert set(steps[task.task_id]) == {0, 1, 2}, where  # plan, the one execute, synthesize
        metadata = orjson.loads(row["metadata"])
        session_notes = metadata.get("limits", {})
        # The opened: the task's text (verbatim unless NUL, a lone surrogate or its size made the rule act;
        # the producer already wrote a lone surrogate as '?') and its metadata.
        assert _notes(session_notes) == _notes({**sent["opened"]["limits"], **sent["closed"]["limits"]})
        assert _rule1(made["task"]) == _rule1(task.task)
        _check_text(
            f"{where} task", row["task"], session_notes.get("task", {}), made["task"],
            sent["opened"]["task"], limits.MAX_TASK_CHARS,
        )  # fmt: skip
        assert _same(metadata["task_metadata"], sent["opened"]["task_metadata"]), where
        # The close: the final answer (what Echo returned, cut with a marker past the limits).
        assert made["final_answer"] == echo_answer(echo_spec(task.task))
        _check_text(
            f"{where} final answer", row["final_answer"], session_notes.get("final_answer", {}),
            made["final_answer"], sent["closed"]["final_answer"], limits.MAX_TRACE_CHARS,
        )  # fmt: skip
        for step_id, step in steps[task.task_id].items():
            expected = sent[f"step {step_id}"]
            step_notes = orjson.loads(step["metadata"]).get("limits", {})
            assert _notes(step_notes) == _notes(expected["limits"]), (where, step_id)
            _check_text(
                f"{where} trace {step_id}", step["trace"], step_notes.get("trace", {}),
                made[f"trace {step_id}"], expected["trace"], limits.MAX_TRACE_CHARS,
            )  # fmt: skip
            assert _same(orjson.loads(step["adapter_events"]), expected["events"]), (where, step_id)
        execute = steps[task.task_id][1]
        output = sent["step 1"]["output"]
        stored = (
            execute["output"]
            if isinstance(output, str) or output is None
            else orjson.loads(execute["output"])
        )
        output_note = orjson.loads(execute["metadata"]).get("limits", {}).get("output", {})
        _check_output(where, stored, output_note, sent["step 1"], echo_output(echo_spec(task.task)))
        for value in (
            stored,
            orjson.loads(execute["adapter_events"]),
            metadata,
            row["task"],
            row["final_answer"],
        ):
            assert all("\x00" not in s for s in json_strings(value)), where
            assert json_depth(value) <= limits.MAX_JSON_DEPTH + 4, where
    asids = {r["adapter_session_id"] for r in sessions.values()}
    files = [p for p in stack.jsonl_dir.iterdir() if not p.name.startswith(".")]
    lines = [
        line
        for line in (orjson.loads(raw) for path in files for raw in read_lines(path))
        if line["adapter_session_id"] in asids
    ]
    assert Counter(line["adapter_session_id"] for line in lines) == Counter(dict.fromkeys(asids, 1))
    by_asid = {r["adapter_session_id"]: r for r in sessions.values()}
    for line in lines:  # each session in exactly one finalised line, which holds what Postgres holds
        row = by_asid[line["adapter_session_id"]]
        assert (line["task"], line["final_answer"]) == (row["task"], row["final_answer"])
