"""One group commit of the task ledger: the operations callers queue, and the set-based statements that
apply a whole group in one transaction (``_ledger`` states the rules they enforce and runs the loop).

Kept apart from the loop so that what is written to the database can be read in one place, statement by
statement, next to the rows each operation carries.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, Literal, TypeVar

import asyncpg

# One group is ONE statement (data-modifying CTEs; autocommit, so one round trip and one WAL flush instead
# of BEGIN, three statements and COMMIT). Its parts share one snapshot and must not touch a row twice
# (PostgreSQL would apply only one of the changes): the ledger's loop puts each task_id in at most one
# operation of a group (``Group.take``); the heartbeat, after it, leaves out every task the group named.
#
# claimed: a claim takes the row unless it succeeded, or it is running under another live token; the WHERE
# keeps a repeated claim (same token: its first reply was lost) from counting as a new attempt.
# refused: the rows of the claims not taken, as this statement's snapshot sees them (a row another
# transaction inserted after it began is not there: the caller asks again for those, ``_REFUSED``).
#
# A group of one kind of operation (at a moderate rate nearly every group: a task's claim, or its success,
# alone) runs a statement of just that part: planned for each call (custom plans, see ``_ledger``), the
# three-part statement cost PostgreSQL ~0.3 ms more per group, and the client ~20 us more, for its empty
# parts. The parts are written once below and numbered per statement.
_CLAIMED: Final = """claimed AS (
    INSERT INTO task_ledger AS l (task_id, state, attempts, worker_id, claim_token)
    SELECT u.task_id, 'running', 1, {worker}, u.token
    FROM unnest({ids}::text[], {tokens}::text[]) AS u(task_id, token)
    ON CONFLICT (task_id) DO UPDATE
        SET state = 'running', attempts = l.attempts + 1, worker_id = EXCLUDED.worker_id,
            claim_token = EXCLUDED.claim_token, last_error = NULL, updated_at = now()
        WHERE l.state <> 'succeeded'
          AND l.claim_token IS DISTINCT FROM EXCLUDED.claim_token
          AND (l.state <> 'running' OR l.updated_at < now() - {stale}::interval)
    RETURNING l.task_id, l.attempts
)"""
_CLAIM_ROWS: Final = """SELECT 'claimed' AS part, task_id, attempts, NULL AS state, NULL AS claim_token,
       NULL AS worker_id, NULL::bytea AS close_message, NULL::timestamptz AS updated_at
FROM claimed
UNION ALL
SELECT 'refused', t.task_id, t.attempts, t.state, t.claim_token, t.worker_id, t.close_message, t.updated_at
FROM task_ledger AS t
WHERE t.task_id = ANY({ids}::text[]) AND NOT EXISTS (SELECT FROM claimed AS c WHERE c.task_id = t.task_id)"""
_SUCCEEDED: Final = """succeeded AS (
    UPDATE task_ledger AS l
    SET state = 'succeeded', adapter_session_id = u.asid, close_message = u.close, last_error = NULL,
        updated_at = now()
    FROM unnest({ids}::text[], {tokens}::text[], {asids}::text[], {closes}::bytea[])
         AS u(task_id, token, asid, close)
    WHERE l.task_id = u.task_id AND l.claim_token = u.token AND l.state IN ('running', 'succeeded')
    RETURNING l.task_id
)"""
_SETTLED: Final = """settled AS (
    UPDATE task_ledger AS l SET state = u.state, last_error = u.error, updated_at = now()
    FROM unnest({ids}::text[], {tokens}::text[], {states}::text[], {errors}::text[])
         AS u(task_id, token, state, error)
    WHERE l.task_id = u.task_id AND l.claim_token = u.token AND l.state <> 'succeeded'
    RETURNING l.task_id
)"""


def _numbered(first: int, *names: str) -> dict[str, str]:
    """``{name: "$n"}`` for ``names`` numbered from ``first``."""
    return {name: f"${first + i}" for i, name in enumerate(names)}


_CLAIM_PARAMS: Final = ("ids", "tokens", "worker", "stale")
_SUCCEED_PARAMS: Final = ("ids", "tokens", "asids", "closes")
_SETTLE_PARAMS: Final = ("ids", "tokens", "states", "errors")
_CLAIMS_FIRST: Final = _numbered(1, *_CLAIM_PARAMS)  # the claims come first in both statements that have them
_GROUP: Final = (
    "WITH "  # noqa: S608 -- built from the constants above only
    + _CLAIMED.format(**_CLAIMS_FIRST)
    + ", "
    + _SUCCEEDED.format(**_numbered(5, *_SUCCEED_PARAMS))
    + ", "
    + _SETTLED.format(**_numbered(9, *_SETTLE_PARAMS))
    + "\n"
    + _CLAIM_ROWS.format(**_CLAIMS_FIRST)
    + "\nUNION ALL SELECT 'succeeded', task_id, NULL, NULL, NULL, NULL, NULL, NULL FROM succeeded"
    + "\nUNION ALL SELECT 'settled', task_id, NULL, NULL, NULL, NULL, NULL, NULL FROM settled"
)
_CLAIMS_ONLY: Final = "WITH " + _CLAIMED.format(**_CLAIMS_FIRST) + "\n" + _CLAIM_ROWS.format(**_CLAIMS_FIRST)
_SUCCEEDS_ONLY: Final = (
    "WITH "
    + _SUCCEEDED.format(**_numbered(1, *_SUCCEED_PARAMS))
    + "\nSELECT 'succeeded' AS part, task_id FROM succeeded"
)
_SETTLES_ONLY: Final = (
    "WITH "
    + _SETTLED.format(**_numbered(1, *_SETTLE_PARAMS))
    + "\nSELECT 'settled' AS part, task_id FROM settled"
)

# The heartbeat is a statement of its own, sent only every heartbeat_s: inside the group, with no tasks to
# beat, PostgreSQL still walked every 'running' entry of the state index (dead ones too) on each group.
_HEARTBEAT: Final = """
UPDATE task_ledger AS l SET updated_at = now()
FROM unnest($1::text[], $2::text[]) AS u(task_id, token)
WHERE l.task_id = u.task_id AND l.claim_token = u.token AND l.state = 'running'
RETURNING l.task_id
"""
_REFUSED: Final = """
SELECT task_id, state, attempts, claim_token, worker_id, close_message, updated_at
FROM task_ledger WHERE task_id = ANY($1::text[])
"""
SettleState = Literal["retrying", "dead"]


@dataclass(frozen=True, slots=True)
class Claim:
    """What a claim found. ``run``: this delivery runs the task (``attempt``, under ``token``). ``done``: it
    already succeeded (``close_message`` is its stored close). ``busy``: a live run of another claim holds
    it (``holder`` is that worker, ``heartbeat_at`` its last sign of life)."""

    outcome: Literal["run", "done", "busy"]
    token: str
    attempt: int = 0
    close_message: bytes | None = None
    holder: str | None = None
    heartbeat_at: datetime | None = None


# The operations a caller queues; each carries the future its caller awaits.


@dataclass(slots=True)
class ClaimOp:
    task_id: str
    token: str
    future: asyncio.Future[Claim]


@dataclass(slots=True)
class SucceedOp:
    task_id: str
    token: str
    adapter_session_id: str
    close_message: bytes
    future: asyncio.Future[bool]


@dataclass(slots=True)
class SettleOp:
    task_id: str
    token: str
    state: str
    error: str | None
    future: asyncio.Future[bool]


_Op = TypeVar("_Op", ClaimOp, SucceedOp, SettleOp)


@dataclass(slots=True)
class Group:
    """The operations one round trip commits together."""

    claims: list[ClaimOp] = field(default_factory=list)
    succeeded: list[SucceedOp] = field(default_factory=list)
    settled: list[SettleOp] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.claims) + len(self.succeeded) + len(self.settled)

    def futures(self) -> list[asyncio.Future[Any]]:
        ops: Iterable[ClaimOp | SucceedOp | SettleOp] = (*self.claims, *self.succeeded, *self.settled)
        return [op.future for op in ops]

    def drop_abandoned(self) -> None:
        """Forget operations whose caller gave up (deadline passed) before they were sent."""
        self.claims = [op for op in self.claims if not op.future.done()]
        self.succeeded = [op for op in self.succeeded if not op.future.done()]
        self.settled = [op for op in self.settled if not op.future.done()]

    def fail(self, error: Exception) -> None:
        """Every caller still waiting gets ``error``."""
        for future in self.futures():
            if not future.done():
                future.set_exception(error)

    def take(self, max_claims: int) -> tuple[Group, Group]:
        """``(group, rest)``: the operations of one statement, each task_id in at most one of them (one
        statement cannot change a row twice), and at most ``max_claims`` claims; the rest wait for the next
        round trip. Successes go first, then settlements (a release queued behind its run's success finds
        the task succeeded, as before), then claims, in the order they came."""
        group, rest, seen = Group(), Group(), set[str]()
        for op in self.succeeded:
            _place(op, seen, group.succeeded, rest.succeeded)
        for settle in self.settled:
            _place(settle, seen, group.settled, rest.settled)
        for claim in self.claims:
            if len(group.claims) >= max_claims:
                rest.claims.append(claim)
            else:
                _place(claim, seen, group.claims, rest.claims)
        return group, rest


def _place(op: _Op, seen: set[str], group: list[_Op], rest: list[_Op]) -> None:
    if op.task_id in seen:
        rest.append(op)
    else:
        seen.add(op.task_id)
        group.append(op)


def new_token() -> str:
    return secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class GroupResult:
    """What one group commit found: each claim's outcome, the task ids whose success or settlement this
    claim recorded, the task ids heartbeated and those of them still held (a missing one was taken over)."""

    claims: dict[str, Claim]
    succeeded: set[str]
    settled: set[str]
    beat: set[str]
    alive: set[str]

    def taken_over(self) -> set[str]:
        """Heartbeated tasks that another worker holds now."""
        return self.beat - self.alive


async def apply_group(
    conn: asyncpg.Connection | asyncpg.Pool,
    group: Group,
    beat: dict[str, str],
    *,
    worker_id: str,
    stale_after: timedelta,
) -> GroupResult:
    """Run ``group`` in one statement (its own transaction), whatever the number of tasks, then the
    heartbeat of ``beat`` (task_id -> token) if any. A task the group names is not heartbeated: the group
    already wrote its row (or read it, for a claim refused), and it does not need to look alive."""
    claims = group.claims
    named = {op.task_id for op in claims}
    named.update(op.task_id for op in group.succeeded)
    named.update(op.task_id for op in group.settled)
    beat = {task_id: token for task_id, token in beat.items() if task_id not in named}
    succeeded, settled = group.succeeded, group.settled
    claim_args = ([op.task_id for op in claims], [op.token for op in claims], worker_id, stale_after)
    succeed_args = (
        [op.task_id for op in succeeded],
        [op.token for op in succeeded],
        [op.adapter_session_id for op in succeeded],
        [op.close_message for op in succeeded],
    )
    settle_args = (
        [op.task_id for op in settled],
        [op.token for op in settled],
        [op.state for op in settled],
        [op.error for op in settled],
    )
    if not succeeded and not settled:
        rows = await conn.fetch(_CLAIMS_ONLY, *claim_args) if claims else []
    elif not claims and not settled:
        rows = await conn.fetch(_SUCCEEDS_ONLY, *succeed_args)
    elif not claims and not succeeded:
        rows = await conn.fetch(_SETTLES_ONLY, *settle_args)
    else:
        rows = await conn.fetch(_GROUP, *claim_args, *succeed_args, *settle_args)
    tokens = {op.task_id: op.token for op in claims}
    result = GroupResult(claims={}, succeeded=set(), settled=set(), beat=set(beat), alive=set())
    parts = {"succeeded": result.succeeded, "settled": result.settled}
    for row in rows:
        part, task_id = row["part"], row["task_id"]
        if part == "claimed":
            result.claims[task_id] = Claim("run", tokens[task_id], attempt=row["attempts"])
        elif part == "refused":
            result.claims[task_id] = _refused(row, tokens[task_id])
        else:
            parts[part].add(task_id)
    unseen = [task_id for task_id in tokens if task_id not in result.claims]
    if unseen:  # rows committed by others after the statement's snapshot was taken: read them now
        for row in await conn.fetch(_REFUSED, unseen):
            result.claims[row["task_id"]] = _refused(row, tokens[row["task_id"]])
    if beat:
        rows = await conn.fetch(_HEARTBEAT, list(beat), list(beat.values()))
        result.alive.update(row["task_id"] for row in rows)
    return result


def _refused(row: Any, token: str) -> Claim:
    """A claim the statement did not take: our own (lost reply), done, or held by a live run."""
    if row["claim_token"] == token and row["state"] == "running":
        return Claim("run", token, attempt=row["attempts"])
    if row["state"] == "succeeded":
        return Claim("done", token, close_message=row["close_message"])
    return Claim("busy", token, holder=row["worker_id"], heartbeat_at=row["updated_at"])


def transient(exc: asyncpg.PostgresError) -> bool:
    """SQLSTATE classes that mean "not now" (connection, rollback/deadlock, resources, operator, system)."""
    return str(getattr(exc, "sqlstate", "") or "")[:2] in {"08", "40", "53", "55", "57", "58", "XX"}
