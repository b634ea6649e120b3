"""The task ledger in PostgreSQL: where task_id idempotency is enforced (see migrations/sql/005).

Calls are group-committed: whatever claims and settlements arrive while one round trip is in flight go
together in the next, as set-based statements, so concurrent tasks share a round trip instead of paying
one each. Connection failures are retried with capped exponential backoff until they succeed or the
worker stops: while the database is away the worker holds its tasks (unacked) instead of running them.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Final, Self

import asyncpg
import structlog

from atlas_common import redact_url
from worker._errors import WorkerError

log = structlog.get_logger("worker.ledger")

_CONNECTION_ERRORS: Final = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    TimeoutError,
)
_MAX_GROUP: Final = 500

# A claim wins unless the task already succeeded, or it is running right now and this delivery may not
# take it over. Takeover is for redeliveries and retries (the earlier run is dead or failed); a fresh
# message for a running task is a duplicate submission racing the live run. A 'running' row older than
# the stale limit (no task runs longer than the task timeout) is taken over by anyone: its run is gone.
_CLAIM: Final = """
INSERT INTO task_ledger AS l (task_id, state, attempts, worker_id)
SELECT t, 'running', 1, $3 FROM unnest($1::text[]) AS t
ON CONFLICT (task_id) DO UPDATE
    SET state = 'running', attempts = l.attempts + 1, worker_id = EXCLUDED.worker_id, updated_at = now()
    WHERE l.state <> 'succeeded'
      AND (l.state <> 'running' OR l.task_id = ANY($2::text[]) OR l.updated_at < now() - $4::interval)
RETURNING task_id, attempts
"""
_REFUSED: Final = "SELECT task_id, state, close_message FROM task_ledger WHERE task_id = ANY($1::text[])"
_SUCCEED: Final = """
UPDATE task_ledger AS l
SET state = 'succeeded', adapter_session_id = u.asid, close_message = u.close, last_error = NULL,
    updated_at = now()
FROM unnest($1::text[], $2::text[], $3::bytea[]) AS u(task_id, asid, close)
WHERE l.task_id = u.task_id
"""
_SETTLE: Final = """
UPDATE task_ledger AS l SET state = u.state, last_error = u.error, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::text[]) AS u(task_id, state, error)
WHERE l.task_id = u.task_id
"""


class LedgerUnavailable(WorkerError):
    """The ledger database cannot be reached (at start-up, or while the worker is stopping)."""


@dataclass(frozen=True, slots=True)
class Claim:
    """``attempt`` >= 1: run it. ``done``: it already succeeded (``close_message`` is its stored close).
    ``busy``: another delivery of the same task is running right now (a duplicate submission)."""

    attempt: int
    done: bool = False
    busy: bool = False
    close_message: bytes | None = None


@dataclass(slots=True)
class _Pending:
    claims: list[tuple[str, bool, asyncio.Future[Claim]]]
    succeeded: list[tuple[str, str, bytes, asyncio.Future[None]]]
    settled: list[tuple[str, str, str | None, asyncio.Future[None]]]

    def __len__(self) -> int:
        return len(self.claims) + len(self.succeeded) + len(self.settled)

    def futures(self) -> list[asyncio.Future[Claim] | asyncio.Future[None]]:
        return [
            *(f for _, _, f in self.claims),
            *(item[3] for item in self.succeeded),
            *(item[3] for item in self.settled),
        ]


def _empty() -> _Pending:
    return _Pending([], [], [])


class TaskLedger:
    """``async with TaskLedger(url) as ledger``: claim, succeed, settle; ``close()`` is safe twice."""

    def __init__(
        self,
        database_url: str,
        *,
        worker_id: str,
        stale_after_s: float,
        pool_size: int = 2,
        stopping: asyncio.Event | None = None,
    ) -> None:
        self._stale_after = timedelta(seconds=stale_after_s)
        self._url = database_url
        self._worker_id = worker_id
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._stopping = stopping or asyncio.Event()
        self._pending = _empty()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

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
        except (*_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            raise LedgerUnavailable(f"cannot reach PostgreSQL at {redact_url(self._url)}: {exc!r}") from exc
        self._loop_task = asyncio.create_task(self._run(), name="task-ledger")

    async def close(self) -> None:
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_all(self._pending, LedgerUnavailable("the task ledger is closed"))
        self._pending = _empty()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def claim(self, task_id: str, *, takeover: bool) -> asyncio.Future[Claim]:
        """Claim a task to run it. ``takeover``: this delivery is a redelivery or a retry, so a 'running'
        record belongs to a run that is over and may be taken over."""
        future: asyncio.Future[Claim] = asyncio.get_running_loop().create_future()
        self._pending.claims.append((task_id, takeover, future))
        self._wake.set()
        return future

    def succeed(self, task_id: str, adapter_session_id: str, close_message: bytes) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.succeeded.append((task_id, adapter_session_id, close_message, future))
        self._wake.set()
        return future

    def settle(self, task_id: str, state: str, error: str | None) -> asyncio.Future[None]:
        """Record ``retrying`` or ``dead`` (with the error) for a task that did not succeed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.settled.append((task_id, state, error, future))
        self._wake.set()
        return future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            group, self._pending = self._take()
            if self._pending:
                self._wake.set()
            await self._commit(group)

    def _take(self) -> tuple[_Pending, _Pending]:
        """Up to _MAX_GROUP items, and no task_id twice among the claims (one statement cannot update a
        row twice); the rest wait for the next round trip."""
        pending, group, rest = self._pending, _empty(), _empty()
        seen: set[str] = set()
        for item in pending.claims:
            if item[0] in seen or len(group) >= _MAX_GROUP:
                rest.claims.append(item)
            else:
                seen.add(item[0])
                group.claims.append(item)
        group.succeeded, group.settled = pending.succeeded, pending.settled
        return group, rest

    async def _commit(self, group: _Pending) -> None:
        delay = 0.1
        while True:
            pool = self._pool
            if pool is None:
                self._fail_all(group, LedgerUnavailable("the task ledger is closed"))
                return
            try:
                async with pool.acquire() as conn, conn.transaction():
                    claims = await self._claims(conn, group)
                    if group.succeeded:
                        await conn.execute(
                            _SUCCEED,
                            [t for t, *_ in group.succeeded],
                            [a for _, a, _, _ in group.succeeded],
                            [c for _, _, c, _ in group.succeeded],
                        )
                    if group.settled:
                        await conn.execute(
                            _SETTLE,
                            [t for t, *_ in group.settled],
                            [s for _, s, _, _ in group.settled],
                            [e for _, _, e, _ in group.settled],
                        )
            except _CONNECTION_ERRORS as exc:
                log.warning(
                    "ledger_unreachable_retrying", error=repr(exc), retry_in_s=delay, items=len(group)
                )
            except asyncpg.PostgresError as exc:
                # Not a connection problem: retrying will not help; the tasks stay unacked and requeue.
                log.exception("ledger_statement_failed", error=repr(exc), items=len(group))
                self._fail_all(group, LedgerUnavailable(f"ledger statement failed: {exc!r}"))
                return
            else:
                for task_id, _, future in group.claims:
                    if not future.done():
                        future.set_result(claims[task_id])
                for item in (*group.succeeded, *group.settled):
                    if not item[3].done():
                        item[3].set_result(None)
                return
            if self._stopping.is_set():
                self._fail_all(group, LedgerUnavailable("ledger unreachable and the worker is stopping"))
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _claims(self, conn: asyncpg.Connection, group: _Pending) -> dict[str, Claim]:
        if not group.claims:
            return {}
        ids = [task_id for task_id, _, _ in group.claims]
        takeovers = [task_id for task_id, takeover, _ in group.claims if takeover]
        rows = await conn.fetch(_CLAIM, ids, takeovers, self._worker_id, self._stale_after)
        claims = {row["task_id"]: Claim(attempt=row["attempts"]) for row in rows}
        missing = [t for t in ids if t not in claims]
        if missing:
            for row in await conn.fetch(_REFUSED, missing):
                done = row["state"] == "succeeded"
                claims[row["task_id"]] = Claim(
                    attempt=0, done=done, busy=not done, close_message=row["close_message"]
                )
        return claims

    @staticmethod
    def _fail_all(group: _Pending, error: Exception) -> None:
        for future in group.futures():
            if not future.done():
                future.set_exception(error)
