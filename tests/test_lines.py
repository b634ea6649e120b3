"""JSONL lines as trainers load them: the Atlas step fields, attempts, the bounded context, and the Hugging
Face ``datasets`` JSON loader over finalised files that mix output types and failed sessions.

Lines are built the way the ingestor builds them from what it just wrote: wire records -> ``fresh_row`` /
``step_row`` -> ``line_session`` -> ``build_line`` (the path Postgres-built lines match byte for byte,
``tests/test_ingestor_service.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingestor._batch import SessionChange
from ingestor._lines import build_line
from ingestor._rows import fresh_row, step_row
from ingestor._write import line_session
from schemas import SessionClosed, SessionOpened, StepRecorded, Usage
from schemas.limits import MAX_CONTEXT_RESULT_CHARS, MAX_CONTEXT_RESULTS

T0 = datetime(2026, 11, 25, 9, 0, 0, tzinfo=UTC)
_TOOLS = ("search", "calculator")


@dataclass
class _Session:
    """One session as a worker reports it, and the line the ingestor writes for it."""

    asid: str
    outputs: list[Any]
    line: bytes

    @property
    def record(self) -> dict[str, Any]:
        return dict(orjson.loads(self.line))


def _step(asid: str, task_id: str, seq: int, phase: str, output: Any, **fields: Any) -> StepRecorded:
    start = T0 + timedelta(seconds=seq)
    return StepRecorded(
        adapter_session_id=asid,
        task_id=task_id,
        seq=seq,
        step_id=fields.pop("step_id", seq - 1),
        phase=phase,  # type: ignore[arg-type]
        description=fields.pop("description", f"{phase} {seq}"),
        output=output,
        trace=f"prompt {seq}",
        usage=Usage(prompt_tokens=seq, completion_tokens=1, total_tokens=seq + 1, calls=1),
        started_at=start,
        finished_at=start + timedelta(milliseconds=5),
        **fields,
    )


def _session(
    session_id: int,
    outputs: Sequence[Any],
    *,
    task_id: str | None = None,
    attempt: int = 1,
    fail: bool = False,
    final_attempt: bool | None = None,
    plan: dict[str, Any] | None = None,
) -> _Session:
    """A demo-like session (plan, one execute per output with a tool_call event, synthesis), or with
    ``fail`` one whose last execute fails (no synthesis; the close says failed), built into its line."""
    asid = f"as-{session_id}"
    task_id = task_id or f"task-{session_id}"
    n = len(outputs)
    plan = plan or {
        "steps": [
            {"id": i, "description": f"part {i}", "depends_on": list(range(1, i))} for i in range(1, n + 1)
        ]
    }
    opened = SessionOpened(
        adapter_session_id=asid, task_id=task_id, adapter="demo", task=f"task {task_id}", attempt=attempt
    )
    steps = [_step(asid, task_id, 1, "plan", orjson.dumps(plan).decode())]
    for i, output in enumerate(outputs, start=1):
        tool = _TOOLS[i % len(_TOOLS)]
        events: list[dict[str, Any]] = [
            {"type": "tool_call", "tool": tool, "arguments": {"query": f"part {i}"}},
            {"type": "tool_result", "tool": tool, "result": f"{tool} found {i}"},
        ]
        if fail and i == n:
            steps.append(
                _step(asid, task_id, i + 1, "execute", None, events=[], status="error", error="tool is down")
            )
        else:
            steps.append(_step(asid, task_id, i + 1, "execute", output, events=events))
    if not fail:
        steps.append(_step(asid, task_id, n + 2, "synthesize", f"answer {task_id}"))
    close_metadata: dict[str, Any] = {"turns": len(steps)}
    if final_attempt is not None:
        close_metadata["final_attempt"] = final_attempt
    closed = SessionClosed(
        adapter_session_id=asid,
        task_id=task_id,
        seq=len(steps) + 1,
        steps=len(steps),
        status="failed" if fail else "succeeded",
        reason="execute step failed: tool is down" if fail else None,
        final_answer="" if fail else f"answer {task_id}",
        plan=plan,
        close_metadata=close_metadata,
        closed_at=T0 + timedelta(seconds=len(steps) + 1),
    )
    change = SessionChange(asid, task_id, T0, opened=opened, closed=closed, steps=len(steps))
    session = line_session(session_id, fresh_row(change), closed.plan)
    return _Session(asid, list(outputs), build_line(session, [step_row(s) for s in steps]))


def test_steps_carry_the_atlas_step_fields() -> None:
    """Each step has depends_on from its plan step, tool/tool_params from its first tool_call event, the
    prior steps' results as context, validation/guidance/reward present and null, and the adapter fields at
    its top level and in its metadata; the plan and synthesis calls are steps too (phase says which)."""
    record = _session(1, ["first", "second"]).record
    steps = record["steps"]
    assert [(s["step_id"], s["phase"]) for s in steps] == [
        (0, "plan"),
        (1, "execute"),
        (2, "execute"),
        (3, "synthesize"),
    ]
    plan, first, second, synth = steps
    assert (plan["depends_on"], first["depends_on"], second["depends_on"], synth["depends_on"]) == (
        None,
        [],
        [1],
        None,
    )
    assert (first["tool"], first["tool_params"]) == ("calculator", {"query": "part 1"})
    assert (second["tool"], second["tool_params"]) == ("search", {"query": "part 2"})
    assert (plan["tool"], plan["tool_params"], synth["tool"]) == (None, None, None)
    for step in steps:
        assert (step["validation"], step["guidance"], step["reward"]) == (None, None, None)
        for key in ("adapter_session_id", "adapter_usage", "adapter_events"):
            assert step["metadata"][key] == step[key]
        assert step["adapter_session_id"] == "as-1"
        assert step["usage"] == step["adapter_usage"]
    assert plan["context"] == {"prior_results": [], "omitted_results": 0}
    assert second["context"]["prior_results"] == [
        {"step_id": 0, "phase": "plan", "status": "ok", "output_text": plan["output"]},
        {"step_id": 1, "phase": "execute", "status": "ok", "output_text": "first"},
    ]
    assert [p["step_id"] for p in synth["context"]["prior_results"]] == [0, 1, 2]
    assert "phases" not in record["session_metadata"]["adapter_session"]


def test_tool_from_openai_style_events_and_from_the_plan() -> None:
    """An OpenAI-style tool_call event (``name``, parsed ``arguments``) names the tool too; a step without a
    tool_call event takes the tool Atlas plans name; arguments that are not an object give null params."""
    plan = {
        "steps": [
            {"id": 1, "description": "look", "depends_on": [], "tool": "web", "tool_params": {"q": "x"}},
            {"id": 2, "description": "call", "depends_on": [1]},
        ]
    }
    asid, task_id = "as-oa", "task-oa"
    rows = [
        step_row(_step(asid, task_id, 1, "execute", "a", step_id=1)),
        step_row(
            _step(
                asid,
                task_id,
                2,
                "execute",
                "b",
                step_id=2,
                events=[
                    {"type": "llm_call", "model": "m"},
                    {"type": "tool_call", "id": "c1", "name": "lookup", "arguments": "not json {"},
                ],
            )
        ),
    ]
    opened = SessionOpened(adapter_session_id=asid, task_id=task_id, adapter="openai", task="t")
    closed = SessionClosed(adapter_session_id=asid, task_id=task_id, seq=3, steps=2, status="succeeded")
    change = SessionChange(asid, task_id, T0, opened=opened, closed=closed, steps=2)
    record = orjson.loads(build_line(line_session(7, fresh_row(change), plan), rows))
    first, second = record["steps"]
    assert (first["tool"], first["tool_params"]) == ("web", {"q": "x"})
    assert (second["tool"], second["tool_params"]) == ("lookup", None)


def test_object_outputs_are_json_text() -> None:
    """A step output that was a JSON object or list is written as its JSON text (strings as they are, a
    missing output as ""), so ``output`` is a string in every line."""
    outputs = ["plain", {"value": 1, "items": [1, 2]}, [3, 4]]
    record = _session(2, outputs).record
    executes = [s for s in record["steps"] if s["phase"] == "execute"]
    assert all(isinstance(s["output"], str) for s in record["steps"])
    assert executes[0]["output"] == "plain"
    assert orjson.loads(executes[1]["output"]) == {"value": 1, "items": [1, 2]}
    assert orjson.loads(executes[2]["output"]) == [3, 4]
    failed = _session(3, ["ok", "lost"], fail=True).record
    assert failed["steps"][-1]["output"] == ""
    assert failed["steps"][-1]["metadata"]["error"] == "tool is down"


@pytest.mark.parametrize(
    ("fail", "final_attempt", "expected"),
    [
        (False, None, True),  # a succeeded task never runs again
        (False, True, True),
        (True, False, False),  # the worker retries it
        (True, True, True),  # the worker dead-letters it: no run follows
        (True, None, None),  # a close from a worker that did not say: unknown
    ],
)
def test_attempt_and_final_attempt(fail: bool, final_attempt: bool | None, expected: bool | None) -> None:
    """``attempt`` is the opened's run number and ``final_attempt`` the worker's retry decision from the
    close's metadata (succeeded: always true; a failed close that does not say: null)."""
    record = _session(4, ["x"], attempt=2, fail=fail, final_attempt=final_attempt).record
    assert record["attempt"] == 2
    assert record["final_attempt"] is expected


def test_context_is_bounded() -> None:
    """A session of many large outputs: each step's context lists only the newest prior results, each cut
    to the limit, and counts the rest, so the line grows linearly with the steps (not quadratically)."""
    n, size = 40, 50_000
    outputs = [f"{i:03d}" + "x" * size for i in range(n)]
    plan = {"steps": [{"id": i, "description": f"p{i}", "depends_on": []} for i in range(1, n + 1)]}
    session = _session(5, outputs, plan=plan)
    record = session.record
    last = record["steps"][-1]
    assert last["step_id"] == n + 1
    results = last["context"]["prior_results"]
    assert [p["step_id"] for p in results] == list(range(n + 1 - MAX_CONTEXT_RESULTS, n + 1))
    assert last["context"]["omitted_results"] == n + 1 - MAX_CONTEXT_RESULTS
    for entry in results:
        assert len(entry["output_text"]) <= MAX_CONTEXT_RESULT_CHARS
        assert entry["output_text"].endswith(f"…[truncated: {size + 3} bytes in all]")
    outputs_bytes = n * (size + 3)
    context_bound = (n + 2) * MAX_CONTEXT_RESULTS * (MAX_CONTEXT_RESULT_CHARS * 3 + 100)
    assert len(session.line) < outputs_bytes + context_bound + 200_000


def _load(paths: Sequence[Path], cache: Path) -> Any:
    datasets = pytest.importorskip("datasets")
    return datasets.load_dataset(
        "json", data_files=[str(p) for p in paths], split="train", cache_dir=str(cache)
    )


def test_hugging_face_loads_finalised_files_of_mixed_sessions(tmp_path: Path, monkeypatch) -> None:
    """``datasets.load_dataset("json")`` over two finalised files (the first holding only succeeded sessions
    with string outputs, the second object outputs and a failed task's two attempts) infers one schema that
    every line casts to, and the fields read back as written."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # final_attempt as the worker writes it: true in every succeeded close.
    first = [_session(10, ["alpha", "beta"], final_attempt=True), _session(11, ["gamma"], final_attempt=True)]
    second = [
        _session(12, [{"value": 1, "unit": "kg"}, ["a", "b"], "text too"], final_attempt=True),
        _session(13, ["tried", "broke"], task_id="flaky", attempt=1, fail=True, final_attempt=False),
        _session(14, ["tried again"], task_id="flaky", attempt=2, fail=True, final_attempt=True),
    ]
    paths = []
    for n, sessions in enumerate((first, second), start=1):
        path = tmp_path / f"sessions-20261125T09{n}000Z-i1-{n}.jsonl"  # named as the rolling files are
        path.write_bytes(b"".join(s.line for s in sessions))
        paths.append(path)
    dataset = _load(paths, tmp_path / "cache")
    sessions = first + second
    assert dataset.num_rows == len(sessions)
    for row, source in zip(dataset, sessions, strict=True):
        expected = source.record
        assert row["adapter_session_id"] == source.asid
        assert (row["attempt"], row["final_attempt"]) == (expected["attempt"], expected["final_attempt"])
        assert row["session_metadata"]["status"] == expected["session_metadata"]["status"]
        executes = [s for s in row["steps"] if s["phase"] == "execute"]
        for step, output in zip(executes, source.outputs, strict=False):
            if step["metadata"]["status"] == "error":
                assert step["output"] == ""
                assert step["metadata"]["error"] == "tool is down"
            else:
                text = output if isinstance(output, str) else orjson.dumps(output).decode()
                assert step["output"] == text
                assert step["tool"] in _TOOLS
        for got, want in zip(row["steps"], expected["steps"], strict=True):
            assert (got["step_id"], got["depends_on"], got["tool_params"]) == (
                want["step_id"],
                want["depends_on"],
                want["tool_params"],
            )
            assert got["context"]["prior_results"] == want["context"]["prior_results"]
            assert (got["reward"], got["validation"], got["guidance"]) == (None, None, None)
    flaky = [r for r in dataset if r["session_metadata"]["task_id"] == "flaky"]
    assert [(r["attempt"], r["final_attempt"]) for r in flaky] == [(1, False), (2, True)]
