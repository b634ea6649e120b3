"""The life of one batch, top to bottom (:meth:`BatchWriter.handle`).

1. The deliveries were decoded as the batch was collected; a body that is not a valid envelope and a
   record that breaks the contract are set aside for the dead-letter queue at once.
2. Write: one PostgreSQL transaction for what can be stored. Records that do not fit their session (another
   task's, after its close) or that storage refuses are named and set aside (``RecordsRejected``); a batch
   PostgreSQL refuses for a reason not traced to a record is bisected until the culprit is alone
   (``MessageRejected``); a file finalized under us by a recoverer means a new file and the same batch
   again (``FileSuperseded``); a dependency away means hold and retry (``TransientError``).
3. Append the lines of the sessions the transaction completed to the open JSONL file and fsync.
4. Note why each set-aside record was refused in ``telemetry_problems`` (what the audit explains with).
5. Dead-letter each one alone with its reason (confirmed).
6. Ack the batch (``multiple=True`` on its last delivery).

A batch's transaction waits on PostgreSQL statement by statement, and its *finish* (steps 3-6) on the
disk and the broker, so up to ``batches_in_flight`` batches are worked on at once: their transactions run
side by side, each on its own pooled connection (two batches with a task in common queue on its task lock,
as two ingestors' do), and their finishes run one at a time, in batch order, so acks stay in order and one
append runs at a time (:meth:`BatchWriter.settle` waits for all of them). The ack is last, so a crash
anywhere before it means redelivery, and every step is idempotent; a batch given back unacked is requeued
at once, so no later batch's ack covers it. An unexpected error (a bug) is isolated to the delivery that
causes it, which is dead-lettered with the error, so no message can crash the ingestor again on every
redelivery.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import time
from dataclasses import dataclass
from datetime import datetime

import orjson
import structlog

from atlas_common import BrokerUnavailable
from ingestor._batch import Problem, RecordKey, key_of, merge_batch
from ingestor._consumer import Broker, Delivery, Incoming, is_stale
from ingestor._errors import (
    FileSuperseded,
    MessageRejected,
    RecordsRejected,
    ShutdownDeadline,
    TransientError,
)
from ingestor._health import Hold
from ingestor._jsonl import RollingJsonl
from ingestor._liveness import Liveness
from ingestor._metrics import IngestorMetrics
from ingestor._store import ProblemRow, Store
from schemas import RejectedRecord, TelemetryMessage, encode
from schemas.limits import MAX_INT4

_log = structlog.get_logger("ingestor.batch")


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


async def _finished(batch: asyncio.Task[None] | None) -> None:
    """Wait until an earlier batch's task is done, without taking its outcome (it raises nothing but
    CancelledError) and without cancelling it when the waiter is cancelled."""
    if batch is not None:
        await asyncio.wait({batch})


@dataclass(frozen=True, slots=True)
class _Stored:
    """A batch whose transaction is done (or refused what it could not store): what its finish needs."""

    live: list[Incoming]
    records: int
    """Records stored (decoded and not refused)."""
    dead: list[DeadLetter]
    started: float
    exported: int
    oldest: datetime | None


class BatchWriter:
    """Writes batches for one ingestor: ``await writer.handle(batch, broker)``, and ``await writer.settle()``
    before anything else touches the open file or the epoch ends; never raises for what a message holds."""

    def __init__(
        self,
        *,
        store: Store,
        liveness: Liveness,
        jsonl: RollingJsonl,
        hold: Hold,
        metrics: IngestorMetrics,
        stats: dict[str, int],
        in_flight: int,
    ) -> None:
        self._store = store
        self._liveness = liveness
        self._jsonl = jsonl
        self._hold = hold
        self._metrics = metrics
        self._stats = stats
        self._in_flight = max(1, in_flight)
        self._batches: collections.deque[asyncio.Task[None]] = collections.deque()

    async def handle(self, batch: list[Incoming], broker: Broker) -> None:
        """Start one batch (its transaction, then its finish: append, problems, dead letters, ack, after
        the batch before it has finished); returns once fewer than ``in_flight`` batches are unfinished,
        so the caller collects the next one meanwhile. Whatever goes wrong, the process goes on: a lost
        channel or the shutdown deadline drops the batch unacked (redelivered), and an unexpected error (a
        bug) is isolated to the delivery that causes it, which is dead-lettered with the error instead of
        crashing the ingestor again on every redelivery."""
        live = [i for i in batch if not is_stale(i.delivery)]
        if len(live) < len(batch):
            _log.warning("batch.stale_deliveries_dropped", count=len(batch) - len(live))
        if not live:
            return
        before = self._batches[-1] if self._batches else None
        self._batches.append(asyncio.create_task(self._run(live, broker, before)))
        while len(self._batches) >= self._in_flight or (self._batches and self._batches[0].done()):
            await self._batches.popleft()

    async def settle(self) -> None:
        """Wait until every batch started is finished (or dropped, or isolated)."""
        while self._batches:
            await self._batches.popleft()

    def cancel(self) -> None:
        """Cancel the unfinished batches without waiting (the service is being cancelled: what they held
        is redelivered)."""
        batches, self._batches = self._batches, collections.deque()
        for task in batches:
            task.cancel()

    async def _run(self, live: list[Incoming], broker: Broker, before: asyncio.Task[None] | None) -> None:
        """One batch from its transaction to its ack; ``before`` (the batch started before it) finishes
        first. Never raises but CancelledError."""
        try:
            stored = await self._store_batch(live)
        except (BrokerUnavailable, ShutdownDeadline) as err:
            await self._drop(live, broker, err)
            return
        except Exception as exc:  # noqa: BLE001 -- a bug must not crash the process on a batch it gets again
            await _finished(before)
            await self._isolate(live, broker, exc)
            return
        await _finished(before)  # acks in order, one append at a time
        try:
            await self._finish(stored, broker)
        except (BrokerUnavailable, ShutdownDeadline) as err:
            await self._drop(live, broker, err)
        except Exception as exc:  # noqa: BLE001 -- as above: isolated, never a crash
            await self._isolate(live, broker, exc)

    async def _drop(self, live: list[Incoming], broker: Broker, err: Exception) -> None:
        """Give a batch back unacked (redelivered): requeued now, so that no later batch's ack covers it."""
        _log.warning("batch.dropped_unacked", reason=str(err), messages=len(live))
        await broker.requeue(i.delivery for i in live)

    async def _isolate(self, live: list[Incoming], broker: Broker, exc: Exception) -> None:
        """Each delivery of a batch that hit an unexpected error again alone, finished at once; the one
        that still fails alone is dead-lettered with the error."""
        if len(live) > 1:
            _log.error("batch.unexpected_error_isolating", messages=len(live), exc_info=exc)
            for one in live:
                await self._handle_alone(one, broker)
            return
        message_id = live[0].delivery.message_id
        _log.error("message.unexpected_error_dead_lettered", message_id=message_id, exc_info=exc)
        await self._give_up(live[0], exc, broker)

    async def _handle_alone(self, incoming: Incoming, broker: Broker) -> None:
        if is_stale(incoming.delivery):
            return
        try:
            await self._finish(await self._store_batch([incoming]), broker)
        except (BrokerUnavailable, ShutdownDeadline) as err:
            await self._drop([incoming], broker, err)
        except Exception as exc:  # noqa: BLE001 -- alone, it is dead-lettered with the error
            await self._isolate([incoming], broker, exc)

    async def _store_batch(self, live: list[Incoming]) -> _Stored:
        """Decode (done as the batch was collected) -> write what can be stored (Postgres, one transaction;
        the culprits set aside, each with its dead letter)."""
        decoded: list[Decoded] = []
        dead: list[DeadLetter] = []
        for incoming in live:
            if incoming.error is not None:
                dead.append(DeadLetter(incoming.delivery, None, str(incoming.error)))
            dead.extend(DeadLetter.invalid(incoming.delivery, r) for r in incoming.rejects)
            decoded.extend(Decoded(incoming.delivery, m, incoming.bare) for m in incoming.records)
        started = time.perf_counter()
        refused, exported = await self._write(decoded)
        dead.extend(DeadLetter.refused(r) for r in refused)
        return _Stored(
            live=live,
            records=len(decoded) - len(refused),
            dead=dead,
            started=started,
            exported=exported,
            oldest=min((d.message.emitted_at for d in decoded), default=None),
        )

    async def _finish(self, stored: _Stored, broker: Broker) -> None:
        """Append the completed sessions' lines and fsync -> note the refused records' reasons ->
        dead-letter them (confirmed) -> ack the batch. A crash anywhere before the ack means redelivery,
        and every step is idempotent."""
        await self._flush_jsonl()
        await self._note_problems(stored.dead)
        await self._dead_letter(broker, stored.dead)
        await broker.ack_through(stored.live[-1].delivery)
        self._stats["batches"] += 1
        self._stats["messages"] += stored.records
        self._stats["dead_lettered"] += len(stored.dead)
        self._stats["exported"] += stored.exported
        self._metrics.observe_batch(
            records=stored.records,
            dead=len(stored.dead),
            exported=stored.exported,
            seconds=time.perf_counter() - stored.started,
            oldest=stored.oldest,
        )

    async def _write(self, items: list[Decoded]) -> tuple[list[Refused], int]:
        """Write every item that can be stored; returns the others, each with its reason, and how many
        sessions the writes assigned to a file.

        The records at fault are named when they can be (they do not fit their session, or a field holds
        what storage refuses); when Postgres refuses a batch for a reason not traced to a record, the batch
        is bisected until the culprit is alone. The rest is always written."""
        work: list[list[Decoded]] = [list(items)] if items else []
        refused: list[Refused] = []
        known: dict[str, str] = {}
        exported = 0
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
                    known.update(await self._store.owners(merged.ambiguous))
                except TransientError as err:
                    await self._hold.failed(err)
                    continue
                merged = merge_batch((d.message for d in part), known, decide=True)
            if merged.rejected:
                refused.extend(_take_out(part, merged.rejected))
                continue
            try:
                token = await self._liveness.ensure()
                target = self._jsonl.target(token)
                ids = await self._store.write(merged, target)
            except FileSuperseded:
                self._jsonl.abandon("finalized by a recoverer", target)
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
                await self._hold.failed(err)
                continue
            self._hold.ok("postgres")
            self._jsonl.note_assigned(target, ids)
            exported += len(ids)
            work.pop()
        return refused, exported

    async def _flush_jsonl(self) -> None:
        while self._jsonl.has_pending:
            try:
                await self._jsonl.flush()
            except TransientError as err:
                await self._hold.failed(err)
            else:
                self._hold.ok()

    async def _note_problems(self, dead: list[DeadLetter]) -> None:
        """Keep why each dead-lettered record was refused in ``telemetry_problems`` (for the audit)."""
        rows = [d.problem_row for d in dead if d.problem_row is not None]
        while rows:
            try:
                await self._store.record_problems(rows)
            except TransientError as err:
                await self._hold.failed(err)
            else:
                return

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

    async def _give_up(self, incoming: Incoming, exc: Exception, broker: Broker) -> None:
        """Dead-letter a delivery the ingestor failed on unexpectedly: its original body, the error, and a
        problem row per record it names (best effort: the dead letter itself is what must not be lost)."""
        problem = Problem("rejected", f"the ingestor could not store it: {exc!r}")
        rows = [ProblemRow(m.adapter_session_id, m.task_id, m.seq, m.kind, problem) for m in incoming.records]
        letter = DeadLetter(incoming.delivery, None, f"rejected: {problem.reason}")
        try:
            with contextlib.suppress(TransientError):
                await self._store.record_problems(rows)
            await self._dead_letter(broker, [letter])
            await broker.ack_through(incoming.delivery)
        except BrokerUnavailable as err:
            await self._drop([incoming], broker, err)
        self._stats["dead_lettered"] += 1
