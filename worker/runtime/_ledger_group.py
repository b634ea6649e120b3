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
from typing import Any, Final, Literal

import asyncpg

# A claim takes the row unless it succeeded, or it is running under another live token. The WHERE keeps a
# repeated claim (same token: its first reply was lost) from counting as a new attempt.
_CLAIM: Final = """
INSERT INTO task_ledger AS l (task_id, state, attempts, worker_id, claim_token)
SELECT u.task_id, 'running', 1, $3, u.token FROM unnest($1::text[], $2::text[]) AS u(task_id, token)
ON CONFLICT (task_id) DO UPDATE
    SET state = 'running', attempts = l.attempts + 1, worker_id = EXCLUDED.worker_id,
        claim_token = EXCLUDED.claim_token, last_error = NULL, updated_at = now()
    WHERE l.state <> 'succeeded'
      AND l.claim_token IS DISTINCT FROM EXCLUDED.claim_token
      AND (l.state <> 'running' OR l.updated_at < now() - $4::interval)
RETURNING task_id, attempts
"""
_REFUSED: Final = """
SELECT task_id, state, attempts, claim_token, worker_id, close_message, updated_at
FROM task_ledger WHERE task_id = ANY($1::text[])
"""
_SUCCEED: Final = """
UPDATE task_ledger AS l
SET state = 'succeeded', adapter_session_id = u.asid, close_message = u.close, last_error = NULL,
    updated_at = now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[]) AS u(task_id, token, asid, close)
WHERE l.task_id = u.task_id AND l.claim_token = u.token AND l.state IN ('running', 'succeeded')
RETURNING l.task_id
"""
_SETTLE: Final = """
UPDATE task_ledger AS l SET state = u.state, last_error = u.error, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS u(task_id, token, state, error)
WHERE l.task_id = u.task_id AND l.claim_token = u.token AND l.state <> 'succeeded'
RETURNING l.task_id
"""
_HEARTBEAT: Final = """
UPDATE task_ledger AS l SET updated_at = now()
FROM unnest($1::text[], $2::text[]) AS u(task_id, token)
WHERE l.task_id = u.task_id AND l.claim_token = u.token AND l.state = 'running'
RETURNING l.task_id
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


def new_token() -> str:
    return secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class GroupResult:
    """What one group commit found: each claim's outcome, the task ids whose success or settlement this
    claim recorded, and the heartbeated task ids still held (a missing one was taken over)."""

    claims: dict[str, Claim]
    succeeded: set[str]
    settled: set[str]
    alive: set[str]

    def taken_over(self, beat: dict[str, str]) -> set[str]:
        """Heartbeated tasks that another worker holds now. A task this same group succeeded or settled is
        no longer ``running`` by the time the heartbeat statement runs (it comes last): it ended, it was
        not taken over."""
        return set(beat) - self.alive - self.succeeded - self.settled


async def apply_group(
    conn: asyncpg.Connection, group: Group, beat: dict[str, str], *, worker_id: str, stale_after: timedelta
) -> GroupResult:
    """Run ``group`` and the heartbeat of ``beat`` (task_id -> token) on ``conn``, inside the caller's
    transaction: one statement per kind of operation, whatever the number of tasks."""
    return GroupResult(
        claims=await _claims(conn, group.claims, worker_id, stale_after),
        succeeded=await _succeeded(conn, group.succeeded),
        settled=await _settled(conn, group.settled),
        alive=await _heartbeat(conn, beat),
    )


async def _claims(
    conn: asyncpg.Connection, ops: list[ClaimOp], worker_id: str, stale_after: timedelta
) -> dict[str, Claim]:
    if not ops:
        return {}
    tokens = {op.task_id: op.token for op in ops}
    rows = await conn.fetch(_CLAIM, list(tokens), list(tokens.values()), worker_id, stale_after)
    claims = {r["task_id"]: Claim("run", tokens[r["task_id"]], attempt=r["attempts"]) for r in rows}
    missing = [t for t in tokens if t not in claims]
    if missing:
        for row in await conn.fetch(_REFUSED, missing):
            claims[row["task_id"]] = _refused(row, tokens[row["task_id"]])
    return claims


def _refused(row: Any, token: str) -> Claim:
    """A claim the statement did not take: our own (lost reply), done, or held by a live run."""
    if row["claim_token"] == token and row["state"] == "running":
        return Claim("run", token, attempt=row["attempts"])
    if row["state"] == "succeeded":
        return Claim("done", token, close_message=row["close_message"])
    return Claim("busy", token, holder=row["worker_id"], heartbeat_at=row["updated_at"])


async def _succeeded(conn: asyncpg.Connection, ops: list[SucceedOp]) -> set[str]:
    if not ops:
        return set()
    rows = await conn.fetch(
        _SUCCEED,
        [op.task_id for op in ops],
        [op.token for op in ops],
        [op.adapter_session_id for op in ops],
        [op.close_message for op in ops],
    )
    return {r["task_id"] for r in rows}


async def _settled(conn: asyncpg.Connection, ops: list[SettleOp]) -> set[str]:
    if not ops:
        return set()
    rows = await conn.fetch(
        _SETTLE,
        [op.task_id for op in ops],
        [op.token for op in ops],
        [op.state for op in ops],
        [op.error for op in ops],
    )
    return {r["task_id"] for r in rows}


async def _heartbeat(conn: asyncpg.Connection, beat: dict[str, str]) -> set[str]:
    if not beat:
        return set()
    rows = await conn.fetch(_HEARTBEAT, list(beat), list(beat.values()))
    return {r["task_id"] for r in rows}


def transient(exc: asyncpg.PostgresError) -> bool:
    """SQLSTATE classes that mean "not now" (connection, rollback/deadlock, resources, operator, system)."""
    return str(getattr(exc, "sqlstate", "") or "")[:2] in {"08", "40", "53", "55", "57", "58", "XX"}
