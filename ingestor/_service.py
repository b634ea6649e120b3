"""The ingestor service: the main loop, the batch pipeline, holding and retrying, and shutdown.

Per batch: decode (an invalid body or record -> dead letter), write to Postgres in one transaction
(connection trouble -> hold, back off, retry; data refused -> bisect and dead-letter the culprits),
append the completed sessions' lines to the open JSONL file and fsync, publish the dead letters
(confirmed), then ack the last delivery with ``multiple=True``. The ack is the last step, so a crash
anywhere before it means redelivery, and every write is idempotent.

Shutdown (SIGTERM/SIGINT set the stop event), in this order: stop consuming; flush what is held within
``shutdown_grace_s``; finalize the open JSONL file; close the broker, the liveness connection and the pool.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Final

import structlog

from ingestor._batch import merge_batch
from ingestor._consumer import Broker, Delivery, Incoming, collect, is_stale
from ingestor._errors import (
    BrokerUnavailable,
    ConfigError,
    FileSuperseded,
    MessageRejected,
    ShutdownDeadline,
    TransientError,
)
from ingestor._jsonl import RollingJsonl
from ingestor._liveness import Liveness
from ingestor._metrics import IngestorMetrics
from ingestor._recovery import Recoverer
from ingestor._settings import IngestorSettings
from ingestor._store import Store
from schemas import TelemetryMessage, encode

_log = structlog.get_logger("ingestor.service")

_IDLE_WAIT_S: Final = 0.5
_PING_INTERVAL_S: Final = 5.0
_SCHEMA_VERSION_NEEDED: Final = 6  # migrations up to 006_stored_at


@dataclass(frozen=True, slots=True)
class Decoded:
    delivery: Delivery
    message: TelemetryMessage
    bare: bool
    """The delivery was this one record (so a dead letter carries the original body)."""

    @property
    def body(self) -> bytes:
        return self.delivery.body if self.bare else encode(self.message)


class _Health:
    """Logs Postgres trouble once per state change, and periodically while it lasts."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self.down_since: float | None = None
        self._last_log = 0.0
        self.failures = 0

    def failed(self, err: Exception) -> None:
        now = time.monotonic()
        self.failures += 1
        if self.down_since is None:
            self.down_since = self._last_log = now
            _log.warning("postgres.unavailable", error=str(err), action="holding batch, not acking")
        elif now - self._last_log >= self._interval_s:
            self._last_log = now
            _log.warning("postgres.still_unavailable", down_s=round(now - self.down_since, 1), error=str(err))

    def ok(self) -> None:
        if self.down_since is not None:
            _log.warning("postgres.available", down_s=round(time.monotonic() - self.down_since, 1))
        self.down_since = None
        self.failures = 0


class Ingestor:
    """One ingestor process. ``run(stop)`` returns after a clean shutdown once ``stop`` is set."""

    def __init__(self, settings: IngestorSettings, *, metrics: IngestorMetrics | None = None) -> None:
        self._settings = settings
        self.metrics = metrics or IngestorMetrics()
        self._stop = asyncio.Event()
        self._stop_at: float | None = None
        self._health = _Health(settings.db_down_log_interval_s)
        self.stats = {"batches": 0, "messages": 0, "dead_lettered": 0, "exported": 0}

    # --- waiting and backing off ------------------------------------------------------------------------

    def _grace_left(self) -> float | None:
        if not self._stop.is_set():
            return None
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        return self._stop_at + self._settings.shutdown_grace_s - time.monotonic()

    async def _back_off(self, err: Exception) -> None:
        """Sleep before a retry (exponential, capped, jittered); ShutdownDeadline once the grace is over."""
        self._health.failed(err)
        s = self._settings
        delay = min(s.db_retry_backoff_s * 2 ** min(self._health.failures - 1, 20), s.db_retry_backoff_max_s)
        delay *= random.uniform(0.8, 1.0)  # noqa: S311 (jitter, not security)
        left = self._grace_left()
        if left is not None:
            if left <= 0:
                raise ShutdownDeadline(f"gave up after the {s.shutdown_grace_s}s shutdown grace: {err}")
            delay = min(delay, left)
        await asyncio.sleep(delay)

    # --- the batch pipeline -----------------------------------------------------------------------------

    async def _write(
        self, items: list[Decoded], store: Store, liveness: Liveness, jsonl: RollingJsonl
    ) -> list[tuple[Decoded, str]]:
        """Write every item; returns the ones Postgres refused, with the database error."""
        work: list[list[Decoded]] = [items] if items else []
        refused: list[tuple[Decoded, str]] = []
        while work:
            part = work[-1]
            try:
                token = await liveness.ensure()
                target = jsonl.target(token)
                ids = await store.write(merge_batch(d.message for d in part), target)
            except FileSuperseded:
                jsonl.abandon("finalized by a recoverer")
                continue
            except MessageRejected as err:
                work.pop()
                if len(part) == 1:
                    refused.append((part[0], err.reason))
                else:  # bisect: the halves are retried separately, the culprit ends up alone
                    mid = len(part) // 2
                    work.extend([part[mid:], part[:mid]])
                continue
            except TransientError as err:
                await self._back_off(err)
                continue
            self._health.ok()
            jsonl.note_assigned(target, ids)
            self.stats["exported"] += len(ids)
            work.pop()
        return refused

    async def _flush_jsonl(self, jsonl: RollingJsonl) -> None:
        while jsonl.has_pending:
            try:
                await jsonl.flush()
            except TransientError as err:
                await self._back_off(err)
            else:
                self._health.ok()

    async def _handle(
        self, batch: list[Incoming], broker: Broker, store: Store, liveness: Liveness, jsonl: RollingJsonl
    ) -> None:
        live = [i for i in batch if not is_stale(i.delivery)]
        if len(live) < len(batch):
            _log.warning("batch.stale_deliveries_dropped", count=len(batch) - len(live))
        if not live:
            return
        decoded: list[Decoded] = []
        # (delivery, body to dead-letter (None: the original), reason, adapter_session_id)
        dead: list[tuple[Delivery, bytes | None, str, str | None]] = []
        for incoming in live:
            if incoming.error is not None:
                dead.append((incoming.delivery, None, str(incoming.error), None))
            dead.extend(
                (incoming.delivery, r.body, f"record {r.index}: {r.error}", None) for r in incoming.rejects
            )
            decoded.extend(Decoded(incoming.delivery, m, incoming.bare) for m in incoming.records)
        started = time.perf_counter()
        exported_before = self.stats["exported"]
        try:
            refused = await self._write(decoded, store, liveness, jsonl)
            dead.extend((d.delivery, d.body, reason, d.message.adapter_session_id) for d, reason in refused)
            await self._flush_jsonl(jsonl)
            for delivery, body, reason, adapter_session_id in dead:
                await broker.dead_letter(delivery, reason, body)
                _log.warning(
                    "message.dead_lettered",
                    adapter_session_id=adapter_session_id,
                    reason=reason,
                    message_id=delivery.message_id,
                    routing_key=delivery.routing_key,
                )
            await broker.ack_through(live[-1].delivery)
        except BrokerUnavailable as err:
            _log.warning("batch.dropped_unacked", reason=str(err), messages=len(live))
            return
        except ShutdownDeadline as err:
            _log.warning("batch.dropped_unacked", reason=str(err), messages=len(live))
            return
        self.stats["batches"] += 1
        self.stats["messages"] += len(decoded)
        self.stats["dead_lettered"] += len(dead)
        self.metrics.observe_batch(
            records=len(decoded),
            dead=len(dead),
            exported=self.stats["exported"] - exported_before,
            seconds=time.perf_counter() - started,
            oldest=min((d.message.emitted_at for d in decoded), default=None),
        )

    # --- housekeeping -----------------------------------------------------------------------------------

    async def _try_roll(self, jsonl: RollingJsonl) -> bool:
        try:
            await jsonl.roll()
        except TransientError as err:
            self._health.failed(err)
            return False
        return True

    async def _sweep(self, store: Store, liveness: Liveness, jsonl: RollingJsonl) -> None:
        try:
            await store.sweep_abandoned()
            target = jsonl.target(await liveness.ensure())
            try:
                jsonl.note_assigned(target, await store.sweep_unassigned(target))
            except FileSuperseded:
                jsonl.abandon("finalized by a recoverer")
            await jsonl.flush()
        except TransientError as err:
            self._health.failed(err)

    async def _recovery_loop(self, recoverer: Recoverer) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self._settings.recovery_interval_s)
            except TimeoutError:
                pass
            else:
                return
            try:
                await recoverer.recover_open_files()
                await recoverer.cleanup_tmp(at_start=False)
            except TransientError as err:
                _log.info("recovery.postponed", error=str(err))

    async def _start_checks(self, store: Store, recoverer: Recoverer) -> None:
        """Wait for Postgres, check the schema, then clean up and recover what dead owners left."""
        from migrations import DatabaseUnreachable, MigrationError, migration_status

        while True:
            try:
                status = await migration_status(
                    self._settings.database_url, connect_timeout_s=self._settings.db_connect_timeout_s
                )
                missing = [m.filename for m in status.pending if m.version <= _SCHEMA_VERSION_NEEDED]
                if missing or not await store.check_schema():
                    raise ConfigError(
                        f"database schema is not migrated ({', '.join(missing)}): run atlas-migrate"
                    )
                await recoverer.recover_open_files()
                await recoverer.cleanup_tmp(at_start=True)
            except (DatabaseUnreachable, TransientError) as err:
                await self._back_off(err)
                continue
            except MigrationError as err:
                raise ConfigError(f"cannot check migrations: {err}") from err
            self._health.ok()
            return

    # --- run --------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then shut down in order. Raises ConfigError if it cannot start."""
        self._stop = stop
        s = self._settings
        try:
            s.jsonl_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create jsonl_dir {s.jsonl_dir}: {err}") from err
        sink: asyncio.Queue[Incoming] = asyncio.Queue()
        async with Store(s) as store, Liveness(s) as liveness:
            recoverer = Recoverer(s, store, liveness)
            jsonl = RollingJsonl(s, store)
            try:
                await self._start_checks(store, recoverer)
            except ShutdownDeadline:
                return
            _log.info(
                "ingestor.started",
                ingestor_id=s.ingestor_id,
                jsonl_dir=str(s.jsonl_dir),
                batch_max_messages=s.batch_max_messages,
                flush_interval_s=s.flush_interval_s,
            )
            broker = Broker(s, sink, stop)
            try:
                await broker.open()
            except BrokerUnavailable:
                if stop.is_set():
                    return
                raise
            async with broker:
                recovery = asyncio.create_task(self._recovery_loop(recoverer))
                stopper = asyncio.create_task(self._stop_consuming_on_stop(broker))
                try:
                    await broker.start()
                    await self._loop(sink, broker, store, liveness, jsonl)
                    await self._drain(sink, broker, store, liveness, jsonl)
                    await self._finalize(jsonl, recoverer)
                finally:
                    for task in (recovery, stopper):
                        task.cancel()
                    await asyncio.gather(recovery, stopper, return_exceptions=True)
        _log.info("ingestor.stopped", **self.stats)

    async def _stop_consuming_on_stop(self, broker: Broker) -> None:
        await self._stop.wait()
        await broker.stop()

    async def _loop(
        self,
        sink: asyncio.Queue[Incoming],
        broker: Broker,
        store: Store,
        liveness: Liveness,
        jsonl: RollingJsonl,
    ) -> None:
        s = self._settings
        now = time.monotonic()
        next_ping, next_sweep = now + _PING_INTERVAL_S, now + s.sweep_interval_s
        while not self._stop.is_set():
            batch = await collect(
                sink,
                max_messages=s.batch_max_messages,
                flush_interval_s=s.flush_interval_s,
                wait_s=_IDLE_WAIT_S,
            )
            if batch:
                await self._handle(batch, broker, store, liveness, jsonl)
            if jsonl.roll_due():
                await self._try_roll(jsonl)
            now = time.monotonic()
            if now >= next_ping:
                next_ping = now + _PING_INTERVAL_S
                await liveness.ping()
            if now >= next_sweep:
                next_sweep = now + s.sweep_interval_s
                await self._sweep(store, liveness, jsonl)

    async def _drain(
        self,
        sink: asyncio.Queue[Incoming],
        broker: Broker,
        store: Store,
        liveness: Liveness,
        jsonl: RollingJsonl,
    ) -> None:
        """Flush what is held (already received), within the grace period."""
        s = self._settings
        while not sink.empty() and (self._grace_left() or 0) > 0:
            batch = await collect(sink, max_messages=s.batch_max_messages, flush_interval_s=0, wait_s=0)
            await self._handle(batch, broker, store, liveness, jsonl)
        if not sink.empty():
            _log.warning("shutdown.left_unacked", messages=sink.qsize())

    async def _finalize(self, jsonl: RollingJsonl, recoverer: Recoverer) -> None:
        """Finalize the open file (retrying within the grace period), then a last recovery and clean-up."""
        while jsonl.current_name is not None:
            try:
                await jsonl.roll()
            except TransientError as err:
                try:
                    await self._back_off(err)
                except ShutdownDeadline:
                    _log.warning("shutdown.file_left_open", file=jsonl.current_name, reason=str(err))
                    return
        try:
            await recoverer.recover_open_files()
            await recoverer.cleanup_tmp(at_start=False)
        except TransientError as err:
            _log.info("recovery.postponed", error=str(err))
