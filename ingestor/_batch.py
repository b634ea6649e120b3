"""Pure batching logic: turn a batch of decoded telemetry into one change per session and per step.

Duplicates inside a batch collapse here (the database collapses duplicates across batches): the first
``session.opened`` and ``session.closed`` of a session win (duplicates are identical), and of two step
messages with the same ``(adapter_session_id, step_id)`` the lower ``seq`` wins, which is the one an
in-order delivery would have written first. Output is sorted by ``adapter_session_id`` and step, so every
transaction takes its locks in one global order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from schemas import SessionClosed, SessionOpened, StepRecorded, TelemetryMessage


@dataclass(slots=True)
class SessionChange:
    """Everything one batch says about one adapter session."""

    adapter_session_id: str
    task_id: str
    first_seen: datetime
    """The earliest ``emitted_at`` in the batch: a stub row's created_at until the opened arrives."""
    opened: SessionOpened | None = None
    closed: SessionClosed | None = None
    steps: int = 0


@dataclass(slots=True)
class MergedBatch:
    sessions: list[SessionChange] = field(default_factory=list)
    steps: list[StepRecorded] = field(default_factory=list)
    duplicates: int = 0

    @property
    def task_ids(self) -> list[str]:
        return sorted({s.task_id for s in self.sessions})

    @property
    def task_lock_keys(self) -> list[int]:
        """Sorted, distinct advisory-lock keys of the batch's tasks (see :func:`task_lock_key`)."""
        return sorted({task_lock_key(t) for t in self.task_ids})


def task_lock_key(task_id: str) -> int:
    """A stable signed 32-bit key for ``pg_advisory_xact_lock(namespace, key)`` (same in every process)."""
    digest = hashlib.blake2b(task_id.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


def _add_step(steps: dict[tuple[str, int], StepRecorded], change: SessionChange, msg: StepRecorded) -> int:
    """Keep the lowest-seq step per (session, step_id); returns 1 when a message was a duplicate."""
    key = (msg.adapter_session_id, msg.step_id)
    held = steps.get(key)
    if held is None:
        change.steps += 1
        steps[key] = msg
        return 0
    if msg.seq < held.seq:
        steps[key] = msg
    return 1


def merge_batch(messages: Iterable[TelemetryMessage]) -> MergedBatch:
    """Group ``messages`` by session, dropping duplicates; the result is sorted for lock ordering."""
    sessions: dict[str, SessionChange] = {}
    steps: dict[tuple[str, int], StepRecorded] = {}
    seen: set[tuple[str, int]] = set()
    duplicates = 0
    for msg in messages:
        key = (msg.adapter_session_id, msg.seq)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        change = sessions.get(msg.adapter_session_id)
        if change is None:
            change = SessionChange(msg.adapter_session_id, msg.task_id, msg.emitted_at)
            sessions[msg.adapter_session_id] = change
        elif msg.emitted_at < change.first_seen:
            change.first_seen = msg.emitted_at
        if isinstance(msg, SessionOpened):
            change.opened = msg
        elif isinstance(msg, SessionClosed):
            duplicates += change.closed is not None
            change.closed = change.closed or msg
        else:
            duplicates += _add_step(steps, change, msg)
    return MergedBatch(
        sessions=[sessions[k] for k in sorted(sessions)],
        steps=[steps[k] for k in sorted(steps)],
        duplicates=duplicates,
    )
