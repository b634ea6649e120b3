"""Plan parsing: the accepted shapes, id handling, and the single-step fallback."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import pytest

from worker.sessions._plan import MAX_PLAN_STEPS, execute_prompt, parse_plan, plan_prompt, synthesize_prompt


def steps_of(plan: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The plan's steps, typed for the assertions below."""
    assert plan is not None
    return cast(list[dict[str, Any]], plan["steps"])


FALLBACK = {"steps": [{"id": 1, "description": "the task", "depends_on": []}]}


def test_dict_with_steps() -> None:
    """A dict with a steps list is used, ids and depends_on kept."""
    plan, fallback = parse_plan(
        {"steps": [{"id": 1, "description": "a"}, {"id": 2, "description": "b", "depends_on": [1]}]}, "t"
    )
    assert not fallback
    assert plan == {
        "steps": [
            {"id": 1, "description": "a", "depends_on": []},
            {"id": 2, "description": "b", "depends_on": [1]},
        ]
    }


def test_json_string_in_code_fence() -> None:
    """A JSON plan inside a Markdown code fence is parsed."""
    text = '```json\n{"steps": [{"description": "only"}]}\n```'
    assert parse_plan(text, "t") == ({"steps": [{"id": 1, "description": "only", "depends_on": []}]}, False)


def test_list_of_strings_and_alternative_description_keys() -> None:
    """A list mixing strings and objects with 'step'/'title' keys is numbered 1..n."""
    plan, _ = parse_plan(["x", {"step": "y"}, {"title": "z"}], "t")
    assert [(s["id"], s["description"]) for s in steps_of(plan)] == [(1, "x"), (2, "y"), (3, "z")]


def test_duplicate_or_missing_ids_are_renumbered() -> None:
    """Ids that are missing, duplicated or not positive integers make the whole plan renumbered 1..n."""
    plan, _ = parse_plan({"steps": [{"id": 5, "description": "a"}, {"id": 5, "description": "b"}]}, "t")
    assert [s["id"] for s in steps_of(plan)] == [1, 2]
    plan, _ = parse_plan({"steps": [{"id": True, "description": "a"}, {"id": 2, "description": "b"}]}, "t")
    assert [s["id"] for s in steps_of(plan)] == [1, 2]


def test_depends_on_keeps_only_other_known_ids() -> None:
    """depends_on drops self references, unknown ids, non-integers and duplicates."""
    steps = [
        {"id": 1, "description": "a"},
        {"id": 2, "description": "b", "depends_on": [2, 1, 1, 9, "1", None]},
    ]
    plan, _ = parse_plan({"steps": steps}, "t")
    assert steps_of(plan)[1]["depends_on"] == [1]


def test_items_without_description_are_skipped() -> None:
    """Items with no usable description are skipped; the rest still form the plan."""
    plan, fallback = parse_plan([{"id": 1}, 42, "  ", "real"], "t")
    assert not fallback
    assert plan == {"steps": [{"id": 1, "description": "real", "depends_on": []}]}


@pytest.mark.parametrize(
    "output", [None, "", "not json", "[]", '{"steps": "x"}', {"plan": []}, 3, [{}], '"str"']
)
def test_unusable_output_falls_back(output: Any) -> None:
    """Anything that yields no step gives the one-step plan with the task as description."""
    assert parse_plan(output, "the task") == (FALLBACK, True)


def test_long_plans_are_cut() -> None:
    """Plans longer than MAX_PLAN_STEPS keep only the first MAX_PLAN_STEPS steps."""
    plan, _ = parse_plan([f"s{i}" for i in range(MAX_PLAN_STEPS + 10)], "t")
    assert len(steps_of(plan)) == MAX_PLAN_STEPS


def test_prompts_mention_task_step_and_prior_outputs() -> None:
    """Prompts carry the task, the step, and earlier outputs (JSON for non-strings)."""
    assert "Task: T" in plan_prompt("T")
    prompt = execute_prompt("T", 2, "do b", [(1, "do a", {"k": 1})])
    assert "Task: T" in prompt
    assert "step 2: do b" in prompt
    assert 'Step 1 (do a): {"k":1}' in prompt
    assert "Step 1 (do a): out" in synthesize_prompt("T", [(1, "do a", "out")])
