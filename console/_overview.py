"""The overview page's reading: the pipeline's status (the same function as ``producer status``), rates
over the last minutes and the newest JSONL files. One reading serves every browser for ``refresh_s``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

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

    @property
    def read_time(self) -> datetime:
        return datetime.fromtimestamp(self.read_at, UTC)

    status: PipelineStatus | None
    broker_error: str | None
    rates: _queries.Rates | None
    files: list[Mapping[str, Any]]
    db_error: str | None


class OverviewCache:
    """The newest reading, refreshed at most once per ``max_age_s`` whatever the number of viewers;
    concurrent requests during a refresh wait for that one refresh instead of starting their own."""

    def __init__(self, read: Callable[[], Awaitable[Overview]], max_age_s: float) -> None:
        self._read = read
        self._max_age_s = max_age_s
        self._value: Overview | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> Overview:
        async with self._lock:
            if self._value is None or time.time() - self._value.read_at >= self._max_age_s:
                self._value = await self._read()
            return self._value


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
