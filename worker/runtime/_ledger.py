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
flight go together in the next, as one set-based statement (``_ledger_group``), so concurrent tasks share a
round trip and a WAL flush instead of paying one each. Database trouble is retried with capped backoff;
every call has a deadline (``LedgerUnavailable`` after ``op_timeout_s``), and if the loop itself ever dies
every caller gets an error at once instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta
from typing import Any, Final, TypeVar

import asyncpg
import structlog

from atlas_common import (
    DB_TRANSIENT_ERRORS,
    Backoff,
    DbPooler,
    Resource,
    pool_options,
    redact_url,
    scrub_secrets,
)
from worker.runtime._deadline import fail_after
from worker.runtime._errors import WorkerRuntimeError
from worker.runtime._ledger_group import (
    Claim,
    ClaimOp,
    Group,
    GroupResult,
    SettleOp,
    SettleState,
    SucceedOp,
    apply_group,
    new_token,
    transient,
)

log = structlog.get_logger("worker.ledger")

_MAX_GROUP: Final = 500

_PRIVILEGES: Final = """
SELECT has_table_privilege('task_ledger', 'SELECT'), has_table_privilege('task_ledger', 'INSERT'),
       has_table_privilege('task_ledger', 'UPDATE')
"""

T = TypeVar("T")


class LedgerUnavailable(WorkerRuntimeError):
    """The ledger database cannot be reached now (or not within the call's deadline)."""


class TaskLedger(Resource):
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
        pooler: DbPooler = "none",
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
        self._pooler: DbPooler = pooler
        self._pool: asyncpg.Pool | None = None
        self._conn: asyncpg.Connection | None = None
        """The pooled connection the loop commits on, held from one group to the next (see _connection)."""
        self._stopping = stopping or asyncio.Event()
        self._pending = Group()
        self._committing = Group()
        """The group the loop is committing: its callers wait too, and must hear if the loop dies."""
        self._active: dict[str, str] = {}
        """task_id -> token of the claims this worker holds (heartbeated)."""
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._dead: BaseException | None = None
        self.heartbeat_s = heartbeat_s
        # What a call past its deadline hears, made once (the calls are on every task's path).
        self._no_answer = {
            what: f"ledger {what} got no answer within {op_timeout_s:g}s"
            for what in ("claim", "succeed", "settle")
        }

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            self._pool = await asyncpg.create_pool(
                self._url,
                min_size=1,
                max_size=self._pool_size,
                command_timeout=30,
                **_plan_options(self._pooler),
            )
        except (*DB_TRANSIENT_ERRORS, asyncpg.PostgresError) as exc:
            raise LedgerUnavailable(
                f"cannot reach PostgreSQL at {redact_url(self._url)}: {self._text(exc)}"
            ) from exc
        self._loop_task = asyncio.create_task(self._run(), name="task-ledger")
        self._loop_task.add_done_callback(self._loop_ended)

    def _text(self, exc: BaseException | None) -> str:
        """``repr(exc)`` without any secret of the database URL (a driver's error may quote its URL)."""
        return scrub_secrets(repr(exc), self._url)

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
        self._fail_waiting(LedgerUnavailable("the task ledger is closed"))
        await self._drop_connection()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=5)
            except (*DB_TRANSIENT_ERRORS, asyncpg.PostgresError):
                pool.terminate()

    # --- the calls ----------------------------------------------------------------------------------------

    async def claim(self, task_id: str, token: str | None = None) -> Claim:
        """Claim ``task_id`` under ``token`` (a fresh one if None; pass the same token to ask again)."""
        future: asyncio.Future[Claim] = self._future("claim")
        self._pending.claims.append(ClaimOp(task_id, token or new_token(), future))
        claim = await future
        if claim.outcome == "run":
            self._active[task_id] = claim.token
        return claim

    async def succeed(self, task_id: str, token: str, adapter_session_id: str, close_message: bytes) -> bool:
        """Record success; False when this claim no longer holds the task (another run took it over)."""
        future: asyncio.Future[bool] = self._future("succeed")
        self._pending.succeeded.append(SucceedOp(task_id, token, adapter_session_id, close_message, future))
        try:
            return await future
        finally:
            self._forget(task_id, token)

    async def settle(self, task_id: str, token: str, state: SettleState, error: str | None) -> bool:
        """Record ``retrying`` or ``dead`` (with the error); False when this claim no longer holds it."""
        future: asyncio.Future[bool] = self._future("settle")
        self._pending.settled.append(SettleOp(task_id, token, state, error, future))
        try:
            return await future
        finally:
            self._forget(task_id, token)

    async def release(self, task_id: str, token: str, why: str) -> None:
        """Give a claim up without a verdict (shutdown, lost broker): the next delivery may run the task at
        once instead of waiting for the claim to go stale. Best effort: staleness covers a failure.

        Once queued, the release is committed even if its caller stops waiting (cancelled, or past its
        deadline): a run cut off by a lost broker connection is cancelled twice (aiormq cancels the
        consumers of the dead channel, then the worker cancels what is in flight), and a release dropped
        with its caller would leave the row running, no longer heartbeated, until it went stale."""
        self._forget(task_id, token)
        try:
            future: asyncio.Future[bool] = self._future(None)
        except LedgerUnavailable:
            return
        future.add_done_callback(_retrieve)
        self._pending.settled.append(SettleOp(task_id, token, "retrying", f"released: {why}", future))
        with contextlib.suppress(LedgerUnavailable):
            await self._deadline(asyncio.shield(future), "release")

    def _forget(self, task_id: str, token: str) -> None:
        if self._active.get(task_id) == token:
            del self._active[task_id]

    def _future(self, what: str | None) -> asyncio.Future[Any]:
        """The future of one call, failed with :class:`LedgerUnavailable` if it has no answer within
        ``op_timeout_s`` (``what`` None: no deadline of its own; see ``_deadline``). The loop then drops the
        operation if it was not sent yet (``Group.drop_abandoned``), or hands back a claim answered late."""
        if self._dead is not None or self._loop_task is None:
            raise LedgerUnavailable(f"the task ledger is not running ({self._text(self._dead)})")
        self._wake.set()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if what is not None:
            fail_after(future, self._op_timeout_s, LedgerUnavailable, self._no_answer[what])
        return future

    async def _deadline(self, future: asyncio.Future[T], what: str) -> T:
        try:
            async with asyncio.timeout(self._op_timeout_s):  # cheaper than wait_for (no wrapping task)
                return await future
        except TimeoutError:
            raise LedgerUnavailable(f"ledger {what} got no answer within {self._op_timeout_s:g}s") from None

    # --- the loop ----------------------------------------------------------------------------------------

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """The loop never ends by itself; if it does, every caller must hear about it, not wait forever."""
        self._dead = (task.exception() if not task.cancelled() else None) or RuntimeError("ledger loop ended")
        log.error("ledger.loop_died", error=self._text(self._dead))
        self._fail_waiting(LedgerUnavailable(f"the task ledger loop died: {self._text(self._dead)}"))

    def _fail_waiting(self, error: LedgerUnavailable) -> None:
        """Fail every call still waiting: those queued and those of the group the loop was committing."""
        for group in (self._committing, self._pending):
            group.fail(error)
        self._committing, self._pending = Group(), Group()

    async def _run(self) -> None:
        next_beat = time.monotonic() + self._heartbeat_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_beat - time.monotonic()))
            self._wake.clear()
            self._pending.drop_abandoned()
            group, self._pending = self._pending.take(_MAX_GROUP)
            if self._pending:
                self._wake.set()
            beat = time.monotonic() >= next_beat
            if beat:
                next_beat = time.monotonic() + self._heartbeat_s
            if not group and not (beat and self._active):
                continue
            # Left set if the loop dies mid-commit (cancelled, a BaseException): _loop_ended fails it.
            self._committing = group
            try:
                await self._commit(group, dict(self._active) if beat else {})
            except Exception as exc:  # a bug or an unforeseen driver error: fail this group, keep serving
                log.exception("ledger.group_failed", items=len(group))
                group.fail(LedgerUnavailable(f"ledger group failed: {self._text(exc)}"))
            self._committing = Group()

    async def _commit(self, group: Group, beat: dict[str, str]) -> None:
        backoff = Backoff(initial_s=0.1, max_s=5.0)
        while True:
            pool = self._pool
            if pool is None:
                group.fail(LedgerUnavailable("the task ledger is closed"))
                return
            try:
                conn = await self._connection(pool)
                result = await apply_group(
                    conn, group, beat, worker_id=self._worker_id, stale_after=self._stale_after
                )
            except DB_TRANSIENT_ERRORS as exc:
                log.warning("ledger.unreachable_retrying", error=self._text(exc), items=len(group))
                await self._drop_connection()
                await pool.expire_connections()  # after a restart every pooled connection is dead
            except asyncpg.PostgresError as exc:
                if transient(exc):  # the server may be ending this session (e.g. 57P01): a fresh one
                    log.warning("ledger.unavailable_retrying", error=self._text(exc), items=len(group))
                    await self._drop_connection()
                else:  # the statement itself is refused: retrying will not help; the tasks requeue
                    log.exception("ledger.statement_failed", error=self._text(exc), items=len(group))
                    group.fail(LedgerUnavailable(f"ledger statement failed: {self._text(exc)}"))
                    return
            else:
                self._resolve(group, result)
                lost = result.taken_over()
                if lost:
                    log.warning("ledger.claims_taken_over", tasks=sorted(lost)[:20], count=len(lost))
                return
            if self._stopping.is_set():
                group.fail(LedgerUnavailable("ledger unreachable and the worker is stopping"))
                return
            group.drop_abandoned()
            await asyncio.sleep(backoff.next())

    async def _connection(self, pool: asyncpg.Pool) -> asyncpg.Connection:
        """The connection the loop commits its groups on. One group is committed at a time, so the loop
        holds one pooled connection from group to group instead of taking one from the pool for each
        statement and giving it back (~70 us of CPU per group, as much as the statement's own at a
        moderate rate, where most groups hold one operation); it is let go after a connection error."""
        if self._conn is None:
            self._conn = await pool.acquire()
        return self._conn

    async def _drop_connection(self) -> None:
        """Give the held connection back to its pool (which replaces it if it broke); safe twice."""
        conn, self._conn = self._conn, None
        pool = self._pool
        if conn is not None and pool is not None:
            try:
                await asyncio.wait_for(pool.release(conn), timeout=5)
            except (*DB_TRANSIENT_ERRORS, asyncpg.PostgresError):
                conn.terminate()

    def _resolve(self, group: Group, result: GroupResult) -> None:
        for op in group.claims:
            claim = result.claims[op.task_id]
            if not op.future.done():
                op.future.set_result(claim)
            elif claim.outcome == "run":  # the caller gave up meanwhile: hand the claim back at once
                self._pending.settled.append(
                    SettleOp(op.task_id, op.token, "retrying", "released: claim answered too late", _orphan())
                )
                self._wake.set()
        for done in group.succeeded:
            if not done.future.done():
                done.future.set_result(done.task_id in result.succeeded)
        for settle in group.settled:
            if not settle.future.done():
                settle.future.set_result(settle.task_id in result.settled)


def _plan_options(pooler: DbPooler) -> dict[str, Any]:
    """The pool's options: a plan for each group's own arrays. A prepared statement's generic plan, made
    from the first few groups, keeps what the table was like then: on a new ledger (a new deployment, a
    benchmark) a plan made for a near-empty table seq-scans it on every group once it holds thousands of
    rows (measured: 1,000 -> 500 tasks/s over 20,000 tasks). A custom plan reads the table's size each
    time and the groups' arrays are small, so it looks each task up by its key (behind a transaction
    pooler statements are unnamed, hence planned each time, already). No reset query on release: the
    ledger's statements leave no session state, and the reset was a round trip in every group commit."""
    options = pool_options(pooler, reset=False)
    if pooler == "none":
        options["server_settings"] = {"plan_cache_mode": "force_custom_plan"}
    return options


def _orphan() -> asyncio.Future[bool]:
    """A future nobody awaits (a release the ledger issues on its own); its outcome is only logged."""
    future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    future.add_done_callback(_retrieve)
    return future


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Read the outcome of a future its caller may no longer await (so asyncio does not report an
    exception that was never retrieved)."""
    if not future.cancelled():
        future.exception()
