"""Holding and retrying: how the ingestor waits out PostgreSQL or the JSONL disk being away.

Nothing is acked while a dependency fails; the work is retried after a backoff (``atlas_common.Backoff``)
until it succeeds or, once the process is stopping, until the shutdown grace is over
(:class:`~ingestor._errors.ShutdownDeadline`). Trouble is logged by what failed, once per state change and
periodically while it lasts: PostgreSQL (``postgres.unavailable`` / ``postgres.still_unavailable`` /
``postgres.available``) and the JSONL disk (``jsonl.write_failed`` / ``jsonl.still_failing`` /
``jsonl.writable``), each tracked on its own.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Final, Literal

import structlog

from atlas_common import Backoff
from ingestor._errors import JsonlWriteError, ShutdownDeadline
from ingestor._settings import IngestorSettings

_log = structlog.get_logger("ingestor.health")

Dependency = Literal["postgres", "jsonl"]
_EVENTS: Final[dict[Dependency, tuple[str, str, str]]] = {
    "postgres": ("postgres.unavailable", "postgres.still_unavailable", "postgres.available"),
    "jsonl": ("jsonl.write_failed", "jsonl.still_failing", "jsonl.writable"),
}


@dataclass(slots=True)
class _Outage:
    since: float
    last_log: float


def dependency_of(err: Exception) -> Dependency:
    """What failed: a JsonlWriteError is the disk; everything else held and retried is PostgreSQL."""
    return "jsonl" if isinstance(err, JsonlWriteError) else "postgres"


class Hold:
    """``await hold.failed(err)`` logs and waits before the caller retries; ``hold.ok(...)`` after a
    success. ``stop`` is the process's stop event: the grace counts from when it is set."""

    def __init__(self, settings: IngestorSettings, stop: asyncio.Event) -> None:
        self._settings = settings
        self._stop = stop
        self._stop_at: float | None = None
        self._backoff = Backoff(initial_s=settings.db_retry_backoff_s, max_s=settings.db_retry_backoff_max_s)
        self._outages: dict[Dependency, _Outage] = {}

    def grace_left(self) -> float | None:
        """Seconds of shutdown grace left (None while not stopping)."""
        if not self._stop.is_set():
            return None
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        return self._stop_at + self._settings.shutdown_grace_s - time.monotonic()

    def note(self, err: Exception) -> None:
        """Log a failure (without waiting): for housekeeping that simply tries again next round."""
        now = time.monotonic()
        dependency = dependency_of(err)
        first, again, _ = _EVENTS[dependency]
        outage = self._outages.get(dependency)
        if outage is None:
            self._outages[dependency] = _Outage(since=now, last_log=now)
            _log.warning(first, dependency=dependency, error=str(err), action="holding batch, not acking")
        elif now - outage.last_log >= self._settings.db_down_log_interval_s:
            outage.last_log = now
            _log.warning(again, dependency=dependency, down_s=round(now - outage.since, 1), error=str(err))

    async def failed(self, err: Exception) -> None:
        """Log the failure and sleep before a retry; ShutdownDeadline once the shutdown grace is over."""
        self.note(err)
        delay = self._backoff.next()
        left = self.grace_left()
        if left is not None:
            if left <= 0:
                raise ShutdownDeadline(
                    f"gave up after the {self._settings.shutdown_grace_s}s shutdown grace: {err}"
                )
            delay = min(delay, left)
        await asyncio.sleep(delay)

    def ok(self, *worked: Dependency) -> None:
        """Record that ``worked`` (default: both) just succeeded; logs the end of their outages."""
        now = time.monotonic()
        for dependency in worked or ("postgres", "jsonl"):
            outage = self._outages.pop(dependency, None)
            if outage is not None:
                _log.warning(
                    _EVENTS[dependency][2], dependency=dependency, down_s=round(now - outage.since, 1)
                )
        self._backoff.reset()
