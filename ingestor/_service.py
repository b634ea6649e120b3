"""The ingestor process: start-up checks, the broker epochs, the main loop, housekeeping, and shutdown.

The life of one batch is :class:`ingestor._batches.BatchWriter`; holding and retrying while a dependency
is away is :class:`ingestor._health.Hold`. This module runs them:

- *Start*: wait for PostgreSQL, refuse a schema that is behind, recover what dead owners left (never
  blocking the start on it: the periodic recovery tries again).
- *Epochs*: one broker connection at a time (``_consumer.Broker``). A lost connection ends the epoch: what
  it held is dropped unacked (redelivered; every write is idempotent) and a new connection is opened with
  backoff, the worker's reconnect model.
- *Main loop*: batches by size or age (a batch's finish, its append and ack, runs on during the next
  batch's transaction, and is waited for before the roll, a sweep and the epoch's end), the JSONL roll, the
  liveness ping, the sweeps (abandoned sessions, unassigned ones, incomplete ones flagged, the
  accountability gauge).
- *Shutdown* (SIGTERM/SIGINT set the stop event), in this order: stop consuming; flush what is held within
  ``shutdown_grace_s``; finalize the open JSONL file; close the broker, the liveness connection and the
  pool. The whole of it is bounded by the grace even if a database call hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Final

import structlog

from atlas_common import Backoff, BrokerUnavailable, sleep_unless
from ingestor._batches import BatchWriter
from ingestor._consumer import Broker, collect, parse
from ingestor._errors import ConfigError, FileSuperseded, ShutdownDeadline, TransientError
from ingestor._health import Hold
from ingestor._jsonl import RollingJsonl
from ingestor._liveness import Liveness
from ingestor._metrics import IngestorMetrics
from ingestor._recovery import Recoverer
from ingestor._settings import IngestorSettings
from ingestor._store import Store
from ingestor._stream import SessionStream

_log = structlog.get_logger("ingestor.service")

_IDLE_WAIT_S: Final = 0.5
_PING_INTERVAL_S: Final = 5.0
_SCHEMA_VERSION_NEEDED: Final = 7  # migrations up to 007_accountability


@dataclass(frozen=True, slots=True)
class _Parts:
    """What lives as long as the process: the pool, the liveness lock, the open file, the writer."""

    store: Store
    liveness: Liveness
    jsonl: RollingJsonl
    recoverer: Recoverer
    writer: BatchWriter


class Ingestor:
    """One ingestor process. ``run(stop)`` returns after a clean shutdown once ``stop`` is set."""

    def __init__(self, settings: IngestorSettings, *, metrics: IngestorMetrics | None = None) -> None:
        self._settings = settings
        self.metrics = metrics or IngestorMetrics()
        self._stop = asyncio.Event()
        self._hold = Hold(settings, self._stop)
        self.stats = {"batches": 0, "messages": 0, "dead_lettered": 0, "exported": 0}

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then shut down in order. Raises ConfigError if it cannot start."""
        self._stop = stop
        s = self._settings
        self._hold = Hold(s, stop)
        try:
            s.jsonl_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create jsonl_dir {s.jsonl_dir}: {err}") from err
        async with Store(s) as store, Liveness(s) as liveness, SessionStream(s) as stream:
            jsonl = RollingJsonl(s, store, stream=stream)
            writer = BatchWriter(
                store=store,
                liveness=liveness,
                jsonl=jsonl,
                hold=self._hold,
                metrics=self.metrics,
                stats=self.stats,
                in_flight=s.batches_in_flight,
            )
            parts = _Parts(store, liveness, jsonl, Recoverer(s, store, liveness, stream), writer)
            try:
                await self._start_checks(parts)
            except ShutdownDeadline:
                return
            _log.info(
                "ingestor.started",
                ingestor_id=s.ingestor_id,
                jsonl_dir=str(s.jsonl_dir),
                batch_max_messages=s.batch_max_messages,
                flush_interval_s=s.flush_interval_s,
                sessions_stream=s.topology().sessions_stream if s.stream_enabled else None,
            )
            recovery = asyncio.create_task(self._recovery_loop(parts.recoverer))
            try:
                await self._until_done_or_deadline(asyncio.create_task(self._serve(parts)))
            finally:
                recovery.cancel()
                await asyncio.gather(recovery, return_exceptions=True)
        _log.info("ingestor.stopped", **self.stats)

    async def _serve(self, parts: _Parts) -> None:
        """Epochs until stop: connect (with backoff), consume, run the loop; drain on stop; finalize."""
        backoff = Backoff(initial_s=0.5, max_s=10.0)
        while not self._stop.is_set():
            try:
                async with Broker(self._settings) as broker:
                    await broker.start()
                    backoff.reset()
                    await self._epoch(broker, parts)
            except BrokerUnavailable as err:
                _log.warning("broker.unavailable", error=str(err))
                await sleep_unless(self._stop, backoff.next())
        await self._finalize(parts)

    async def _epoch(self, broker: Broker, parts: _Parts) -> None:
        """One connection's life: the main loop until stop or a lost connection; on stop, the drain."""
        stopper = asyncio.create_task(self._stop_consuming_on_stop(broker))
        try:
            await self._loop(broker, parts)
            if self._stop.is_set():
                await self._drain(broker, parts)
        except asyncio.CancelledError:  # the shutdown deadline: what is unacked is redelivered
            parts.writer.cancel()
            raise
        finally:
            # The last batch's finish acks on this epoch's channel (after an error that ack fails, is
            # logged, and the batch is redelivered).
            await parts.writer.settle()
            stopper.cancel()
            await asyncio.gather(stopper, return_exceptions=True)
        if broker.lost.is_set() and not self._stop.is_set():
            _log.warning("broker.connection_lost_reconnecting", dropped=broker.sink.qsize())

    async def _until_done_or_deadline(self, serving: asyncio.Task[None]) -> None:
        """Wait for the service to finish; once stop is set it gets the shutdown grace (and a little more)
        to drain and finalize, even if a database call hangs (a silent network): then it is cancelled.
        What it held is redelivered; a file it left open is finished by a recoverer."""
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({serving, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not serving.done():
            done, _ = await asyncio.wait({serving}, timeout=self._settings.shutdown_grace_s + 5)
            if not done:
                _log.warning("shutdown.deadline_cancelling", grace_s=self._settings.shutdown_grace_s)
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving
                return
        await serving  # its exception, if any, is the service's

    async def _stop_consuming_on_stop(self, broker: Broker) -> None:
        await self._stop.wait()
        await broker.stop()

    async def _loop(self, broker: Broker, parts: _Parts) -> None:
        """Batches, and housekeeping between them, until stop is set or the connection is lost."""
        s = self._settings
        now = time.monotonic()
        next_ping, next_sweep = now + _PING_INTERVAL_S, now + s.sweep_interval_s
        while not self._stop.is_set() and not broker.lost.is_set():
            batch = await collect(
                broker.sink,
                parse,
                max_messages=s.batch_max_messages,
                flush_interval_s=s.flush_interval_s,
                wait_s=_IDLE_WAIT_S,
            )
            if batch:
                await parts.writer.handle(batch, broker)
            else:
                await parts.writer.settle()
            if parts.jsonl.roll_due():
                await parts.writer.settle()  # the roll appends what is pending itself: one append at a time
                await self._try_roll(parts.jsonl)
            now = time.monotonic()
            if now >= next_ping:
                next_ping = now + _PING_INTERVAL_S
                await parts.liveness.ping()
            if now >= next_sweep:
                next_sweep = now + s.sweep_interval_s
                await parts.writer.settle()  # the sweep assigns and appends too
                await self._sweep(parts)

    async def _drain(self, broker: Broker, parts: _Parts) -> None:
        """Flush what is held (already received), within the grace period."""
        sink = broker.sink
        while not sink.empty() and (self._hold.grace_left() or 0) > 0:
            batch = await collect(
                sink, parse, max_messages=self._settings.batch_max_messages, flush_interval_s=0, wait_s=0
            )
            await parts.writer.handle(batch, broker)
        if not sink.empty():
            _log.warning("shutdown.left_unacked", messages=sink.qsize())

    async def _finalize(self, parts: _Parts) -> None:
        """Finalize the open file (retrying within the grace period), then a last recovery and clean-up."""
        jsonl = parts.jsonl
        while jsonl.current_name is not None:
            try:
                await jsonl.roll()
            except TransientError as err:
                try:
                    await self._hold.failed(err)
                except ShutdownDeadline:
                    _log.warning("shutdown.file_left_open", file=jsonl.current_name, reason=str(err))
                    return
        try:
            await parts.recoverer.recover_open_files()
            await parts.recoverer.cleanup_tmp(at_start=False)
        except TransientError as err:
            _log.info("recovery.postponed", error=str(err))

    # --- start and housekeeping -------------------------------------------------------------------------

    async def _start_checks(self, parts: _Parts) -> None:
        """Wait for Postgres, check the schema, then clean up and recover what dead owners left."""
        from migrations import DatabaseUnreachable, MigrationError, migration_status

        while True:
            try:
                status = await migration_status(
                    self._settings.database_url, connect_timeout_s=self._settings.db_connect_timeout_s
                )
                missing = [m.filename for m in status.pending if m.version <= _SCHEMA_VERSION_NEEDED]
                if missing or not await parts.store.check_schema():
                    raise ConfigError(
                        f"database schema is not migrated ({', '.join(missing)}): run atlas-migrate"
                    )
            except (DatabaseUnreachable, TransientError) as err:
                await self._hold.failed(err)
                continue
            except MigrationError as err:
                raise ConfigError(f"cannot check migrations: {err}") from err
            try:
                await parts.recoverer.recover_open_files()
                await parts.recoverer.cleanup_tmp(at_start=True)
            except TransientError as err:  # the periodic recovery tries again; never block the start on it
                _log.warning("recovery.postponed", error=str(err))
            self._hold.ok()
            return

    async def _try_roll(self, jsonl: RollingJsonl) -> bool:
        try:
            await jsonl.roll()
        except TransientError as err:
            self._hold.note(err)
            return False
        self._hold.ok()
        return True

    async def _sweep(self, parts: _Parts) -> None:
        s, store, jsonl = self._settings, parts.store, parts.jsonl
        try:
            await store.flag_incomplete(s.incomplete_after_s)
            unaccounted = await store.unaccounted(s.accounting_grace_s, s.accounting_lookback_s)
            self.metrics.unaccounted.set(unaccounted)
            if unaccounted:
                _log.warning("tasks.succeeded_not_stored", count=unaccounted, see="python -m producer audit")
            await store.sweep_abandoned()
            target = jsonl.target(await parts.liveness.ensure())
            try:
                jsonl.note_assigned(target, await store.sweep_unassigned(target))
            except FileSuperseded:
                jsonl.abandon("finalized by a recoverer", target)
            await jsonl.flush()
        except TransientError as err:
            self._hold.note(err)
        except Exception:  # noqa: BLE001 -- housekeeping must not take the service down: logged, retried
            _log.exception("sweep.failed")

    async def _recovery_loop(self, recoverer: Recoverer) -> None:
        while not await sleep_unless(self._stop, self._settings.recovery_interval_s):
            try:
                await recoverer.recover_open_files()
                await recoverer.cleanup_tmp(at_start=False)
            except TransientError as err:
                _log.info("recovery.postponed", error=str(err))
            except Exception:  # noqa: BLE001 -- a long-lived task never dies silently: logged, retried
                _log.exception("recovery.failed")
