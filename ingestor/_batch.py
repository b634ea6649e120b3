"""Pure batching logic: turn a batch of decoded telemetry into one change per session and per step.

Duplicates inside a batch collapse here (the database collapses duplicates across batches): the first
``session.opened`` and ``session.closed`` of a session win (duplicates are identical), and of two step
messages with the same ``(adapter_session_id, step_id)`` the lower ``seq`` wins, which is the one an
in-order delivery would have written first. Output is sorted by ``adapter_session_id`` and step, so every
transaction takes its locks in one global order.

Records that do not fit their session are set aside with the reason, never merged: a record whose
``task_id`` differs from its session's (the opened's, else the first record's), a second close with another
``seq``, a step numbered at or after its session's close. What the database already holds is checked the
same way in the transaction (``_write.BatchTransaction``).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from schemas import SessionClosed, SessionOpened, StepRecorded, TelemetryMessage

RecordKey = tuple[str, int, str]
"""``(adapter_session_id, seq, task_id)``: what identifies one telemetry record (the task_id too, so a forged
record that reuses a real one's seq is told apart from it)."""

ProblemCode = Literal["rejected", "inconsistent", "invalid", "never_opened", "missing_steps"]


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a record (or a session) cannot be stored as it is; kept in ``telemetry_problems``."""

    code: ProblemCode
    reason: str


def key_of(message: TelemetryMessage) -> RecordKey:
    return (message.adapter_session_id, message.seq, message.task_id)


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
    step_seqs: list[int] = field(default_factory=list)

    def keys(self) -> list[RecordKey]:
        """The record keys this change carries (what to set aside if the session refuses them all)."""
        keys = [(self.adapter_session_id, seq, self.task_id) for seq in self.step_seqs]
        if self.opened is not None:
            keys.append(key_of(self.opened))
        if self.closed is not None:
            keys.append(key_of(self.closed))
        return keys


@dataclass(slots=True)
class MergedBatch:
    sessions: list[SessionChange] = field(default_factory=list)
    steps: list[StepRecorded] = field(default_factory=list)
    duplicates: int = 0
    rejected: dict[RecordKey, Problem] = field(default_factory=dict)
    """Records set aside because they do not fit their session (not part of ``sessions``/``steps``)."""
    ambiguous: set[str] = field(default_factory=set)
    """Sessions whose records name different tasks, with no opened in the batch and no known owner: the
    caller looks their stored task up and merges again (see :func:`merge_batch`)."""

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


def _session_task_ids(
    messages: list[TelemetryMessage], known: Mapping[str, str], *, decide: bool
) -> tuple[dict[str, str], set[str]]:
    """The task each session belongs to: what the database holds (``known``); else what its opened records
    say; else what its records agree on. Records that disagree, with nothing known, make the session
    ambiguous, unless ``decide``: then the opened's task, else the task most records name, wins (the first
    seen on a tie)."""
    first: dict[str, str] = {}
    split: set[str] = set()
    for msg in messages:  # the usual batch: every session's records name one task, so no votes are counted
        if first.setdefault(msg.adapter_session_id, msg.task_id) != msg.task_id:
            split.add(msg.adapter_session_id)
    owners: dict[str, str] = {asid: known.get(asid, task_id) for asid, task_id in first.items()}
    if not split:
        return owners, set()
    opened: dict[str, Counter[str]] = {}
    claimed: dict[str, Counter[str]] = {}
    for msg in messages:
        if msg.adapter_session_id not in split:
            continue
        claimed.setdefault(msg.adapter_session_id, Counter())[msg.task_id] += 1
        if isinstance(msg, SessionOpened):
            opened.setdefault(msg.adapter_session_id, Counter())[msg.task_id] += 1
    ambiguous: set[str] = set()
    for asid, tasks in claimed.items():
        if asid in known:
            continue
        votes = opened.get(asid) or tasks
        if len(votes) > 1 and not decide:
            ambiguous.add(asid)
        owners[asid] = votes.most_common(1)[0][0]
    return owners, ambiguous


def merge_batch(
    messages: Iterable[TelemetryMessage], known: Mapping[str, str] | None = None, *, decide: bool = False
) -> MergedBatch:
    """Group ``messages`` by session, dropping duplicates and setting aside what does not fit its session;
    the result is sorted for lock ordering. ``known``: stored task ids of sessions the batch named
    ambiguously (``MergedBatch.ambiguous``); ``decide``: settle the remaining ambiguity by majority."""
    batch = list(messages)
    owners, ambiguous = _session_task_ids(batch, known or {}, decide=decide)
    closes: dict[str, SessionClosed] = {}
    for msg in batch:
        if isinstance(msg, SessionClosed) and msg.task_id == owners[msg.adapter_session_id]:
            closes.setdefault(msg.adapter_session_id, msg)
    sessions: dict[str, SessionChange] = {}
    steps: dict[tuple[str, int], StepRecorded] = {}
    seen: set[RecordKey] = set()
    rejected: dict[RecordKey, Problem] = {}
    duplicates = 0
    for msg in batch:
        key = key_of(msg)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        problem = _misfit(msg, owners[msg.adapter_session_id], closes.get(msg.adapter_session_id))
        if problem is not None:
            rejected[key] = problem
            continue
        change = sessions.get(msg.adapter_session_id)
        if change is None:
            change = SessionChange(msg.adapter_session_id, msg.task_id, msg.emitted_at)
            sessions[msg.adapter_session_id] = change
        elif msg.emitted_at < change.first_seen:
            change.first_seen = msg.emitted_at
        if isinstance(msg, SessionOpened):
            change.opened = msg
        elif isinstance(msg, SessionClosed):
            change.closed = msg
        else:
            duplicates += _add_step(steps, change, msg)
    return MergedBatch(
        sessions=[sessions[k] for k in sorted(sessions)],
        steps=[steps[k] for k in sorted(steps)],
        duplicates=duplicates,
        rejected=rejected,
        ambiguous=ambiguous,
    )


def _misfit(msg: TelemetryMessage, task_id: str, close: SessionClosed | None) -> Problem | None:
    if msg.task_id != task_id:
        return Problem(
            "inconsistent", f"task_id {msg.task_id!r} does not match its session's task_id {task_id!r}"
        )
    if close is None:
        return None
    if isinstance(msg, SessionClosed) and msg.seq != close.seq:
        return Problem(
            "inconsistent", f"a second close (seq {msg.seq}) for a session closed at seq {close.seq}"
        )
    if isinstance(msg, StepRecorded) and msg.seq >= close.seq:
        return Problem(
            "inconsistent", f"step seq {msg.seq} is not before its session's close (seq {close.seq})"
        )
    return None


def _add_step(steps: dict[tuple[str, int], StepRecorded], change: SessionChange, msg: StepRecorded) -> int:
    """Keep the lowest-seq step per (session, step_id); returns 1 when a message was a duplicate."""
    key = (msg.adapter_session_id, msg.step_id)
    held = steps.get(key)
    change.step_seqs.append(msg.seq)
    if held is None:
        change.steps += 1
        steps[key] = msg
        return 0
    if msg.seq < held.seq:
        steps[key] = msg
    return 1
