"""Plan parsing and the prompts a :class:`worker.sessions.Student` sends in each phase."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final

import orjson
from pydantic import JsonValue

from worker.sessions._json import to_text

MAX_PLAN_STEPS: Final = 32
"""Plans longer than this are cut to this many steps (a runaway plan must not run forever)."""
_FENCE: Final = re.compile(r"^\s*```[A-Za-z0-9_-]*\s*\n(?P<body>.*?)\n?\s*```\s*$", re.DOTALL)
_DESCRIPTION_KEYS: Final = ("description", "step", "task", "title", "text")

PlanStep = dict[str, JsonValue]


def fallback_plan(task: str) -> dict[str, JsonValue]:
    """The plan used when the adapter's plan cannot be parsed: one step whose description is the task."""
    return {"steps": [{"id": 1, "description": task, "depends_on": []}]}


def _load(output: Any) -> Any:
    if not isinstance(output, str):
        return output
    text = output.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group("body").strip()
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def _description(item: Any) -> str | None:
    if isinstance(item, str):
        return item.strip() or None
    if isinstance(item, dict):
        for key in _DESCRIPTION_KEYS:
            value = item.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
    return None


def _valid_id(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def parse_plan(output: Any, task: str) -> tuple[dict[str, JsonValue], bool]:
    """``(plan, used_fallback)`` from a plan step's output.

    Accepts a dict with a ``steps`` list, or a list, or either as a JSON string (optionally in a
    Markdown code fence). Items are strings or objects with a ``description`` (or ``step``/``task``/
    ``title``/``text``); items without one are skipped. Ids are kept when every step has a unique
    positive integer id, else the steps are numbered 1..n. ``depends_on`` keeps only ids of other steps
    of the plan. Anything else (or no usable step) gives :func:`fallback_plan`.
    """
    data = _load(output)
    if isinstance(data, dict):
        data = data.get("steps")
    if not isinstance(data, list):
        return fallback_plan(task), True
    items = [(item, desc) for item in data if (desc := _description(item)) is not None][:MAX_PLAN_STEPS]
    if not items:
        return fallback_plan(task), True
    ids = [_valid_id(item.get("id")) if isinstance(item, dict) else None for item, _ in items]
    if None in ids or len(set(ids)) != len(ids):
        ids = list(range(1, len(items) + 1))
    known = set(ids)
    steps: list[JsonValue] = []
    for (item, desc), step_id in zip(items, ids, strict=True):
        raw_deps = item.get("depends_on") if isinstance(item, dict) else None
        deps = (
            [d for d in raw_deps if _valid_id(d) in known and d != step_id]
            if isinstance(raw_deps, list)
            else []
        )
        steps.append({"id": step_id, "description": desc, "depends_on": list(dict.fromkeys(deps))})
    return {"steps": steps}, False


def plan_prompt(task: str) -> str:
    return (
        f"Task: {task}\n\n"
        "Plan the steps needed to complete the task. Reply with JSON only: "
        '{"steps": [{"id": 1, "description": "...", "depends_on": []}]}'
    )


def _prior(outputs: Sequence[tuple[int, str, Any]]) -> str:
    if not outputs:
        return "(none yet)"
    return "\n".join(f"Step {step_id} ({desc}): {to_text(out)}" for step_id, desc, out in outputs)


def execute_prompt(task: str, step_id: int, description: str, outputs: Sequence[tuple[int, str, Any]]) -> str:
    return (
        f"Task: {task}\n\nOutputs of earlier steps:\n{_prior(outputs)}\n\n"
        f"Now do step {step_id}: {description}"
    )


def synthesize_prompt(task: str, outputs: Sequence[tuple[int, str, Any]]) -> str:
    return (
        f"Task: {task}\n\nOutputs of the steps:\n{_prior(outputs)}\n\n"
        "Write the final answer to the task from these outputs."
    )
