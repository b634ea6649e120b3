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
import contextlib
import random
import re
import time
from dataclasses import dataclass
from typing import Final, Literal

import orjson
import structlog

from ingestor._batch import Problem, RecordKey, key_of, merge_batch
from ingestor._consumer import Broker, Delivery, Incoming, collect, is_stale
from ingestor._errors import (
    BrokerUnavailable,
    ConfigError,
    FileSuperseded,
    JsonlWriteError,
    MessageRejected,
    RecordsRejected,
    ShutdownDeadline,
    TransientError,
)
from ingestor._jsonl import RollingJsonl
from ingestor._liveness import Liveness
from ingestor._metrics import IngestorMetrics
from ingestor._recovery import Recoverer
from ingestor._settings import IngestorSettings
from ingestor._store import ProblemRow, Store
from schemas import RejectedRecord, TelemetryMessage, encode
from schemas.limits import MAX_INT4

_log = structlog.get_logger("ingestor.service")

_IDLE_WAIT_S: Final = 0.5
_PING_INTERVAL_S: Final = 5.0
_SCHEMA_VERSION_NEEDED: Final = 7  # migrations up to 007_accountability


@dataclass(frozen=True, slots=True)
class Decoded:
    delivery: Delivery
    message: TelemetryMessage
    bare: bool
    """The delivery was this one record (so a dead letter carries the original body)."""

    @property
    def body(self) -> bytes | None:
        """This record's own JSON for its dead letter (None: the delivery's body, when it was this record
        alone, or when the record is nested too deeply to encode again)."""
        if self.bare:
            return None
        try:
            return encode(self.message)
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class Refused:
    """A record the batch could not store, and why."""

    item: Decoded
    problem: Problem


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """What goes to the dead-letter queue: the body (None: the delivery's own), why, and the problem row
    that keeps the reason in Postgres when the record names its session."""

    delivery: Delivery
    body: bytes | None
    reason: str
    adapter_session_id: str | None = None
    task_id: str | None = None
    problem_row: ProblemRow | None = None

    @classmethod
    def refused(cls, refused: Refused) -> DeadLetter:
        message, problem = refused.item.message, refused.problem
        row = ProblemRow(message.adapter_session_id, message.task_id, message.seq, message.kind, problem)
        reason = f"{problem.code}: {problem.reason}"
        return cls(
            refused.item.delivery, refused.item.body, reason, message.adapter_session_id, message.task_id, row
        )

    @classmethod
    def invalid(cls, delivery: Delivery, reject: RejectedRecord) -> DeadLetter:
        """A record of an envelope that failed the contract: its own JSON, and, when it names a session,
        a problem row (the ids are only kept when they are well-formed)."""
        reason = f"record {reject.index}: {reject.error}"
        asid, task_id, seq = _claimed_ids(reject.body)
        row = None
        if asid is not None:
            row = ProblemRow(asid, task_id, seq, None, Problem("invalid", str(reject.error)))
        return cls(delivery, reject.body, reason, asid, task_id, row)


_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,199}$")


def _claimed_ids(body: bytes) -> tuple[str | None, str | None, int]:
    """The session id, task id and seq an invalid record claims, if they look like ids (else None)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None, -1
    if not isinstance(data, dict):
        return None, None, -1
    asid, task_id, seq = data.get("adapter_session_id"), data.get("task_id"), data.get("seq")
    good_asid = asid if isinstance(asid, str) and _ID.match(asid) else None
    good_task = task_id if isinstance(task_id, str) and _ID.match(task_id) else None
    good_seq = seq if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq <= MAX_INT4 else -1
    return good_asid, good_task, good_seq


def _bisect(work: list[list[Decoded]], refused: list[Refused], reason: str) -> None:
    """The part on top of ``work`` failed on data not traced to a record: retry its halves separately, so
    the culprit ends up alone (and is refused with ``reason``)."""
    part = work.pop()
    if len(part) == 1:
        refused.append(Refused(part[0], Problem("rejected", reason)))
    else:
        mid = len(part) // 2
        work.extend([part[mid:], part[:mid]])


def _take_out(part: list[Decoded], problems: dict[RecordKey, Problem]) -> list[Refused]:
    """Remove the records named in ``problems`` from ``part`` (in place); returns them, refused."""
    kept: list[Decoded] = []
    out: list[Refused] = []
    for item in part:
        problem = problems.get(key_of(item.message))
        if problem is None:
            kept.append(item)
        else:
            out.append(Refused(item, problem))
    part[:] = kept
    return out


_Dependency = Literal["postgres", "jsonl"]


@dataclass(slots=True)
class _Outage:
    since: float
    last_log: float


class _Health:
    """Logs trouble by what failed, once per state change and periodically while it lasts: Postgres
    (``postgres.unavailable`` / ``postgres.still_unavailable`` / ``postgres.available``) and the JSONL
    disk (``jsonl.write_failed`` / ``jsonl.still_failing`` / ``jsonl.writable``), each tracked on its own.
    ``failures`` counts consecutive failures of either, for the back-off."""

    _EVENTS: Final[dict[_Dependency, tuple[str, str, str]]] = {
        "postgres": ("postgres.unavailable", "postgres.still_unavailable", "postgres.available"),
        "jsonl": ("jsonl.write_failed", "jsonl.still_failing", "jsonl.writable"),
    }

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._outages: dict[_Dependency, _Outage] = {}
        self.failures = 0

    @staticmethod
    def dependency(err: Exception) -> _Dependency:
        """What failed: a JsonlWriteError is the disk; everything else held and retried is Postgres."""
        return "jsonl" if isinstance(err, JsonlWriteError) else "postgres"

    def failed(self, err: Exception) -> None:
        now = time.monotonic()
        self.failures += 1
        dependency = self.dependency(err)
        first, again, _ = self._EVENTS[dependency]
        outage = self._outages.get(dependency)
        if outage is None:
            self._outages[dependency] = _Outage(since=now, last_log=now)
            _log.warning(first, dependency=dependency, error=str(err), action="holding batch, not acking")
        elif now - outage.last_log >= self._interval_s:
            outage.last_log = now
            _log.warning(again, dependency=dependency, down_s=round(now - outage.since, 1), error=str(err))

    def ok(self, *worked: _Dependency) -> None:
        """Record that ``worked`` (default: both) just succeeded; logs the end of their outages."""
        now = time.monotonic()
        for dependency in worked or ("postgres", "jsonl"):
            outage = self._outages.pop(dependency, None)
            if outage is not None:
                _log.warning(
                    self._EVENTS[dependency][2], dependency=dependency, down_s=round(now - outage.since, 1)
                )
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
    ) -> list[Refused]:
        """Write every item that can be stored; returns the others, each with its reason.

        The records at fault are named when they can be (they do not fit their session, or a field holds
        what storage refuses); when Postgres refuses a batch for a reason not traced to a record, the batch
        is bisected until the culprit is alone. The rest is always written."""
        work: list[list[Decoded]] = [list(items)] if items else []
        refused: list[Refused] = []
        known: dict[str, str] = {}
        while work:
            part = work[-1]
            if not part:
                work.pop()
                continue
            merged = merge_batch((d.message for d in part), known)
            if (
                merged.ambiguous
            ):  # records name different tasks: the stored session decides, else the majority
                try:
                    known.update(await store.owners(merged.ambiguous))
                except TransientError as err:
                    await self._back_off(err)
                    continue
                merged = merge_batch((d.message for d in part), known, decide=True)
            if merged.rejected:
                refused.extend(_take_out(part, merged.rejected))
                continue
            try:
                token = await liveness.ensure()
                target = jsonl.target(token)
                ids = await store.write(merged, target)
            except FileSuperseded:
                jsonl.abandon("finalized by a recoverer")
                continue
            except RecordsRejected as err:
                taken = _take_out(part, err.problems)
                if not taken:  # cannot happen (the keys come from this part); never loop on it
                    _bisect(work, refused, str(err))
                refused.extend(taken)
                continue
            except MessageRejected as err:
                _bisect(work, refused, err.reason)
                continue
            except TransientError as err:
                await self._back_off(err)
                continue
            self._health.ok("postgres")
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

    async def _note_problems(self, store: Store, dead: list[DeadLetter]) -> None:
        """Keep why each dead-lettered record was refused in ``telemetry_problems`` (for the audit)."""
        rows = [d.problem_row for d in dead if d.problem_row is not None]
        while rows:
            try:
                await store.record_problems(rows)
            except TransientError as err:
                await self._back_off(err)
            else:
                return

    async def _handle(
        self, batch: list[Incoming], broker: Broker, store: Store, liveness: Liveness, jsonl: RollingJsonl
    ) -> None:
        """Process one batch; whatever goes wrong, the process goes on: a lost channel or the shutdown
        deadline drops the batch unacked (redelivered), and an unexpected error (a bug) is isolated to the
        delivery that causes it, which is dead-lettered with the error instead of crashing the ingestor
        again on every redelivery."""
        live = [i for i in batch if not is_stale(i.delivery)]
        if len(live) < len(batch):
            _log.warning("batch.stale_deliveries_dropped", count=len(batch) - len(live))
        if not live:
            return
        try:
            await self._process(live, broker, store, liveness, jsonl)
        except (BrokerUnavailable, ShutdownDeadline) as err:
            _log.warning("batch.dropped_unacked", reason=str(err), messages=len(live))
        except Exception as exc:  # noqa: BLE001 -- a bug must not crash the process on a batch it gets again
            if len(live) > 1:
                _log.exception("batch.unexpected_error_isolating", messages=len(live))
                for one in live:
                    await self._handle([one], broker, store, liveness, jsonl)
                return
            _log.exception("message.unexpected_error_dead_lettered", message_id=live[0].delivery.message_id)
            await self._give_up(live[0], exc, broker, store)

    async def _process(
        self, live: list[Incoming], broker: Broker, store: Store, liveness: Liveness, jsonl: RollingJsonl
    ) -> None:
        """One batch's life: decode (done as it arrived) -> write what can be stored (Postgres, one
        transaction; the culprits set aside) -> append the completed sessions' lines and fsync -> note the
        refused records' reasons -> dead-letter them (confirmed) -> ack the batch. A crash anywhere before
        the ack means redelivery, and every step is idempotent."""
        decoded: list[Decoded] = []
        dead: list[DeadLetter] = []
        for incoming in live:
            if incoming.error is not None:
                dead.append(DeadLetter(incoming.delivery, None, str(incoming.error)))
            dead.extend(DeadLetter.invalid(incoming.delivery, r) for r in incoming.rejects)
            decoded.extend(Decoded(incoming.delivery, m, incoming.bare) for m in incoming.records)
        started = time.perf_counter()
        exported_before = self.stats["exported"]
        refused = await self._write(decoded, store, liveness, jsonl)
        dead.extend(DeadLetter.refused(r) for r in refused)
        await self._flush_jsonl(jsonl)
        await self._note_problems(store, dead)
        await self._dead_letter(broker, dead)
        await broker.ack_through(live[-1].delivery)
        self.stats["batches"] += 1
        self.stats["messages"] += len(decoded) - len(refused)
        self.stats["dead_lettered"] += len(dead)
        self.metrics.observe_batch(
            records=len(decoded) - len(refused),
            dead=len(dead),
            exported=self.stats["exported"] - exported_before,
            seconds=time.perf_counter() - started,
            oldest=min((d.message.emitted_at for d in decoded), default=None),
        )

    async def _dead_letter(self, broker: Broker, dead: list[DeadLetter]) -> None:
        for letter in dead:
            await broker.dead_letter(letter.delivery, letter.reason, letter.body)
            _log.warning(
                "message.dead_lettered",
                adapter_session_id=letter.adapter_session_id,
                task_id=letter.task_id,
                reason=letter.reason,
                message_id=letter.delivery.message_id,
                routing_key=letter.delivery.routing_key,
            )

    async def _give_up(self, incoming: Incoming, exc: Exception, broker: Broker, store: Store) -> None:
        """Dead-letter a delivery the ingestor failed on unexpectedly: its original body, the error, and a
        problem row per record it names (best effort: the dead letter itself is what must not be lost)."""
        problem = Problem("rejected", f"the ingestor could not store it: {exc!r}")
        rows = [ProblemRow(m.adapter_session_id, m.task_id, m.seq, m.kind, problem) for m in incoming.records]
        letter = DeadLetter(incoming.delivery, None, f"rejected: {problem.reason}")
        try:
            with contextlib.suppress(TransientError):
                await store.record_problems(rows)
            await self._dead_letter(broker, [letter])
            await broker.ack_through(incoming.delivery)
        except BrokerUnavailable as err:
            _log.warning("batch.dropped_unacked", reason=str(err), messages=1)
        self.stats["dead_lettered"] += 1

    # --- housekeeping -----------------------------------------------------------------------------------

    async def _try_roll(self, jsonl: RollingJsonl) -> bool:
        try:
            await jsonl.roll()
        except TransientError as err:
            self._health.failed(err)
            return False
        self._health.ok()
        return True

    async def _sweep(self, store: Store, liveness: Liveness, jsonl: RollingJsonl) -> None:
        s = self._settings
        try:
            await store.flag_incomplete(s.incomplete_after_s)
            unaccounted = await store.unaccounted(s.accounting_grace_s, s.accounting_lookback_s)
            self.metrics.unaccounted.set(unaccounted)
            if unaccounted:
                _log.warning(
                    "tasks.succeeded_but_not_stored", count=unaccounted, see="python -m producer audit"
                )
            await store.sweep_abandoned()
            target = jsonl.target(await liveness.ensure())
            try:
                jsonl.note_assigned(target, await store.sweep_unassigned(target))
            except FileSuperseded:
                jsonl.abandon("finalized by a recoverer")
            await jsonl.flush()
        except TransientError as err:
            self._health.failed(err)
        except Exception:  # noqa: BLE001 -- housekeeping must not take the service down: logged, retried
            _log.exception("sweep.failed")

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
            except Exception:  # noqa: BLE001 -- a long-lived task never dies silently: logged, retried
                _log.exception("recovery.failed")

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
            except (DatabaseUnreachable, TransientError) as err:
                await self._back_off(err)
                continue
            except MigrationError as err:
                raise ConfigError(f"cannot check migrations: {err}") from err
            try:
                await recoverer.recover_open_files()
                await recoverer.cleanup_tmp(at_start=True)
            except TransientError as err:  # the periodic recovery tries again; never block the start on it
                _log.warning("recovery.postponed", error=str(err))
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
                    serving = asyncio.create_task(
                        self._serve(sink, broker, store, liveness, jsonl, recoverer=recoverer)
                    )
                    await self._until_done_or_deadline(serving)
                finally:
                    for task in (recovery, stopper):
                        task.cancel()
                    await asyncio.gather(recovery, stopper, return_exceptions=True)
        _log.info("ingestor.stopped", **self.stats)

    async def _serve(
        self,
        sink: asyncio.Queue[Incoming],
        broker: Broker,
        store: Store,
        liveness: Liveness,
        jsonl: RollingJsonl,
        *,
        recoverer: Recoverer,
    ) -> None:
        await self._loop(sink, broker, store, liveness, jsonl)
        await self._drain(sink, broker, store, liveness, jsonl)
        await self._finalize(jsonl, recoverer)

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
