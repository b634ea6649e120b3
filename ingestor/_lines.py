"""Pure line building: one Atlas session record (one JSONL line) from a ``sessions`` row and its steps.

The shape is the one Atlas trainers read (see the export-format note): ``task``, ``final_answer``, ``plan``,
``steps`` (the execute-phase steps in step order), ``session_metadata`` (the stored metadata plus
``session_id``, ``status``, ``created_at``, ``completed_at`` and ``adapter_session``, whose ``phases`` holds
the plan and synthesize step records), ``execution_mode``, and the adapter fields at the top level.
Serialised with orjson, keys sorted, so the same rows always give the same bytes (the rolling files,
recovery and ``export`` all call this one function).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final

import orjson

from schemas import clean_json

_EXECUTE: Final = "execute"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def step_record(step: Mapping[str, Any]) -> dict[str, Any]:
    """One step record: Atlas's core keys plus the adapter fields at the top level."""
    metadata: dict[str, Any] = dict(step["metadata"] or {})
    usage = step["adapter_usage"]
    return {
        "step_id": step["step_id"],
        "description": metadata.get("description", ""),
        "trace": step["trace"] if step["trace"] is not None else "",
        "output": step["output"] if step["output"] is not None else "",
        "attempts": step["attempts"] if step["attempts"] is not None else 1,
        "metadata": metadata,
        "adapter_session_id": step["adapter_session_id"],
        "adapter_usage": usage,
        "usage": usage,
        "adapter_events": step["adapter_events"] if step["adapter_events"] is not None else [],
    }


def session_record(session: Mapping[str, Any], steps: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The record as a dict (``build_line`` serialises it)."""
    executes: list[dict[str, Any]] = []
    phases: dict[str, list[dict[str, Any]]] = {}
    for step in sorted(steps, key=lambda s: int(s["step_id"])):
        record = step_record(step)
        phase = record["metadata"].get("phase", _EXECUTE)
        if phase == _EXECUTE:
            executes.append(record)
        else:
            phases.setdefault(str(phase), []).append(record)
    # Only the top level and adapter_session are changed here, so copies of those two dicts do (the row's
    # values are not mutated; a deep copy per line cost a noticeable share of the ingestor's CPU).
    stored: dict[str, Any] = dict(session["metadata"] or {})
    adapter_session = stored.get("adapter_session")
    if isinstance(adapter_session, dict):
        adapter_session = dict(adapter_session)
    else:
        adapter_session = {"adapter_session_id": session["adapter_session_id"]}
    adapter_session["phases"] = phases
    session_metadata = {
        **stored,
        "session_id": session["id"],
        "status": session["status"],
        "created_at": _iso(session["created_at"]),
        "completed_at": _iso(session["completed_at"]),
        "adapter_session": adapter_session,
    }
    line: dict[str, Any] = {
        "task": session["task"],
        "final_answer": session["final_answer"] or "",
        "plan": session["plan"] if session["plan"] is not None else {},
        "steps": executes,
        "session_metadata": session_metadata,
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
