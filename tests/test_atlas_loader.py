"""Our JSONL lines through the Atlas trainers' own loader, unchanged.

The Atlas trainers (the Atlas Core repository, Arc-Computer/ATLAS, which ``atlas train`` of the Atlas SDK
finds through ``ATLAS_CORE_PATH``) read an exported session file with ``load_runtime_traces(path)`` in
``trainers/runtime_dataset.py``: one ``json.loads`` per line, each line coerced into ``AtlasSessionTrace``
/ ``AtlasStepTrace``; the Hydra data config ``runtime_traces`` then turns them into a ``datasets.Dataset``
(``get_runtime_trace_dataset`` in ``custom_data/runtime_trace_data.py``).

That code is not on the package index (the PyPI project named ``atlas-core`` is an unrelated assistant
from 2018), so it cannot be a dev dependency and is not copied here: the tests that run it import it from
the checkout ``ATLAS_CORE_PATH`` names, and are skipped when it is unset. Its module imports only the
standard library and the checkout's ``atlas_core.runtime`` dataclasses; the dataset step also needs
``datasets`` (a dev dependency) and imports ``transformers`` for a type annotation only (the tokenizer
argument is unused), so when ``transformers`` is not installed that one name is stubbed.

``test_line_keeps_what_the_loader_would_drop`` and ``test_step_fields_have_the_types_the_loader_needs`` run
everywhere: they check the line against what that loader reads (as read from its code, see
``docs/jsonl-format.md``, "Loading with the Atlas trainers' loader").
"""

from __future__ import annotations

import json
import os
import sys
import types
from collections.abc import Iterator
from importlib import import_module, util
from pathlib import Path

import orjson
import pytest

from tests.test_lines import _TOOLS, _Session, _session

ATLAS_CORE_PATH = "ATLAS_CORE_PATH"
_MULTILINE = "first line\nsecond line\u2028third (a line separator) \u2029 and a paragraph separator"


def _sessions() -> list[_Session]:
    """Realistic sessions: string and object outputs, tool events, one with text a naive line splitter
    would cut, and a task that failed once (its first attempt, retried) and then succeeded."""
    return [
        _session(20, ["plain text", {"value": 1, "unit": "kg"}, ["a", "b"]], final_attempt=True),
        _session(21, [_MULTILINE], final_attempt=True),
        _session(22, ["tried", "broke"], task_id="flaky", attempt=1, fail=True, final_attempt=False),
        _session(23, ["worked"], task_id="flaky", attempt=2, final_attempt=True),
    ]


@pytest.fixture(scope="module")
def atlas_modules() -> Iterator[tuple[types.ModuleType, types.ModuleType]]:
    """The checkout's loader module and its dataset module, imported from ``ATLAS_CORE_PATH``.

    The dataset module is loaded from its file: its package's ``__init__`` imports every other data
    module (tokenizers, collators: ``transformers`` in earnest), none of which it uses."""
    configured = os.environ.get(ATLAS_CORE_PATH)
    if not configured:
        pytest.skip(
            f"{ATLAS_CORE_PATH} is unset: the Atlas trainers' loader (Arc-Computer/ATLAS, "
            "trainers/runtime_dataset.py) is not on the package index; point it at an ATLAS checkout"
        )
    root = Path(configured)
    loader_file, dataset_file = (
        root / "trainers/runtime_dataset.py",
        root / "custom_data/runtime_trace_data.py",
    )
    if not (loader_file.is_file() and dataset_file.is_file()):  # set but wrong: a failure, not a skip
        pytest.fail(f"{ATLAS_CORE_PATH}={root}: no {loader_file.name} or {dataset_file.name} in it")
    with pytest.MonkeyPatch.context() as mp:
        # Appended, so the checkout's own top-level names (it has a ``tests`` package too) never shadow ours.
        mp.setattr(sys, "path", [*sys.path, str(root)])
        with pytest.MonkeyPatch.context() as imports:
            if util.find_spec("transformers") is None:
                # Imported for the ``tokenizer`` parameter's annotation only; the function never uses it.
                # Removed again once imported: ``datasets`` treats a ``transformers`` module as the real one.
                stub = types.ModuleType("transformers.tokenization_utils_base")
                stub.PreTrainedTokenizerBase = object  # type: ignore[attr-defined]
                imports.setitem(sys.modules, "transformers", types.ModuleType("transformers"))
                imports.setitem(sys.modules, "transformers.tokenization_utils_base", stub)
            loader = import_module("trainers.runtime_dataset")
            spec = util.spec_from_file_location("_atlas_runtime_trace_data", dataset_file)
            assert spec is not None
            assert spec.loader is not None
            dataset_module = util.module_from_spec(spec)
            spec.loader.exec_module(dataset_module)
        yield loader, dataset_module


def _write(tmp_path: Path, sessions: list[_Session]) -> Path:
    path = tmp_path / "sessions-20261125T090000Z-i1-1.jsonl"  # a finalised file, as the ingestor names it
    path.write_bytes(b"".join(s.line for s in sessions))
    return path


def test_sessions_and_steps_load_unchanged(atlas_modules, tmp_path: Path) -> None:
    """``load_runtime_traces`` reads every line into one session and every step with the values written:
    the plan, execute and synthesize calls as steps, object outputs as their JSON text, tool and parameters
    from the tool events, dependencies, the prior results, the adapter fields folded into the step's
    metadata, no reward (an empty breakdown), and the attempt fields in the session metadata."""
    loader, _ = atlas_modules
    sessions = _sessions()
    traces = loader.load_runtime_traces(_write(tmp_path, sessions))
    assert len(traces) == len(sessions)
    for trace, source in zip(traces, sessions, strict=True):
        record = source.record
        assert (trace.task, trace.final_answer, trace.plan) == (
            record["task"],
            record["final_answer"],
            record["plan"],
        )
        assert trace.session_metadata == record["session_metadata"]
        assert trace.session_reward is None
        assert [s.step_id for s in trace.steps] == [s["step_id"] for s in record["steps"]]
        for step, written in zip(trace.steps, record["steps"], strict=True):
            assert (step.description, step.trace, step.output, step.attempts) == (
                written["description"],
                written["trace"],
                written["output"],
                1,
            )
            assert (step.tool, step.tool_params) == (written["tool"], written["tool_params"] or {})
            assert step.depends_on == written["depends_on"]
            assert step.context == written["context"]
            # No judge runs here: null in the line, an empty breakdown (not a real score 0.0) after loading.
            assert (step.reward.score, step.reward.judges, step.reward.raw) == (0.0, [], {})
            assert (step.validation, step.guidance) == (None, [])
            # The loader folds the top-level keys it does not know into metadata; ours agree with it.
            assert step.metadata["phase"] == written["phase"]
            assert step.metadata["usage"] == written["usage"] == written["metadata"]["adapter_usage"]
            for key, value in written["metadata"].items():
                assert step.metadata[key] == value
            assert step.metadata["adapter_session_id"] == source.asid

    first = traces[0]
    assert [s.metadata["phase"] for s in first.steps] == [
        "plan",
        "execute",
        "execute",
        "execute",
        "synthesize",
    ]
    plan_call, text, obj, array, synth = first.steps
    assert json.loads(plan_call.output) == first.plan
    assert text.output == "plain text"
    assert json.loads(obj.output) == {"value": 1, "unit": "kg"}
    assert json.loads(array.output) == ["a", "b"]
    assert synth.output == first.final_answer == "answer task-20"
    assert [(s.tool, s.tool_params) for s in (text, obj, array)] == [
        (_TOOLS[i % len(_TOOLS)], {"query": f"part {i}"}) for i in (1, 2, 3)
    ]
    assert [s.depends_on for s in first.steps] == [None, [], [1], [1, 2], None]
    assert [p["step_id"] for p in synth.context["prior_results"]] == [0, 1, 2, 3]
    assert synth.context["prior_results"][2]["output_text"] == obj.output
    assert [e["type"] for e in obj.metadata["adapter_events"]] == ["tool_call", "tool_result"]
    assert first.session_metadata["task_id"] == "task-20"
    assert first.session_metadata["adapter_session"]["adapter_session_id"] == "as-20"

    assert traces[1].steps[1].output == _MULTILINE  # line separators inside a string do not split a line

    failed = traces[2]
    assert failed.final_answer == ""
    assert failed.session_metadata["status"] == "failed"
    assert failed.session_metadata["reason"] == "execute step failed: tool is down"
    broken = failed.steps[-1]
    assert (broken.output, broken.metadata["status"], broken.metadata["error"]) == (
        "",
        "error",
        "tool is down",
    )
    assert [s.metadata["phase"] for s in failed.steps] == ["plan", "execute", "execute"]

    flaky = [t.session_metadata for t in traces if t.session_metadata["task_id"] == "flaky"]
    assert [(m["attempt"], m["final_attempt"], m["status"]) for m in flaky] == [
        (1, False, "failed"),
        (2, True, "succeeded"),
    ]


def test_runtime_trace_dataset_builds(atlas_modules, tmp_path: Path) -> None:
    """The trainers' data config (``get_runtime_trace_dataset``) turns the file into a ``datasets.Dataset``
    of one record per step, string and object outputs and a failed session mixed, without a schema error."""
    pytest.importorskip("datasets")
    _, dataset_module = atlas_modules
    sessions = _sessions()
    splits = dataset_module.get_runtime_trace_dataset(
        None, str(_write(tmp_path, sessions)), eval_split_ratio=0, shuffle=False
    )
    dataset = splits["train_dataset"]
    assert splits["eval_dataset"] is None
    steps = [step for s in sessions for step in s.record["steps"]]
    assert dataset.num_rows == len(steps)
    assert dataset["step_output"] == [s["output"] for s in steps]
    assert dataset["tool"] == [s["tool"] for s in steps]
    assert dataset["reward_score"] == [0.0] * len(steps)
    assert [m["final_attempt"] for m in dataset["session_metadata"]][-1] is True
    assert all(p.startswith("You are the Atlas Student executor") for p in dataset["prompt"])


def test_line_keeps_what_the_loader_would_drop() -> None:
    """The loader keeps only the Atlas session fields of a line (task, final_answer, plan, steps,
    session_metadata and the reward/learning fields), so what a trainer needs from our other top-level keys
    is in ``session_metadata`` too: the attempt fields, the execution mode and the adapter session."""
    for source in _sessions():
        record = source.record
        meta = record["session_metadata"]
        assert (meta["attempt"], meta["final_attempt"]) == (record["attempt"], record["final_attempt"])
        assert meta["execution_mode"] == record["execution_mode"]
        assert meta["adapter_session"]["adapter_session_id"] == record["adapter_session_id"]


def test_step_fields_have_the_types_the_loader_needs() -> None:
    """What the loader does with each step field, as its code reads them: ``tool_params`` an object or
    null (it calls ``.get`` on it; a list would crash it), ``context`` an object (anything else silently
    becomes ``{}``), ``metadata`` an object (else dropped), the text fields strings, and the judge fields
    null (so they load as an empty reward, no validation and no guidance)."""
    for source in _sessions():
        for step in orjson.loads(source.line)["steps"]:
            assert isinstance(step["step_id"], int)
            assert all(isinstance(step[k], str) for k in ("description", "trace", "output"))
            assert step["tool_params"] is None or isinstance(step["tool_params"], dict)
            assert step["tool"] is None or isinstance(step["tool"], str)
            assert isinstance(step["context"], dict)
            assert isinstance(step["metadata"], dict)
            assert step["depends_on"] is None or all(isinstance(d, int) for d in step["depends_on"])
            assert (step["reward"], step["validation"], step["guidance"]) == (None, None, None)
            assert "evaluation" not in step  # the loader would read it before ``reward``
