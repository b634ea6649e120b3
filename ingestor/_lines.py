"""Pure line building: one Atlas session record (one JSONL line) from a ``sessions`` row and its steps.

The shape is the one Atlas trainers read (see the export-format note, and ``docs/jsonl-format.md`` for every
field): ``task``, ``final_answer``, ``plan``, ``steps`` (every ``step_results`` row of the session in step
order: the plan call, one execute per plan step, the synthesis; ``phase`` tells them apart),
``session_metadata`` (the stored metadata plus ``session_id``, ``status``, ``created_at``, ``completed_at``,
``adapter_session``, ``attempt`` and ``final_attempt``), ``execution_mode``, ``attempt`` / ``final_attempt``
again, and the adapter fields at the top level. Serialised with orjson, keys sorted, so the same rows
always give the same bytes (the rolling files, recovery, ``export`` and the ingestor's in-memory path all
call this one function).

A line reads only what a row holds in Postgres and in the ingestor's memory alike (``_write.line_session``,
``_rows.step_row``): nothing here may need a column those two do not carry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final

import orjson

from schemas import clean_json, cut_chars
from schemas.limits import MAX_CONTEXT_RESULT_CHARS, MAX_CONTEXT_RESULTS

_SUCCEEDED: Final = "succeeded"
_TOOL_CALL: Final = "tool_call"
# Event keys naming the tool and its arguments: the demo adapter writes ``tool``, OpenAI-style adapters
# ``name``; both write ``arguments`` (Atlas plans call them ``tool_params``).
_TOOL_NAME_KEYS: Final = ("tool", "name")
_TOOL_PARAM_KEYS: Final = ("arguments", "tool_params")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _plan_steps(plan: Any) -> dict[int, Mapping[str, Any]]:
    """The plan's steps by id (the first of a repeated id; anything that is not a step is skipped)."""
    steps = plan.get("steps") if isinstance(plan, dict) else None
    by_id: dict[int, Mapping[str, Any]] = {}
    if isinstance(steps, list):
        for item in steps:
            if isinstance(item, dict):
                step_id = item.get("id")
                if isinstance(step_id, int) and not isinstance(step_id, bool):
                    by_id.setdefault(step_id, item)
    return by_id


def _first(source: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        value = source.get(key)
        if value is not None:
            return value
    return None


def _tool(events: Any, plan_step: Mapping[str, Any] | None) -> tuple[str | None, dict[str, Any] | None]:
    """``(tool, tool_params)``: the step's first ``tool_call`` event, else what its plan step names (where
    Atlas's own plans keep them); the parameters only when they are a JSON object (anything else, e.g. an
    argument string a model wrote that is not JSON, stays in the step's ``adapter_events``)."""
    source: Mapping[str, Any] | None = None
    if isinstance(events, list):
        for event in events:  # a plain loop and a dict test: a generator and an ABC test cost ~15 % of a line
            if isinstance(event, dict) and event.get("type") == _TOOL_CALL:
                source = event
                break
    if source is None and plan_step is not None and plan_step.get("tool") is not None:
        source = plan_step
    if source is None:
        return None, None
    name = _first(source, _TOOL_NAME_KEYS)
    params = _first(source, _TOOL_PARAM_KEYS)
    return (name if isinstance(name, str) else None), (params if isinstance(params, dict) else None)


def _context(prior: list[dict[str, Any]]) -> dict[str, Any]:
    """The prior steps' results as the Atlas SDK hands them to a step (``output_text``, ``status``), newest
    ``MAX_CONTEXT_RESULTS`` only and each output cut to ``MAX_CONTEXT_RESULT_CHARS``: every step's whole
    output is in its own record, and an uncapped context would make a line quadratic in its steps.
    ``prior`` holds the entries already made (:func:`_prior_entry`, once per step): rebuilding them for every
    later step was nearly half of a step record's cost.

    A list, not the SDK's mapping keyed by step id: keys that differ from session to session break the
    schema a JSON loader infers (Hugging Face ``datasets`` refuses a later file whose keys differ)."""
    kept = prior[-MAX_CONTEXT_RESULTS:] if MAX_CONTEXT_RESULTS > 0 else []
    return {"prior_results": kept, "omitted_results": len(prior) - len(kept)}


def _prior_entry(record: Mapping[str, Any]) -> dict[str, Any]:
    """A step record as the later steps' ``context`` lists it (one dict, shared by those lists)."""
    return {
        "step_id": record["step_id"],
        "phase": record["phase"],
        "status": str(record["metadata"].get("status") or ""),
        "output_text": cut_chars(record["output"], MAX_CONTEXT_RESULT_CHARS),
    }


def step_record(
    step: Mapping[str, Any],
    plan_step: Mapping[str, Any] | None = None,
    prior: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One step record: Atlas's core keys, ``phase``, and the adapter fields at the top level and in
    ``metadata`` (where the Atlas SDK puts them). ``prior``: the earlier steps' ``context`` entries."""
    metadata: dict[str, Any] = dict(step["metadata"] or {})
    # Text is never null in a line (as output and trace): a JSON loader that infers a column's type from
    # its first file makes it null-typed when that file holds no failure, and then refuses every error.
    metadata["error"] = metadata.get("error") or ""
    usage = step["adapter_usage"]
    events = step["adapter_events"] if step["adapter_events"] is not None else []
    metadata["adapter_session_id"] = step["adapter_session_id"]
    metadata["adapter_usage"] = usage
    metadata["adapter_events"] = events
    tool, tool_params = _tool(events, plan_step)
    depends_on = plan_step.get("depends_on") if plan_step is not None else None
    return {
        "step_id": step["step_id"],
        "phase": str(metadata.get("phase", "execute")),
        "description": metadata.get("description", ""),
        "trace": step["trace"] if step["trace"] is not None else "",
        "output": step["output"] if step["output"] is not None else "",
        "attempts": step["attempts"] if step["attempts"] is not None else 1,
        "depends_on": depends_on if isinstance(depends_on, list) else None,
        "tool": tool,
        "tool_params": tool_params,
        "context": _context(prior if prior is not None else []),
        # No judge runs in the pipeline: present and null, for a reward model or a judge to fill.
        "validation": None,
        "guidance": None,
        "reward": None,
        "metadata": metadata,
        "adapter_session_id": step["adapter_session_id"],
        "adapter_usage": usage,
        "usage": usage,
        "adapter_events": events,
    }


def _final_attempt(status: Any, stored: Mapping[str, Any]) -> bool | None:
    """Whether this session is its task's last run: what the worker's retry decision put in the close's
    metadata; a succeeded session always is (a task that succeeded is never run again); None when a failed
    session's close does not say (a close from a worker older than the flag)."""
    close_metadata = stored.get("close_metadata")
    flag = close_metadata.get("final_attempt") if isinstance(close_metadata, dict) else None
    if isinstance(flag, bool):
        return flag
    return True if status == _SUCCEEDED else None


def session_record(session: Mapping[str, Any], steps: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The record as a dict (``build_line`` serialises it)."""
    plan = session["plan"] if session["plan"] is not None else {}
    plan_steps = _plan_steps(plan)
    records: list[dict[str, Any]] = []
    prior: list[dict[str, Any]] = []
    for step in sorted(steps, key=lambda s: int(s["step_id"])):
        record = step_record(step, plan_steps.get(int(step["step_id"])), prior)
        records.append(record)
        prior.append(_prior_entry(record))
    # Only the top level is changed here, so a copy of that dict does (the row's values are not mutated;
    # a deep copy per line cost a noticeable share of the ingestor's CPU).
    stored: dict[str, Any] = dict(session["metadata"] or {})
    adapter_session = stored.get("adapter_session")
    if not isinstance(adapter_session, dict):
        adapter_session = {"adapter_session_id": session["adapter_session_id"]}
    attempt = stored.get("attempt")
    attempt = attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None
    final_attempt = _final_attempt(session["status"], stored)
    session_metadata = {
        **stored,
        "reason": stored.get("reason") or "",  # text, never null (see ``step_record``)
        "session_id": session["id"],
        "status": session["status"],
        "created_at": _iso(session["created_at"]),
        "completed_at": _iso(session["completed_at"]),
        "adapter_session": adapter_session,
        # Also at the top level; here too because the Atlas trainers' loader keeps only the Atlas session
        # fields of a line (``task`` .. ``session_metadata``) and drops every other top-level key.
        "attempt": attempt,
        "final_attempt": final_attempt,
    }
    line: dict[str, Any] = {
        "task": session["task"],
        "final_answer": session["final_answer"] or "",
        "plan": plan,
        "steps": records,
        "session_metadata": session_metadata,
        "attempt": attempt,
        "final_attempt": final_attempt,
        "adapter_session_id": session["adapter_session_id"],
        "adapter_usage": session["adapter_usage"],
        "adapter_events": session["adapter_events"] if session["adapter_events"] is not None else [],
    }
    execution_mode = stored.get("execution_mode")
    if execution_mode is not None:
        line["execution_mode"] = execution_mode
    return line


_OPTIONS: Final = orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE


def build_line(session: Mapping[str, Any], steps: Sequence[Mapping[str, Any]]) -> bytes:
    """One ``\\n``-terminated JSONL line. Never fails on data: a stored value the encoder refuses (nested
    past its limit, an integer past 64 bits: rows written before the worker applied the storable rule, or
    by hand) is written by that same rule (``schemas.storable``), so one session can never stop a file,
    a recovery or an export."""
    record = session_record(session, steps)
    try:
        return orjson.dumps(record, option=_OPTIONS)
    except TypeError:
        note: dict[str, Any] = {}
        cleaned = clean_json(record, 0, note)
        cleaned["session_metadata"] = {**cleaned.get("session_metadata", {}), "line_limits": note}
        return orjson.dumps(cleaned, option=_OPTIONS)
