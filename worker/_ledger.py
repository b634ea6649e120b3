"""The task ledger in PostgreSQL: where task_id idempotency is enforced (see migrations/sql/005).

Every call retries connection failures with capped exponential backoff until it succeeds or the worker
stops: while the database is away the worker holds its tasks (unacked) instead of running them blind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self, TypeVar

import asyncpg
import structlog

from atlas_common import redact_url
from worker._errors import WorkerError

log = structlog.get_logger("worker.ledger")
T = TypeVar("T")

_CONNECTION_ERRORS: Final = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    TimeoutError,
)

_CLAIM: Final = """
INSERT INTO task_ledger AS l (task_id, state, attempts, worker_id)
VALUES ($1, 'running', 1, $2)
ON CONFLICT (task_id) DO UPDATE
    SET state = 'running', attempts = l.attempts + 1, worker_id = EXCLUDED.worker_id, updated_at = now()
    WHERE l.state <> 'succeeded'
RETURNING attempts
"""
_SUCCEEDED: Final = "SELECT adapter_session_id, close_message FROM task_ledger WHERE task_id = $1"
_SUCCEED: Final = """
UPDATE task_ledger SET state = 'succeeded', adapter_session_id = $2, close_message = $3, last_error = NULL,
    updated_at = now()
WHERE task_id = $1
"""
_SETTLE: Final = "UPDATE task_ledger SET state = $2, last_error = $3, updated_at = now() WHERE task_id = $1"


class LedgerUnavailable(WorkerError):
    """The ledger database cannot be reached at start-up."""


@dataclass(frozen=True, slots=True)
class Claim:
    """``attempt`` >= 1: run it. ``done``: it already succeeded (``close_message`` is its stored close)."""

    attempt: int
    done: bool = False
    close_message: bytes | None = None


class TaskLedger:
    """``async with TaskLedger(url) as ledger``: claim, succeed, settle; ``close()`` is safe twice."""

    def __init__(
        self, database_url: str, *, pool_size: int = 4, stopping: asyncio.Event | None = None
    ) -> None:
        self._url = database_url
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._stopping = stopping or asyncio.Event()

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

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def claim(self, task_id: str, worker_id: str) -> Claim:
        async def run(conn: asyncpg.Connection) -> Claim:
            attempts = await conn.fetchval(_CLAIM, task_id, worker_id)
            if attempts is not None:
                return Claim(attempt=int(attempts))
            row = await conn.fetchrow(_SUCCEEDED, task_id)
            return Claim(attempt=0, done=True, close_message=None if row is None else row["close_message"])

        return await self._retrying("claim", run)

    async def succeed(self, task_id: str, adapter_session_id: str, close_message: bytes) -> None:
        async def run(conn: asyncpg.Connection) -> None:
            await conn.execute(_SUCCEED, task_id, adapter_session_id, close_message)

        await self._retrying("succeed", run)

    async def settle(self, task_id: str, state: str, error: str | None) -> None:
        """Record ``retrying`` or ``dead`` (with the error) for a task that did not succeed."""

        async def run(conn: asyncpg.Connection) -> None:
            await conn.execute(_SETTLE, task_id, state, error)

        await self._retrying("settle", run)

    async def _retrying(self, what: str, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        delay = 0.1
        while True:
            pool = self._pool
            if pool is None:
                raise LedgerUnavailable("the task ledger is closed")
            try:
                async with pool.acquire() as conn:
                    return await fn(conn)
            except _CONNECTION_ERRORS as exc:
                log.warning("ledger_unreachable_retrying", operation=what, error=repr(exc), retry_in_s=delay)
            if self._stopping.is_set():
                raise LedgerUnavailable(f"ledger {what} abandoned: the worker is stopping")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
