"""Pure row building: what a session's ``sessions`` row and a step's ``step_results`` row hold.

A session row is a function of the set of messages seen, never of their order: :func:`apply_opened` only
fills what an opened says (and never touches a status a close set), :func:`apply_closed` only fills what a
close says, and each is a no-op the second time (``attempt`` / ``steps_expected`` record that it ran).
The abandonment rule (``_sql.ABANDON``) only touches rows without a close, and a later close overwrites
everything it set, so the final row is what one in-order delivery gives.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypedDict

import orjson

from ingestor._batch import Problem, SessionChange
from schemas import SessionClosed, SessionOpened, StepRecorded, TelemetryMessage, Usage

Json = Any
"""A decoded JSON value (what asyncpg's jsonb codec hands back)."""

RUNNING = "running"
EXPORTABLE_STATUSES = ("succeeded", "failed")


@dataclass(frozen=True, slots=True)
class SessionRow:
    """The columns of ``sessions`` the ingestor owns (``id`` and ``export_file`` are the database's)."""

    adapter_session_id: str
    task_id: str
    task: str
    status: str
    metadata: dict[str, Json]
    final_answer: str | None
    created_at: datetime
    completed_at: datetime | None
    adapter_usage: dict[str, Json] | None
    adapter_events: list[Json] | None
    attempt: int | None
    steps_expected: int | None


def stub_row(adapter_session_id: str, task_id: str, first_seen: datetime) -> SessionRow:
    """The row a step or close creates before its opened arrived: task '' and running until then."""
    return SessionRow(
        adapter_session_id=adapter_session_id,
        task_id=task_id,
        task="",
        status=RUNNING,
        metadata={"task_id": task_id, "adapter_session": {"adapter_session_id": adapter_session_id}},
        final_answer=None,
        created_at=first_seen,
        completed_at=None,
        adapter_usage=None,
        adapter_events=None,
        attempt=None,
        steps_expected=None,
    )


def _with_metadata(
    row: SessionRow, top: dict[str, Json], adapter_session: dict[str, Json]
) -> dict[str, Json]:
    # Copies of the two dicts this changes, not a deep copy: the values themselves are never mutated, and a
    # deep copy of every session's metadata was a quarter of the ingestor's CPU.
    metadata = dict(row.metadata)
    metadata.update(top)
    nested = metadata.get("adapter_session")
    nested = dict(nested) if isinstance(nested, dict) else {"adapter_session_id": row.adapter_session_id}
    nested.update(adapter_session)
    metadata["adapter_session"] = nested
    return metadata


def apply_opened(row: SessionRow, opened: SessionOpened) -> SessionRow:
    """Fill in what the opened says; a status set by a close is kept."""
    if row.attempt is not None:
        return row
    metadata = _with_metadata(
        row,
        {
            "task_id": opened.task_id,
            "execution_mode": opened.execution_mode,
            "adapter": opened.adapter,
            "attempt": opened.attempt,
            "task_metadata": opened.task_metadata,
        },
        {"adapter": opened.adapter, "metadata": opened.metadata},
    )
    if opened.limits:
        metadata["limits"] = {**metadata.get("limits", {}), **opened.limits}
    return replace(
        row, task=opened.task, created_at=opened.opened_at, attempt=opened.attempt, metadata=metadata
    )


def apply_closed(row: SessionRow, closed: SessionClosed) -> SessionRow:
    """Fill in what the close says; it overrides running and a rule-set abandoned alike."""
    if row.steps_expected is not None:
        return row
    usage = usage_json(closed.totals)
    # The events list is shared with the close, never copied: nothing mutates a row's values (they are
    # only encoded), and copying every event was a visible share of the ingestor's CPU.
    events: list[Json] = closed.events
    metadata = _with_metadata(
        row,
        {"reason": closed.reason, "close_metadata": closed.close_metadata},
        {"usage": usage, "events": events, "close_metadata": closed.close_metadata},
    )
    if closed.limits:
        metadata["limits"] = {**metadata.get("limits", {}), **closed.limits}
    return replace(
        row,
        status=closed.status,
        final_answer=closed.final_answer,
        completed_at=closed.closed_at,
        adapter_usage=usage,
        adapter_events=events,
        steps_expected=closed.steps,
        metadata=metadata,
    )


def fresh_row(change: SessionChange) -> SessionRow:
    """``apply_change(None, change)`` built in one step: the row of a session the database does not hold
    yet (it runs for every session of every batch, where the general path builds it three times)."""
    opened, closed = change.opened, change.closed
    asid = change.adapter_session_id
    nested: dict[str, Json] = {"adapter_session_id": asid}
    metadata: dict[str, Json] = {"task_id": change.task_id, "adapter_session": nested}
    task, created_at, attempt = "", change.first_seen, None
    status, final_answer, completed_at = RUNNING, None, None
    usage: dict[str, Json] | None = None
    events: list[Json] | None = None
    steps_expected = None
    limits: dict[str, Json] = {}
    if opened is not None:
        metadata["task_id"] = opened.task_id
        metadata["execution_mode"] = opened.execution_mode
        metadata["adapter"] = opened.adapter
        metadata["attempt"] = opened.attempt
        metadata["task_metadata"] = opened.task_metadata
        nested["adapter"] = opened.adapter
        nested["metadata"] = opened.metadata
        limits.update(opened.limits)
        task, created_at, attempt = opened.task, opened.opened_at, opened.attempt
    if closed is not None:
        usage, events = usage_json(closed.totals), closed.events
        metadata["reason"] = closed.reason
        metadata["close_metadata"] = closed.close_metadata
        nested["usage"] = usage
        nested["events"] = events
        nested["close_metadata"] = closed.close_metadata
        limits.update(closed.limits)
        status, final_answer, completed_at = closed.status, closed.final_answer, closed.closed_at
        steps_expected = closed.steps
    if limits:
        metadata["limits"] = limits
    return SessionRow(
        adapter_session_id=asid,
        task_id=change.task_id,
        task=task,
        status=status,
        metadata=metadata,
        final_answer=final_answer,
        created_at=created_at,
        completed_at=completed_at,
        adapter_usage=usage,
        adapter_events=events,
        attempt=attempt,
        steps_expected=steps_expected,
    )


def completes_alone(change: SessionChange) -> bool:
    """Whether the batch holds all of a session: its opened, an exportable close and every step it
    announced. A session the database did not hold before is then complete when the batch commits (the
    rule of ``_sql.ASSIGN``: opened seen, succeeded|failed, ``count(steps) == steps_expected``)."""
    closed = change.closed
    return (
        change.opened is not None
        and closed is not None
        and closed.status in EXPORTABLE_STATUSES
        and change.steps == closed.steps
    )


def apply_change(row: SessionRow | None, change: SessionChange) -> SessionRow:
    """``row`` (None: not in the database yet) after the batch's opened and close for it."""
    if row is None:
        row = stub_row(change.adapter_session_id, change.task_id, change.first_seen)
    if change.opened is not None:
        row = apply_opened(row, change.opened)
    if change.closed is not None:
        row = apply_closed(row, change.closed)
    return row


def needs_update(row: SessionRow, change: SessionChange) -> bool:
    """Whether an existing row (with these has-opened / has-closed flags) changes with ``change``."""
    return (change.opened is not None and row.attempt is None) or (
        change.closed is not None and row.steps_expected is None
    )


class StepRow(TypedDict):
    """A ``step_results`` row as the JSONL line builder reads it (a plain dict: one per step, built fast)."""

    step_id: int
    trace: str
    output: str | None
    attempts: int
    metadata: dict[str, Json]
    adapter_session_id: str
    adapter_usage: dict[str, Json]
    adapter_events: list[Json]


def usage_json(usage: Usage) -> dict[str, Json]:
    """The JSON object of a Usage (what ``model_dump`` gives, at a fraction of its cost)."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "calls": usage.calls,
    }


def output_text(output: Json) -> str | None:
    """``step_results.output`` is text: strings as they are, None as NULL, anything else JSON-encoded."""
    if output is None or isinstance(output, str):
        return output
    return orjson.dumps(output).decode()


def step_row(step: StepRecorded) -> StepRow:
    started, finished = step.started_at, step.finished_at
    metadata: dict[str, Json] = {
        "phase": step.phase,
        "description": step.description,
        "seq": step.seq,
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat(),
        "duration_ms": round((finished - started).total_seconds() * 1000),
        "status": step.status,
        "error": step.error,
    }
    if step.limits:
        metadata["limits"] = step.limits
    output = step.output
    return {
        "step_id": step.step_id,
        "trace": step.trace,
        "output": output if output is None or isinstance(output, str) else output_text(output),
        "attempts": step.attempts,
        "metadata": metadata,
        "adapter_session_id": step.adapter_session_id,
        "adapter_usage": usage_json(step.usage),
        "adapter_events": step.events,
    }


_TEXT_FIELDS = {
    "session.opened": ("task",),
    "step": ("description", "trace", "error"),
    "session.closed": ("reason", "final_answer"),
}
_JSON_FIELDS = {
    "session.opened": ("metadata", "task_metadata", "limits"),
    "step": ("output", "events", "usage", "limits"),
    "session.closed": ("plan", "events", "close_metadata", "totals", "limits"),
}


def unstorable(message: TelemetryMessage) -> Problem | None:
    """Why PostgreSQL (or the JSONL encoder) cannot hold this record as it is, or None.

    Only asked once a batch failed on its data, to name the culprits instead of bisecting blindly: a NUL
    character (``text`` and ``jsonb`` refuse it) or a JSON value the encoder refuses (an integer past
    64 bits, nesting past its limit). The worker never sends such a record (``schemas.storable``)."""
    for name in _TEXT_FIELDS[message.kind]:
        value = getattr(message, name)
        if isinstance(value, str) and "\x00" in value:
            return Problem("rejected", f"{name} holds a NUL character, which PostgreSQL text cannot hold")
    for name in _JSON_FIELDS[message.kind]:
        value = getattr(message, name)
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        try:
            encoded = orjson.dumps(value)
        except TypeError as err:
            return Problem("rejected", f"{name} cannot be stored as JSON: {err}")
        if b"\\u0000" in encoded:
            return Problem("rejected", f"{name} holds a NUL character, which jsonb cannot hold")
    return None
