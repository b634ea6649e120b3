"""The worker process: consume tasks, run each in one adapter session, stream telemetry, settle.

Per task: decode -> resolve the adapter (only the configured ones) -> claim in the task ledger ->
``Student.run`` with a :class:`TelemetryPublisher` observer -> wait for every telemetry confirm ->
record success in the ledger -> publish the close -> ack. Failures go through :mod:`worker._policy`.

Shutdown (SIGTERM/SIGINT set ``stop``): cancel the consumer (no new tasks), let in-flight tasks finish
within ``shutdown_grace_s``, cancel the rest (their sessions close as ``abandoned`` and the tasks are
requeued for another worker), then close the connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Final

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from structlog.contextvars import bound_contextvars

from atlas_common import BROKER_ERRORS, BrokerConnection, Topology, sleep_unless
from schemas import DecodeError, TaskMessage, decode_task, encode
from worker._batcher import TelemetryBatcher
from worker._errors import AdapterError, WorkerError
from worker._ledger import LedgerUnavailable, TaskLedger
from worker._metrics import WorkerMetrics
from worker._policy import (
    Ack,
    DeadLetter,
    Outcome,
    Requeue,
    Retry,
    SettleError,
    Settler,
    after_failure,
    retries_so_far,
)
from worker._registry import AdapterRegistry
from worker._settings import WorkerSettings
from worker._student import Student
from worker._telemetry import TelemetryError, TelemetryPublisher, republish_close

log = structlog.get_logger("worker")

_INFRA_ERRORS: Final = (
    TelemetryError,
    SettleError,
    LedgerUnavailable,
    *BROKER_ERRORS,
)
_CLEANUP_TIMEOUT_S: Final = 5.0
_INFRA_BACKOFF_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class _Live:
    """What exists only while the worker runs: the ledger and the exchanges it publishes to."""

    ledger: TaskLedger
    telemetry: TelemetryBatcher
    settler: Settler


class BrokerUnavailable(WorkerError):
    """RabbitMQ cannot be reached at start-up."""


class Worker:
    """One worker process; ``await Worker(settings, registry).run(stop)`` returns after a clean shutdown."""

    def __init__(
        self, settings: WorkerSettings, registry: AdapterRegistry, *, metrics: WorkerMetrics | None = None
    ) -> None:
        self._settings = settings
        self._topology: Topology = settings.topology()
        self._registry = registry
        self._metrics = metrics or WorkerMetrics()
        self._inflight: set[asyncio.Task[object]] = set()
        self._stopping = asyncio.Event()
        self._live: _Live | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set. A lost broker connection ends an epoch: in-flight tasks are
        cancelled (the broker redelivers them; the ledger gives the re-run a new attempt number), and
        the worker reconnects with backoff. Only the first connection failing is fatal."""
        settings = self._settings
        async with TaskLedger(
            settings.database_url,
            worker_id=settings.worker_id,
            # No run outlives its task timeout, so an older 'running' record is a dead run's.
            stale_after_s=settings.task_timeout_s * 1.1 + 30,
            pool_size=settings.ledger_pool_size,
            stopping=self._stopping,
        ) as ledger:
            delay = 0.5
            epoch = 0
            while not stop.is_set():
                broker = BrokerConnection(settings.amqp_url, name=f"atlas-worker {settings.worker_id}")
                try:
                    await broker.open()
                except BROKER_ERRORS as exc:
                    if epoch == 0:
                        raise BrokerUnavailable(
                            f"cannot reach RabbitMQ at {broker.safe_url}: {exc!r}"
                        ) from exc
                    log.warning("broker_unreachable_retrying", error=repr(exc), retry_in_s=delay)
                    await sleep_unless(stop, delay)
                    delay = min(delay * 2, 10.0)
                    continue
                epoch += 1
                delay = 0.5
                async with broker:
                    try:
                        await self._serve_epoch(broker, ledger, stop)
                    except BROKER_ERRORS as exc:
                        log.warning("broker_epoch_failed", error=repr(exc))
                        await self._cancel_inflight("broker connection lost")
        log.info("worker_stopped", worker_id=settings.worker_id)

    async def _serve_epoch(self, broker: BrokerConnection, ledger: TaskLedger, stop: asyncio.Event) -> None:
        settings, topology = self._settings, self._topology
        publish_channel = await broker.channel(publisher_confirms=True)
        consume_channel = await broker.channel(publisher_confirms=False, prefetch_count=settings.concurrency)
        await topology.declare_tasks(publish_channel)
        # The ingestor's queue too: telemetry published before any ingestor started is kept, not dropped
        # (publishes are mandatory, so a topology with no queue bound fails loudly instead).
        await topology.declare_ingestor(publish_channel)
        telemetry = await topology.declare_telemetry(publish_channel)
        async with TelemetryBatcher(telemetry, linger_s=settings.telemetry_linger_s) as batcher:
            self._live = _Live(
                ledger=ledger,
                telemetry=batcher,
                settler=Settler(
                    topology,
                    retry_exchange=await publish_channel.get_exchange(topology.retry_exchange, ensure=False),
                    dead_exchange=await publish_channel.get_exchange(topology.dead_exchange, ensure=False),
                ),
            )
            queue = await consume_channel.get_queue(topology.tasks_queue, ensure=False)
            consumer_tag = await queue.consume(self._on_message)
            log.info(
                "worker_started",
                worker_id=settings.worker_id,
                queue=queue.name,
                concurrency=settings.concurrency,
                adapters=self._registry.names(),
                default_adapter=self._registry.default,
            )
            stopped = asyncio.ensure_future(stop.wait())
            lost = asyncio.ensure_future(broker.lost.wait())
            try:
                await asyncio.wait({stopped, lost}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
                lost.cancel()
            if broker.lost.is_set():
                log.warning("broker_connection_lost_reconnecting", inflight=len(self._inflight))
                await self._cancel_inflight("broker connection lost")
                return
            await self._shutdown(queue, consumer_tag)

    async def _shutdown(self, queue: AbstractQueue, consumer_tag: str) -> None:
        """Stop intake, drain within the grace period, cancel the rest (they requeue themselves)."""
        self._stopping.set()
        with contextlib.suppress(*BROKER_ERRORS):
            await queue.cancel(consumer_tag)
        inflight = set(self._inflight)
        log.info("worker_draining", inflight=len(inflight), grace_s=self._settings.shutdown_grace_s)
        if inflight:
            _, still_running = await asyncio.wait(inflight, timeout=self._settings.shutdown_grace_s)
            if still_running:
                log.warning("worker_grace_expired_cancelling", tasks=len(still_running))
                await self._cancel_inflight("shutdown grace expired")

    async def _cancel_inflight(self, why: str) -> None:
        tasks = set(self._inflight)
        for task in tasks:
            task.cancel(why)
        if tasks:
            await asyncio.wait(tasks, timeout=_CLEANUP_TIMEOUT_S * 2)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - aio-pika always runs consumers in a task
            return
        self._inflight.add(task)
        try:
            await self._handle(message)
        finally:
            self._inflight.discard(task)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        settler = self._running().settler
        started = time.perf_counter()
        try:
            outcome = await self._process(message)
            await settler.settle(message, outcome)
        except _INFRA_ERRORS as exc:
            # The broker or the ledger failed us: leave the task unacked (requeue if the channel lives);
            # the ledger makes the re-run safe.
            log.warning("task_infrastructure_error_requeued", error=repr(exc), message_id=message.message_id)
            await self._requeue_after_pause(message)
            return
        except asyncio.CancelledError:
            await _requeue_quietly(message)
            raise
        except Exception:  # a bug must not strand the delivery (it would hold a prefetch slot forever)
            # Logged with its traceback and handed back; if it keeps failing, the quorum queue's delivery
            # limit dead-letters the task instead of looping forever.
            log.exception("task_unexpected_error_requeued", message_id=message.message_id)
            await self._requeue_after_pause(message)
            return
        self._metrics.observe(outcome, time.perf_counter() - started)

    async def _requeue_after_pause(self, message: AbstractIncomingMessage) -> None:
        # A pause before handing it back, so an outage (or a bug) is not a hot redelivery loop.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), _INFRA_BACKOFF_S)
        await _requeue_quietly(message)
        self._metrics.infra_errors.inc()

    async def _process(self, message: AbstractIncomingMessage) -> Outcome:
        retries = retries_so_far(message)
        try:
            task = decode_task(message.body, max_bytes=self._settings.max_message_bytes)
        except DecodeError as exc:
            log.warning("task_invalid_dead_lettered", error=str(exc), message_id=message.message_id)
            return DeadLetter(f"invalid task message: {exc}")
        resolved = self._registry.resolve(task.adapter)
        if resolved is None:
            reason = f"unknown adapter {task.adapter!r}; this worker has {self._registry.names()}"
            log.warning("task_unknown_adapter_dead_lettered", task_id=task.task_id, adapter=task.adapter)
            return DeadLetter(reason)
        adapter_name, adapter = resolved
        # A redelivery (its worker died or lost the broker) or a retry may take over a 'running' ledger
        # record; a fresh message may not (it is a duplicate submission racing the live run).
        takeover = bool(message.redelivered) or retries > 0
        with bound_contextvars(task_id=task.task_id):
            return await self._run_task(
                task, adapter_name, Student(adapter), retries=retries, takeover=takeover
            )

    async def _run_task(
        self, task: TaskMessage, adapter_name: str, student: Student, *, retries: int, takeover: bool
    ) -> Outcome:
        live = self._running()
        ledger, exchange = live.ledger, live.telemetry
        claim = await ledger.claim(task.task_id, takeover=takeover)
        if claim.busy:
            log.info("task_duplicate_of_a_running_task_dropped")
            return Ack(duplicate=True)
        if claim.done:
            if claim.close_message is not None:
                await republish_close(exchange, claim.close_message)
            log.info("task_already_succeeded_skipped")
            return Ack(duplicate=True)
        publisher = TelemetryPublisher(exchange, task, adapter=adapter_name, attempt=claim.attempt)
        try:
            return await self._run_session(task, student, publisher, retries)
        finally:
            self._metrics.observe_session(publisher)

    async def _run_session(
        self, task: TaskMessage, student: Student, publisher: TelemetryPublisher, retries: int
    ) -> Outcome:
        ledger = self._running().ledger
        try:
            async with asyncio.timeout(self._settings.task_timeout_s):
                result = await student.run(
                    task.task, task.execution_mode, task_id=task.task_id, observer=publisher
                )
        except AdapterError as exc:
            return await self._failed(task, publisher, exc.reason, retries)
        except TimeoutError:
            publisher.close_instead("failed", f"timed out after {self._settings.task_timeout_s:g}s")
            return await self._failed(task, publisher, "task timed out", retries)
        except asyncio.CancelledError:
            await self._abandon(publisher)
            raise
        # (The publisher bound adapter_session_id to this task's log context when the session opened.)
        await publisher.flush()
        close = publisher.close
        if close is None:
            raise TelemetryError("the Student finished without reporting a close")
        await ledger.succeed(task.task_id, result.adapter_session_id, encode(close))
        publisher.publish_close()
        await publisher.flush()
        log.debug("task_succeeded", steps=publisher.steps)
        return Ack()

    async def _failed(
        self, task: TaskMessage, publisher: TelemetryPublisher, reason: str, retries: int
    ) -> Outcome:
        publisher.publish_close()
        await publisher.flush()
        outcome = after_failure(self._topology, reason, retries)
        state = "retrying" if isinstance(outcome, Retry) else "dead"
        await self._running().ledger.settle(task.task_id, state, reason)
        log.info("task_failed", reason=reason, retries=retries, next=state)
        return outcome

    def _running(self) -> _Live:
        if self._live is None:
            raise RuntimeError("the worker is not running")
        return self._live

    async def _abandon(self, publisher: TelemetryPublisher) -> None:
        """Cancelled (shutdown past its grace): report the session abandoned; the task is requeued."""
        if publisher.close_instead("abandoned", "worker stopped before the task finished") is None:
            publisher.cancel()
            return
        publisher.publish_close()
        with contextlib.suppress(*_INFRA_ERRORS, TimeoutError):
            async with asyncio.timeout(_CLEANUP_TIMEOUT_S):
                await publisher.flush()


async def _requeue_quietly(message: AbstractIncomingMessage) -> None:
    with contextlib.suppress(*BROKER_ERRORS, RuntimeError):
        await message.nack(requeue=True)


__all__ = ["BrokerUnavailable", "Requeue", "Worker"]
