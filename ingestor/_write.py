"""One batch's transaction, statement by statement (the caller holds the transaction).

1. Task advisory locks, sorted, so two ingestors never interleave one task's sessions (and JIT off).
2. Sessions upsert: a new session gets its whole row, and, when the batch holds all of it (opened, close,
   every step), its JSONL assignment too; an existing one is only locked.
3. The existing ones read back: owner, close and assignment state, and the whole row where the batch
   brings an opened or a close not applied yet. Records that do not fit their stored session (another
   task's, a second close, a step after the close) raise RecordsRejected: nothing is written.
4. Steps copied in, leaving out the ones stored already (a redelivery).
5. The merged rows written back; a close that completes its session assigns it in the same statement.
6. Plans; the abandonment rule for the tasks with a new opened; the assignment of sessions completed by
   steps that came after their close (rare: a reordered delivery).
7. The file's row created or counted; FileSuperseded when a recoverer finalized the file meanwhile.

A session row is written once per batch that changes it, and a complete session's JSONL line is built from
what the batch holds in memory (see :class:`Written`); Postgres stays the source of truth that recovery
and ``export`` read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any, Final

import asyncpg
import orjson
import structlog

from ingestor import _sql
from ingestor._batch import MergedBatch, Problem, RecordKey, SessionChange, key_of
from ingestor._errors import FileSuperseded, RecordsRejected
from ingestor._rows import (
    SessionRow,
    StepRow,
    apply_change,
    completes_alone,
    fresh_row,
    step_row,
)
from ingestor._turns import in_turns

_log = structlog.get_logger("ingestor.store")

_ROWS_PER_TURN: Final = 256
"""Rows built per turn of the event loop (~1 ms of work)."""

Record = Any  # asyncpg.Record (asyncpg ships no type information)


@dataclass(frozen=True, slots=True)
class FileTarget:
    """The open file a batch assigns its completed sessions to."""

    name: str
    owner_token: str


@dataclass(slots=True)
class Written:
    """What one committed batch transaction did."""

    assigned: list[int] = field(default_factory=list)
    """Sessions assigned to the target file, by id."""
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Assigned sessions whose whole row (and plan) this transaction wrote, or read back as it assigned them:
    their line's session part, as ``build_line`` reads it. The others' lines are read from Postgres."""
    steps_expected: dict[int, int] = field(default_factory=dict)
    """The step count of each session in ``rows``."""
    steps: dict[int, list[StepRow]] = field(default_factory=dict)
    """The step rows this transaction inserted, by session id (duplicates it skipped are not here)."""


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()


def _dumps_or_none(value: object) -> str | None:
    return None if value is None else _dumps(value)


def _session_columns(rows: Sequence[SessionRow]) -> list[list[Any]]:
    return [
        [r.adapter_session_id for r in rows],
        [r.task_id for r in rows],
        [r.task for r in rows],
        [r.status for r in rows],
        [_dumps(r.metadata) for r in rows],
        [r.final_answer for r in rows],
        [r.created_at for r in rows],
        [r.completed_at for r in rows],
        [_dumps_or_none(r.adapter_usage) for r in rows],
        [_dumps_or_none(r.adapter_events) for r in rows],
        [r.attempt for r in rows],
        [r.steps_expected for r in rows],
    ]


def row_from_record(rec: Record) -> SessionRow:
    return SessionRow(
        adapter_session_id=rec["adapter_session_id"],
        task_id=rec["task_id"],
        task=rec["task"],
        status=rec["status"],
        metadata=rec["metadata"] or {},
        final_answer=rec["final_answer"],
        created_at=rec["created_at"],
        completed_at=rec["completed_at"],
        adapter_usage=rec["adapter_usage"],
        adapter_events=rec["adapter_events"],
        attempt=rec["attempt"],
        steps_expected=rec["steps_expected"],
    )


def line_session(session_id: int, row: SessionRow, plan: object) -> dict[str, Any]:
    """A line's session part from a row in memory, the way Postgres gives it back (timestamps in UTC)."""
    completed = row.completed_at
    return {
        "id": session_id,
        "adapter_session_id": row.adapter_session_id,
        "task": row.task,
        "status": row.status,
        "metadata": row.metadata,
        "final_answer": row.final_answer,
        "created_at": row.created_at.astimezone(UTC),
        "completed_at": completed.astimezone(UTC) if completed is not None else None,
        "adapter_usage": row.adapter_usage,
        "adapter_events": row.adapter_events,
        "plan": plan,
    }


def misfits(existing: Sequence[Record], changes: dict[str, SessionChange]) -> dict[RecordKey, Problem]:
    """Records of the batch that do not fit what the database already holds for their session: another
    task's session, a second close, a step after the close."""
    problems: dict[RecordKey, Problem] = {}
    for rec in existing:
        change = changes[rec["adapter_session_id"]]
        if rec["task_id"] != change.task_id:
            reason = f"task_id {change.task_id!r} does not match its session's task_id {rec['task_id']!r}"
            problems.update(dict.fromkeys(change.keys(), Problem("inconsistent", reason)))
            continue
        if rec["steps_expected"] is None:
            continue  # not closed before this batch (a close in the batch was checked by merge_batch)
        closed_at_seq = rec["steps_expected"] + 1
        if change.closed is not None and change.closed.seq != closed_at_seq:
            reason = f"a second close (seq {change.closed.seq}) for a session closed at seq {closed_at_seq}"
            problems[key_of(change.closed)] = Problem("inconsistent", reason)
        for seq in change.step_seqs:
            if seq >= closed_at_seq:
                reason = f"step seq {seq} is not before its session's close (seq {closed_at_seq})"
                problems[(change.adapter_session_id, seq, change.task_id)] = Problem("inconsistent", reason)
    return problems


async def write_batch(
    conn: asyncpg.Connection, batch: MergedBatch, target: FileTarget, ingestor_id: str
) -> Written:
    """The batch transaction's body (see the module's docstring for the order of its statements)."""
    return await (await BatchTransaction.prepare(batch)).run(conn, target, ingestor_id)


class BatchTransaction:
    """One batch transaction, its statements in order in :meth:`run`.

    The rows that need nothing from the database (every new session's whole row and its JSON columns,
    every step's row) are built when it is made (:meth:`prepare`, in turns of the event loop: see
    ``_turns``), before its connection takes the task locks: a batch with a task in common (the next batch
    in flight, nearly always, and another ingestor's) waits on those locks for as long as this one holds
    them, so only the statements and what depends on their answers run while it does. Measured on 100,000
    records, each batch waited 146 ms on average for the one before to commit, and building these rows was
    about a seventh of the ingestor's CPU."""

    def __init__(self, batch: MergedBatch, fresh: list[SessionRow], step_rows: list[StepRow]) -> None:
        self._batch = batch
        self._changes = {c.adapter_session_id: c for c in batch.sessions}
        self._fresh = fresh
        self._fresh_columns = _session_columns(fresh)
        self._step_rows = step_rows
        self._ids: dict[str, int] = {}
        self._inserted: set[str] = set()
        self._existing: list[Record] = []
        self._stored_steps: dict[str, set[int]] = {}
        self._stepped: set[int] = set()
        self.written = Written()

    @classmethod
    async def prepare(cls, batch: MergedBatch) -> BatchTransaction:
        """The transaction of ``batch`` with its rows built."""
        fresh = await in_turns(batch.sessions, fresh_row, _ROWS_PER_TURN)
        return cls(batch, fresh, await in_turns(batch.steps, step_row, _ROWS_PER_TURN))

    async def run(self, conn: asyncpg.Connection, target: FileTarget, ingestor_id: str) -> Written:
        """The statements, on ``conn`` inside its transaction; once (a retry makes a new one)."""
        self._conn = conn
        self._target = target
        await self._conn.execute(_sql.BEGIN_BATCH, self._batch.task_lock_keys)
        await self._upsert_sessions()
        await self._read_existing()
        await self._insert_steps()
        await self._write_back()
        await self._insert_plans()
        await self._abandon()
        await self._assign_late()
        await count_assigned(self._conn, len(self.written.assigned), self._target, ingestor_id)
        return self.written

    async def _upsert_sessions(self) -> None:
        """New sessions inserted whole (assigned when the batch holds all of them); the others locked."""
        sessions, fresh = self._batch.sessions, self._fresh
        files = [self._target.name if completes_alone(c) else None for c in sessions]
        for rec in await self._conn.fetch(_sql.UPSERT_SESSIONS, *self._fresh_columns, files):
            self._ids[rec["adapter_session_id"]] = rec["id"]
            if rec["inserted"]:
                self._inserted.add(rec["adapter_session_id"])
                if rec["assigned"]:
                    self.written.assigned.append(rec["id"])
        for change, row, file in zip(sessions, fresh, files, strict=True):
            if file is not None and change.closed is not None and change.adapter_session_id in self._inserted:
                self._remember(self._ids[change.adapter_session_id], row, change.closed.plan)

    async def _read_existing(self) -> None:
        """The sessions that existed before the batch; RecordsRejected for records that do not fit them."""
        names = [c for c in self._batch.sessions if c.adapter_session_id not in self._inserted]
        if not names:
            return
        self._existing = await self._conn.fetch(
            _sql.EXISTING_SESSIONS,
            [c.adapter_session_id for c in names],
            [c.opened is not None for c in names],
            [c.closed is not None for c in names],
            [c.steps > 0 for c in names],
        )
        problems = misfits(self._existing, self._changes)
        if problems:
            raise RecordsRejected(problems)
        for rec in self._existing:
            self._ids[rec["adapter_session_id"]] = rec["id"]
            if rec["stored_steps"]:
                self._stored_steps[rec["adapter_session_id"]] = set(rec["stored_steps"])

    async def _insert_steps(self) -> None:
        """COPY the batch's steps that are not stored yet; ``written.steps`` gets them, by session id."""
        stored = self._stored_steps
        rows = [
            row
            for row in self._step_rows
            if (done := stored.get(row["adapter_session_id"])) is None or row["step_id"] not in done
        ]
        if not rows:
            return
        ids = self._ids
        steps = self.written.steps
        records = []
        for row in rows:
            session_id = ids[row["adapter_session_id"]]
            steps.setdefault(session_id, []).append(row)
            records.append(
                (
                    session_id,
                    row["step_id"],
                    row["trace"],
                    row["output"],
                    row["attempts"],
                    row["metadata"],  # jsonb: the connection's codec encodes it
                    row["adapter_session_id"],
                    row["adapter_usage"],
                    row["adapter_events"],
                )
            )
        await self._conn.copy_records_to_table(_sql.STEP_TABLE, records=records, columns=_sql.STEP_COLUMNS)
        self._stepped = set(steps)

    async def _write_back(self) -> None:
        """Existing sessions the batch changes, merged and written back (assigned when that completes
        them: the steps are in already)."""
        updates: list[tuple[int, SessionRow, SessionChange]] = []
        for rec in self._existing:
            if rec["needs"]:
                change = self._changes[rec["adapter_session_id"]]
                updates.append((rec["id"], apply_change(row_from_record(rec), change), change))
        if not updates:
            return
        cols = _session_columns([row for _, row, _ in updates])
        returned = await self._conn.fetch(
            _sql.UPDATE_SESSIONS,
            [i for i, _, _ in updates],
            *cols[2:],
            self._target.name,
            [change.closed is not None for _, _, change in updates],
        )
        assigned = {r["id"]: r["plan"] for r in returned if r["assigned"]}
        for session_id, row, change in updates:
            if session_id in assigned:
                self.written.assigned.append(session_id)
                # completed by its close (the plan is in memory), or by its opened: the close came before
                plan = change.closed.plan if change.closed is not None else assigned[session_id]
                self._remember(session_id, row, plan)

    async def _insert_plans(self) -> None:
        plans = [
            (self._ids[c.adapter_session_id], c.closed.plan)
            for c in self._batch.sessions
            if c.closed is not None and c.closed.plan is not None
        ]
        if plans:
            await self._conn.execute(_sql.INSERT_PLANS, [p[0] for p in plans], [_dumps(p[1]) for p in plans])

    async def _abandon(self) -> None:
        """Only an opened can make a session of its task abandoned (a newer attempt, or an older one that
        came late): the rule runs for those tasks (the periodic sweep re-checks every task)."""
        tasks = sorted({c.task_id for c in self._batch.sessions if c.opened is not None})
        if not tasks:
            return
        for rec in await self._conn.fetch(_sql.ABANDON, tasks):
            _log.info(
                "session.abandoned",
                adapter_session_id=rec["adapter_session_id"],
                superseded_by=rec["attempt"],
            )

    async def _assign_late(self) -> None:
        """Sessions closed before this batch and completed by steps that came after their close."""
        late = [
            rec["id"]
            for rec in self._existing
            if not rec["needs"]
            and rec["steps_expected"] is not None
            and not rec["assigned"]
            and rec["id"] in self._stepped
        ]
        if late:
            for rec in await self._conn.fetch(_sql.ASSIGN, late, self._target.name):
                session_id = rec["id"]
                self.written.assigned.append(session_id)
                line = dict(rec)
                self.written.steps_expected[session_id] = line.pop("steps_expected")
                self.written.rows[session_id] = line

    def _remember(self, session_id: int, row: SessionRow, plan: object) -> None:
        """Keep the row of a session this batch wrote and assigned, for its line (an assigned session's row
        never changes again; it is complete, so its close set ``steps_expected``)."""
        if row.steps_expected is None:  # not complete: cannot be assigned; its line is read back if it is
            return
        self.written.rows[session_id] = line_session(session_id, row, plan)
        self.written.steps_expected[session_id] = row.steps_expected


async def count_assigned(conn: asyncpg.Connection, count: int, target: FileTarget, ingestor_id: str) -> None:
    """Count ``count`` new sessions in the target file's row (created by the first batch that assigns)."""
    if not count:
        return
    total = await conn.fetchval(_sql.FILE_ASSIGNED, target.name, ingestor_id, target.owner_token, count)
    if total is None:
        raise FileSuperseded(f"{target.name} is no longer open for this ingestor")


async def assign(conn: asyncpg.Connection, ids: list[int], target: FileTarget, ingestor_id: str) -> list[int]:
    """Assign the complete, unassigned sessions among ``ids`` (locked by the caller) to ``target``."""
    assigned = [r["id"] for r in await conn.fetch(_sql.ASSIGN, ids, target.name)]
    await count_assigned(conn, len(assigned), target, ingestor_id)
    return assigned
