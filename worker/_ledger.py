"""The task ledger in PostgreSQL: where task_id idempotency is enforced (see migrations/sql/005 and 007).

Rules (the README's "Exactly once" section states them for operators):

- A **claim** makes a task ``running`` under a fresh *claim token*. It wins unless the task already
  succeeded, or another claim holds it and that holder is alive. A claim whose commit reply was lost is
  retried with the same token and recognised as this worker's own (never mistaken for a duplicate).
- A holder is alive while its worker **heartbeats** the row (every ``heartbeat_s``); a ``running`` row not
  heartbeated for ``stale_after_s`` belongs to a dead run and any delivery may take it over.
- **succeed** / **settle** / **release** only change a row this claim still holds (same token): a run whose
  task was taken over learns it (``False``) and must not count.

Calls are group-committed: whatever claims, settlements and heartbeats arrive while one round trip is in
flight go together in the next, as set-based statements, so concurrent tasks share a round trip instead of
paying one each. Database trouble is retried with capped backoff; every call has a deadline
(``LedgerUnavailable`` after ``op_timeout_s``), and if the loop itself ever dies every caller gets an error
at once instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar

import asyncpg
import structlog

from atlas_common import DB_TRANSIENT_ERRORS, Backoff, redact_url
from worker._errors import WorkerError

log = structlog.get_logger("worker.ledger")

_MAX_GROUP: Final = 500

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
_PRIVILEGES: Final = """
SELECT has_table_privilege('task_ledger', 'SELECT'), has_table_privilege('task_ledger', 'INSERT'),
       has_table_privilege('task_ledger', 'UPDATE')
"""

SettleState = Literal["retrying", "dead"]
T = TypeVar("T")


class LedgerUnavailable(WorkerError):
    """The ledger database cannot be reached now (or not within the call's deadline)."""


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


@dataclass(slots=True)
class _ClaimOp:
    task_id: str
    token: str
    future: asyncio.Future[Claim]


@dataclass(slots=True)
class _SucceedOp:
    task_id: str
    token: str
    adapter_session_id: str
    close_message: bytes
    future: asyncio.Future[bool]


@dataclass(slots=True)
class _SettleOp:
    task_id: str
    token: str
    state: str
    error: str | None
    future: asyncio.Future[bool]


@dataclass(slots=True)
class _Group:
    claims: list[_ClaimOp] = field(default_factory=list)
    succeeded: list[_SucceedOp] = field(default_factory=list)
    settled: list[_SettleOp] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.claims) + len(self.succeeded) + len(self.settled)

    def futures(self) -> list[asyncio.Future[Any]]:
        ops: Iterable[_ClaimOp | _SucceedOp | _SettleOp] = (*self.claims, *self.succeeded, *self.settled)
        return [op.future for op in ops]

    def drop_abandoned(self) -> None:
        """Forget operations whose caller gave up (deadline passed) before they were sent."""
        self.claims = [op for op in self.claims if not op.future.done()]
        self.succeeded = [op for op in self.succeeded if not op.future.done()]
        self.settled = [op for op in self.settled if not op.future.done()]


def new_token() -> str:
    return secrets.token_hex(12)


class TaskLedger:
    """``async with TaskLedger(url, ...) as ledger``: claim, succeed, settle, release; ``close()`` is safe
    twice. One instance per worker process."""

    def __init__(
        self,
        database_url: str,
        *,
        worker_id: str,
        heartbeat_s: float = 5.0,
        stale_after_s: float = 60.0,
        op_timeout_s: float = 60.0,
        pool_size: int = 2,
        stopping: asyncio.Event | None = None,
    ) -> None:
        if stale_after_s < 3 * heartbeat_s:
            raise ValueError("stale_after_s must be at least three heartbeats")
        self._url = database_url
        self._worker_id = worker_id
        self._heartbeat_s = heartbeat_s
        self._stale_after = timedelta(seconds=stale_after_s)
        self._op_timeout_s = op_timeout_s
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._stopping = stopping or asyncio.Event()
        self._pending = _Group()
        self._active: dict[str, str] = {}
        """task_id -> token of the claims this worker holds (heartbeated)."""
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._dead: BaseException | None = None
        self.heartbeat_s = heartbeat_s

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._url, min_size=1, max_size=self._pool_size, command_timeout=30
            )
        except (*DB_TRANSIENT_ERRORS, asyncpg.PostgresError) as exc:
            raise LedgerUnavailable(f"cannot reach PostgreSQL at {redact_url(self._url)}: {exc!r}") from exc
        self._loop_task = asyncio.create_task(self._run(), name="task-ledger")
        self._loop_task.add_done_callback(self._loop_ended)

    async def check_privileges(self) -> list[str]:
        """The privileges on ``task_ledger`` this role lacks (empty when it has all it needs)."""
        if self._pool is None:
            raise LedgerUnavailable("the task ledger is closed")
        row = await self._pool.fetchrow(_PRIVILEGES)
        return [name for name, ok in zip(("SELECT", "INSERT", "UPDATE"), row, strict=True) if not ok]

    async def close(self) -> None:
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.remove_done_callback(self._loop_ended)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail(self._pending, LedgerUnavailable("the task ledger is closed"))
        self._pending = _Group()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=5)
            except (*DB_TRANSIENT_ERRORS, asyncpg.PostgresError):
                pool.terminate()

    # --- the calls ----------------------------------------------------------------------------------------

    async def claim(self, task_id: str, token: str | None = None) -> Claim:
        """Claim ``task_id`` under ``token`` (a fresh one if None; pass the same token to ask again)."""
        future: asyncio.Future[Claim] = self._future()
        self._pending.claims.append(_ClaimOp(task_id, token or new_token(), future))
        claim = await self._deadline(future, "claim")
        if claim.outcome == "run":
            self._active[task_id] = claim.token
        return claim

    async def succeed(self, task_id: str, token: str, adapter_session_id: str, close_message: bytes) -> bool:
        """Record success; False when this claim no longer holds the task (another run took it over)."""
        future: asyncio.Future[bool] = self._future()
        self._pending.succeeded.append(_SucceedOp(task_id, token, adapter_session_id, close_message, future))
        try:
            return await self._deadline(future, "succeed")
        finally:
            self._forget(task_id, token)

    async def settle(self, task_id: str, token: str, state: SettleState, error: str | None) -> bool:
        """Record ``retrying`` or ``dead`` (with the error); False when this claim no longer holds it."""
        future: asyncio.Future[bool] = self._future()
        self._pending.settled.append(_SettleOp(task_id, token, state, error, future))
        try:
            return await self._deadline(future, "settle")
        finally:
            self._forget(task_id, token)

    async def release(self, task_id: str, token: str, why: str) -> None:
        """Give a claim up without a verdict (shutdown, lost broker): the next delivery may run the task at
        once instead of waiting for the claim to go stale. Best effort: staleness covers a failure."""
        self._forget(task_id, token)
        with contextlib.suppress(LedgerUnavailable):
            await self.settle(task_id, token, "retrying", f"released: {why}")

    def _forget(self, task_id: str, token: str) -> None:
        if self._active.get(task_id) == token:
            del self._active[task_id]

    def _future(self) -> asyncio.Future[Any]:
        if self._dead is not None or self._loop_task is None:
            raise LedgerUnavailable(f"the task ledger is not running ({self._dead!r})")
        self._wake.set()
        return asyncio.get_running_loop().create_future()

    async def _deadline(self, future: asyncio.Future[T], what: str) -> T:
        try:
            return await asyncio.wait_for(future, self._op_timeout_s)
        except TimeoutError:
            raise LedgerUnavailable(f"ledger {what} got no answer within {self._op_timeout_s:g}s") from None

    # --- the loop ----------------------------------------------------------------------------------------

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """The loop never ends by itself; if it does, every caller must hear about it, not wait forever."""
        self._dead = (task.exception() if not task.cancelled() else None) or RuntimeError("ledger loop ended")
        log.error("ledger_loop_died", error=repr(self._dead))
        self._fail(self._pending, LedgerUnavailable(f"the task ledger loop died: {self._dead!r}"))
        self._pending = _Group()

    async def _run(self) -> None:
        next_beat = time.monotonic() + self._heartbeat_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_beat - time.monotonic()))
            self._wake.clear()
            group, self._pending = self._take()
            if self._pending:
                self._wake.set()
            beat = time.monotonic() >= next_beat
            if beat:
                next_beat = time.monotonic() + self._heartbeat_s
            if not group and not (beat and self._active):
                continue
            try:
                await self._commit(group, dict(self._active) if beat else {})
            except Exception as exc:  # a bug or an unforeseen driver error: fail this group, keep serving
                log.exception("ledger_group_failed", items=len(group))
                self._fail(group, LedgerUnavailable(f"ledger group failed: {exc!r}"))

    def _take(self) -> tuple[_Group, _Group]:
        """Up to _MAX_GROUP operations, and no task_id twice among the claims (one statement cannot update a
        row twice); the rest wait for the next round trip."""
        pending, group, rest = self._pending, _Group(), _Group()
        pending.drop_abandoned()
        seen: set[str] = set()
        for op in pending.claims:
            if op.task_id in seen or len(group) >= _MAX_GROUP:
                rest.claims.append(op)
            else:
                seen.add(op.task_id)
                group.claims.append(op)
        group.succeeded, group.settled = pending.succeeded, pending.settled
        return group, rest

    async def _commit(self, group: _Group, beat: dict[str, str]) -> None:
        backoff = Backoff(initial_s=0.1, max_s=5.0)
        while True:
            pool = self._pool
            if pool is None:
                self._fail(group, LedgerUnavailable("the task ledger is closed"))
                return
            try:
                async with pool.acquire() as conn, conn.transaction():
                    claims = await self._claims(conn, group.claims)
                    succeeded = await self._apply_succeeded(conn, group.succeeded)
                    settled = await self._apply_settled(conn, group.settled)
                    alive = await self._heartbeat(conn, beat)
            except DB_TRANSIENT_ERRORS as exc:
                log.warning("ledger_unreachable_retrying", error=repr(exc), items=len(group))
                await pool.expire_connections()  # after a restart every pooled connection is dead
            except asyncpg.PostgresError as exc:
                if _transient(exc):
                    log.warning("ledger_unavailable_retrying", error=repr(exc), items=len(group))
                else:  # the statement itself is refused: retrying will not help; the tasks requeue
                    log.exception("ledger_statement_failed", error=repr(exc), items=len(group))
                    self._fail(group, LedgerUnavailable(f"ledger statement failed: {exc!r}"))
                    return
            else:
                self._resolve(group, claims, succeeded, settled)
                lost = set(beat) - alive
                if lost:
                    log.warning("ledger_claims_taken_over", tasks=sorted(lost)[:20], count=len(lost))
                return
            if self._stopping.is_set():
                self._fail(group, LedgerUnavailable("ledger unreachable and the worker is stopping"))
                return
            group.drop_abandoned()
            await asyncio.sleep(backoff.next())

    def _resolve(
        self, group: _Group, claims: dict[str, Claim], succeeded: set[str], settled: set[str]
    ) -> None:
        for op in group.claims:
            claim = claims[op.task_id]
            if not op.future.done():
                op.future.set_result(claim)
            elif claim.outcome == "run":  # the caller gave up meanwhile: hand the claim back at once
                self._pending.settled.append(
                    _SettleOp(
                        op.task_id, op.token, "retrying", "released: claim answered too late", _orphan()
                    )
                )
                self._wake.set()
        for done in group.succeeded:
            if not done.future.done():
                done.future.set_result(done.task_id in succeeded)
        for settle in group.settled:
            if not settle.future.done():
                settle.future.set_result(settle.task_id in settled)

    async def _claims(self, conn: asyncpg.Connection, ops: list[_ClaimOp]) -> dict[str, Claim]:
        if not ops:
            return {}
        tokens = {op.task_id: op.token for op in ops}
        rows = await conn.fetch(
            _CLAIM, list(tokens), list(tokens.values()), self._worker_id, self._stale_after
        )
        claims = {r["task_id"]: Claim("run", tokens[r["task_id"]], attempt=r["attempts"]) for r in rows}
        missing = [t for t in tokens if t not in claims]
        if missing:
            for row in await conn.fetch(_REFUSED, missing):
                claims[row["task_id"]] = _refused(row, tokens[row["task_id"]])
        return claims

    async def _apply_succeeded(self, conn: asyncpg.Connection, ops: list[_SucceedOp]) -> set[str]:
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

    async def _apply_settled(self, conn: asyncpg.Connection, ops: list[_SettleOp]) -> set[str]:
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

    @staticmethod
    async def _heartbeat(conn: asyncpg.Connection, beat: dict[str, str]) -> set[str]:
        if not beat:
            return set()
        rows = await conn.fetch(_HEARTBEAT, list(beat), list(beat.values()))
        return {r["task_id"] for r in rows}

    @staticmethod
    def _fail(group: _Group, error: Exception) -> None:
        for future in group.futures():
            if not future.done():
                future.set_exception(error)


def _refused(row: Any, token: str) -> Claim:
    """A claim the statement did not take: our own (lost reply), done, or held by a live run."""
    if row["claim_token"] == token and row["state"] == "running":
        return Claim("run", token, attempt=row["attempts"])
    if row["state"] == "succeeded":
        return Claim("done", token, close_message=row["close_message"])
    return Claim("busy", token, holder=row["worker_id"], heartbeat_at=row["updated_at"])


def _orphan() -> asyncio.Future[bool]:
    """A future nobody awaits (a release the ledger issues on its own); its outcome is only logged."""
    future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future


def _transient(exc: asyncpg.PostgresError) -> bool:
    """SQLSTATE classes that mean "not now" (connection, rollback/deadlock, resources, operator, system)."""
    return str(getattr(exc, "sqlstate", "") or "")[:2] in {"08", "40", "53", "55", "57", "58", "XX"}
