"""The overview page's reading: the pipeline's status (the same function as ``producer status``), rates
over the last minutes and the newest JSONL files. One reading serves every browser, renewed in the
background (:class:`OverviewCache`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg
import structlog

from atlas_common import BROKER_ERRORS, BrokerUnavailable, scrub_secrets
from console import _queries
from console._settings import ConsoleSettings
from producer import PipelineStatus, collect_status

_log = structlog.get_logger("console.overview")


@dataclass(frozen=True, slots=True)
class Overview:
    read_at: float
    """``time.time()`` of the reading."""
    status: PipelineStatus | None
    broker_error: str | None
    rates: _queries.Rates | None
    files: list[Mapping[str, Any]]
    db_error: str | None

    @property
    def read_time(self) -> datetime:
        return datetime.fromtimestamp(self.read_at, UTC)


COST_FACTOR: Final = 10.0
"""A reading is renewed no sooner than this many times its own duration after it: the overview's counts
scan the tables (seconds at a million sessions), and an open console must not keep PostgreSQL busy."""


class OverviewCache:
    """The newest reading, shared by every viewer. Only the first request waits for a reading; later ones
    get the newest one at once, and one that finds it older than ``min_age_s`` (or than ``COST_FACTOR``
    times the last reading's duration, whichever is longer) starts one renewal in the background."""

    def __init__(self, read: Callable[[], Awaitable[Overview]], min_age_s: float) -> None:
        self._read = read
        self._min_age_s = min_age_s
        self._value: Overview | None = None
        self._last_duration_s = 0.0
        self._lock = asyncio.Lock()
        self._renewal: asyncio.Task[None] | None = None

    @property
    def interval_s(self) -> float:
        """How old the reading may get before a request renews it."""
        return max(self._min_age_s, COST_FACTOR * self._last_duration_s)

    async def get(self) -> Overview:
        if self._value is None:
            async with self._lock:
                if self._value is None:
                    await self._renew()
        assert self._value is not None  # noqa: S101 - _renew always sets it
        stale = time.time() - self._value.read_at >= self.interval_s
        if stale and (self._renewal is None or self._renewal.done()):
            self._renewal = asyncio.create_task(self._renew_quietly())
        return self._value

    async def _renew(self) -> None:
        started = time.monotonic()
        value = await self._read()
        self._last_duration_s = time.monotonic() - started
        self._value = value

    async def _renew_quietly(self) -> None:
        try:
            await self._renew()
        except Exception:  # noqa: BLE001 - a bug in a reading: the page keeps the last one, the log says why
            _log.exception("console.overview_reading_failed")

    async def close(self) -> None:
        """Cancel a renewal in progress (the application is shutting down); safe twice."""
        task, self._renewal = self._renewal, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def read_overview(settings: ConsoleSettings, pool: asyncpg.Pool) -> Overview:
    status: PipelineStatus | None = None
    broker_error = None
    try:
        status = await collect_status(
            settings.amqp_url,
            settings.topology(),
            settings.database_url,
            connect_timeout_s=settings.db_timeout_s,
            db_timeout_s=settings.db_timeout_s,
        )
    except (BrokerUnavailable, *BROKER_ERRORS) as exc:
        broker_error = scrub_secrets(str(exc) or type(exc).__name__, settings.amqp_url)
        _log.warning("console.broker_unreachable", error=broker_error)
    rates = None
    files: list[Mapping[str, Any]] = []
    db_error = None
    try:
        async with pool.acquire() as conn:
            rates = await _queries.rates(conn)
            files = await _queries.newest_files(conn)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        db_error = scrub_secrets(str(exc) or type(exc).__name__, settings.database_url)
        _log.warning("console.database_error", error=db_error)
    return Overview(time.time(), status, broker_error, rates, files, db_error)
