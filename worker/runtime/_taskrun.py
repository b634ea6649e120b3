"""The life of one task delivery, in one object that reads top to bottom.

1. decode the message (invalid -> dead letter) and resolve its adapter (unknown -> dead letter);
2. claim the task in the ledger (already succeeded -> its stored close is re-published, ack; a live run
   holds it -> ack as a duplicate; see ``_claim`` for redeliveries);
3. run the adapter session, streaming opened and step records;
4. wait until the broker confirmed every record but the close;
5. record the outcome in the ledger (success carries the close's bytes);
6. publish the close and wait for its confirm;
7. return the outcome; the runtime settles it (ack, retry, dead letter) in one place (``_policy.Settler``).

A kill anywhere is repaired on redelivery: before 5 the task runs again (the ingestor marks the cut-off
session abandoned); after 5 the redelivery finds it succeeded and re-publishes the stored close. The
failure paths sit beside the step they leave from: an adapter failure or a timeout publishes a failed
close and settles the ledger (``_failed``); cancellation (shutdown, lost broker) publishes an abandoned
close and releases the claim (``_abandon``); a run whose claim another run took over stands down
(``_superseded``).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Final

import structlog
from structlog.contextvars import bound_contextvars

from atlas_common import BROKER_ERRORS, Delivery
from schemas import DecodeError, TaskMessage, cut_chars, decode_task, limits
from worker.runtime._batcher import TelemetryBatcher
from worker.runtime._ledger import LedgerUnavailable, TaskLedger
from worker.runtime._ledger_group import Claim, SettleState
from worker.runtime._metrics import WorkerMetrics
from worker.runtime._policy import Ack, DeadLetter, Outcome, Retry, after_failure, retries_so_far
from worker.runtime._registry import AdapterRegistry
from worker.runtime._settings import WorkerSettings
from worker.runtime._telemetry import TelemetryError, TelemetryPublisher, republish_close
from worker.sessions import AdapterError, Student

log = structlog.get_logger("worker")

CLEANUP_TIMEOUT_S: Final = 5.0
_INFRA: Final = (TelemetryError, LedgerUnavailable, *BROKER_ERRORS)
_CLEANUP_ERRORS: Final = (*_INFRA, TimeoutError, RuntimeError)


@dataclass(frozen=True, slots=True)
class Services:
    """What every task run of one broker connection uses."""

    settings: WorkerSettings
    registry: AdapterRegistry
    ledger: TaskLedger
    batcher: TelemetryBatcher
    metrics: WorkerMetrics


class TaskRun:
    """``outcome = await TaskRun(message, services).run()``."""

    def __init__(self, message: Delivery, services: Services) -> None:
        self._message = message
        self._services = services

    async def run(self) -> Outcome:
        # 1. decode and resolve
        try:
            task = decode_task(self._message.body)
        except DecodeError as exc:
            log.warning("task.invalid_dead_lettered", error=str(exc), message_id=self._message.message_id)
            return DeadLetter(f"invalid task message: {exc}")
        resolved = self._services.registry.resolve(task.adapter)
        if resolved is None:
            names = self._services.registry.names()
            log.warning("task.unknown_adapter_dead_lettered", task_id=task.task_id, adapter=task.adapter)
            return DeadLetter(f"unknown adapter {task.adapter!r}; this worker has {names}")
        adapter_name, adapter = resolved
        with bound_contextvars(task_id=task.task_id):
            # 2. claim
            claim = await self._claim(task.task_id)
            if claim.outcome == "done":
                if claim.close_message is not None:
                    await republish_close(self._services.batcher, claim.close_message)
                log.info("task.already_succeeded_skipped")
                return Ack(duplicate=True)
            if claim.outcome == "busy":
                log.info("task.duplicate_dropped", holder=claim.holder)
                return Ack(duplicate=True)
            publisher = TelemetryPublisher(
                self._services.batcher, task, adapter=adapter_name, attempt=claim.attempt
            )
            try:
                return await self._session(task, Student(adapter), publisher, claim)
            except BaseException:
                # No verdict (cancelled, the broker or the ledger failed, a bug): the delivery goes back to
                # the queue, so the claim must not stay alive. Its heartbeat stops and it is handed back
                # at once, so the redelivery runs the task instead of waiting on, or deferring to, a run
                # that no longer holds a delivery.
                await self._release(task, claim)
                raise
            finally:
                self._services.metrics.observe_session(publisher)

    async def _session(
        self, task: TaskMessage, student: Student, publisher: TelemetryPublisher, claim: Claim
    ) -> Outcome:
        ledger, timeout_s = self._services.ledger, self._services.settings.task_timeout_s
        # 3. run the session
        try:
            async with asyncio.timeout(timeout_s):
                result = await student.run(
                    task.task, task.execution_mode, task_id=task.task_id, observer=publisher
                )
        except AdapterError as exc:
            return await self._failed(task, publisher, claim, exc.reason)
        except TimeoutError:
            publisher.close_instead("failed", f"timed out after {timeout_s:g}s")
            return await self._failed(task, publisher, claim, "task timed out")
        except asyncio.CancelledError:
            await self._abandon(publisher)
            raise
        except _INFRA:  # the broker or the ledger, not the session: the runtime hands the task back
            raise
        except Exception as exc:
            log.exception("task.session_error")
            reason = cut_chars(f"worker error: {exc!r}", limits.MAX_REASON_CHARS)
            publisher.close_instead("failed", reason)
            return await self._failed(task, publisher, claim, reason)
        if publisher.close is None:
            raise TelemetryError("the Student finished without reporting a close")
        # 4. every record but the close is confirmed
        await publisher.flush()
        # 5. the ledger records success, unless another run took the task over meanwhile
        if not await ledger.succeed(
            task.task_id, claim.token, result.adapter_session_id, publisher.close_body
        ):
            return await self._superseded(publisher)
        # 6. the close, confirmed
        publisher.publish_close()
        await publisher.flush()
        log.debug("task.succeeded", steps=publisher.steps)
        return Ack()

    async def _claim(self, task_id: str) -> Claim:
        """Claim the task. A *fresh* copy that finds a live holder is a duplicate, dropped at once: a live
        claim always has its delivery unacked (a run hands its claim back before its delivery goes back to
        the queue), so the task is not lost. A *redelivery* that finds a live holder may be the holder's own
        delivery, requeued by the broker a moment before the holder noticed it lost its connection: it never
        counts as a duplicate, it waits until the holder is done (succeeded: a duplicate then; failed or
        released: it runs) or goes stale (it takes over), and hands the task back if neither happens."""
        ledger, settings = self._services.ledger, self._services.settings
        claim = await ledger.claim(task_id)
        if claim.outcome != "busy" or not self._message.redelivered:
            return claim
        log.info(
            "task.redelivery_waits_for_holder", holder=claim.holder, heartbeat_at=str(claim.heartbeat_at)
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.task_timeout_s + settings.ledger_stale_after_s
        token = claim.token
        while loop.time() <= deadline:
            await asyncio.sleep(ledger.heartbeat_s)
            claim = await ledger.claim(task_id, token)
            if claim.outcome != "busy":
                return claim
        raise LedgerUnavailable("a redelivered task's holder is still running it")

    async def _failed(
        self, task: TaskMessage, publisher: TelemetryPublisher, claim: Claim, reason: str
    ) -> Outcome:
        """The session failed or timed out: its failed close is confirmed, then the ledger records it.
        The retry decision comes first, so the close says whether this was the task's last run."""
        retries = retries_so_far(self._message)
        outcome = after_failure(self._services.settings.topology(), reason, retries)
        publisher.mark_final(isinstance(outcome, DeadLetter))
        publisher.publish_close()
        await publisher.flush()
        state: SettleState = "retrying" if isinstance(outcome, Retry) else "dead"
        if not await self._services.ledger.settle(task.task_id, claim.token, state, reason):
            log.info("task.failed_after_takeover", reason=reason)
            return Ack(duplicate=True)
        log.info("task.failed", reason=reason, retries=retries, next=state)
        return outcome

    async def _superseded(self, publisher: TelemetryPublisher) -> Outcome:
        """Another run took this task over (this one's claim went stale, e.g. through a long database
        outage): it owns the task and its delivery. This session is closed as abandoned, not succeeded, so
        the task is stored and exported once, from the run that holds it."""
        publisher.close_instead("abandoned", "another run of this task took it over")
        publisher.publish_close()
        await publisher.flush()
        log.warning("task.taken_over")
        return Ack(duplicate=True)

    async def _abandon(self, publisher: TelemetryPublisher) -> None:
        """Cancelled (shutdown past its grace, lost broker): report the session abandoned, best effort,
        within a deadline (the claim is released by ``run``)."""
        with contextlib.suppress(*_CLEANUP_ERRORS):
            async with asyncio.timeout(CLEANUP_TIMEOUT_S):
                if publisher.close_instead("abandoned", "worker stopped before the task finished"):
                    publisher.publish_close()
                    await publisher.flush()
        publisher.cancel()

    async def _release(self, task: TaskMessage, claim: Claim) -> None:
        """Hand the claim back: its heartbeat stops at once; the ledger row is marked released as soon as
        the database answers, even if this run stops waiting first (its deadline, or a second cancellation:
        a lost connection cancels a run twice). If it never answers, the row goes stale: the same, later."""
        with contextlib.suppress(*_CLEANUP_ERRORS):
            async with asyncio.timeout(CLEANUP_TIMEOUT_S):
                await self._services.ledger.release(
                    task.task_id, claim.token, "the run ended without a verdict"
                )
