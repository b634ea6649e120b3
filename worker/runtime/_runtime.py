"""The worker process: consume tasks, run each in one adapter session, stream telemetry, settle.

The life of one task is :class:`worker.runtime._taskrun.TaskRun`; what happens to its delivery afterwards
(ack, retry, dead letter) is decided in one place, :class:`worker.runtime._policy.Settler`. This module owns
the process: the ledger, the broker connection and its epochs, and shutdown.

Start-up refuses a database whose schema is behind (or a role without the ledger privileges) with one line
saying what to run. Shutdown (SIGTERM/SIGINT set ``stop``): cancel the consumer (no new tasks), let
in-flight tasks finish within ``shutdown_grace_s``, cancel the rest (their sessions close as ``abandoned``,
their claims are released and the tasks requeued for another worker), then close the connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Final

import structlog

from atlas_common import (
    BROKER_ERRORS,
    Backoff,
    BrokerConnection,
    BrokerUnavailable,
    Consumer,
    Delivery,
    Topology,
    consume,
    scrub_secrets,
    scrub_text,
    sleep_unless,
    url_secrets,
)
from worker.runtime._batcher import TelemetryBatcher
from worker.runtime._errors import WorkerRuntimeError
from worker.runtime._ledger import LedgerUnavailable, TaskLedger
from worker.runtime._metrics import WorkerMetrics
from worker.runtime._policy import Settler
from worker.runtime._registry import AdapterRegistry
from worker.runtime._settings import WorkerSettings
from worker.runtime._taskrun import CLEANUP_TIMEOUT_S, Services, TaskRun
from worker.runtime._telemetry import TelemetryError

log = structlog.get_logger("worker")

_INFRA_ERRORS: Final = (
    TelemetryError,
    LedgerUnavailable,
    *BROKER_ERRORS,
)
_INFRA_BACKOFF_S: Final = 1.0
SCHEMA_VERSION_NEEDED: Final = 7
"""The worker needs migrations up to 007 (the ledger's claim tokens)."""


class SchemaBehind(WorkerRuntimeError):
    """The database is not migrated far enough, or this role lacks privileges on the ledger."""


async def check_database(settings: WorkerSettings, ledger: TaskLedger) -> None:
    """Refuse to start on a schema that is behind or without the ledger privileges (one clear line)."""
    from migrations import MigrationError, migration_status

    try:
        status = await migration_status(settings.database_url)
    except MigrationError as exc:
        detail = scrub_secrets(str(exc), settings.database_url)
        raise SchemaBehind(f"cannot check the database schema: {detail}") from exc
    missing = [m.filename for m in status.pending if m.version <= SCHEMA_VERSION_NEEDED]
    if missing:
        raise SchemaBehind(
            f"the database schema is behind (pending: {', '.join(missing)}): run `python -m migrations`"
        )
    lacking = await ledger.check_privileges()
    if lacking:
        raise SchemaBehind(
            f"this database role lacks {', '.join(lacking)} on task_ledger: "
            f"GRANT {', '.join(lacking)} ON task_ledger TO <the worker's role>"
        )


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
        self._services: Services | None = None
        self._settler: Settler | None = None
        self._secrets = url_secrets(settings.amqp_url) | url_secrets(settings.database_url)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set. A lost broker connection ends an epoch: in-flight tasks are
        cancelled (their claims released, the broker redelivers them), and the worker reconnects with
        backoff. Only the first connection failing is fatal."""
        settings = self._settings
        async with TaskLedger(
            settings.database_url,
            worker_id=settings.worker_id,
            heartbeat_s=settings.ledger_heartbeat_s,
            stale_after_s=settings.ledger_stale_after_s,
            op_timeout_s=settings.ledger_timeout_s,
            pool_size=settings.ledger_pool_size,
            pooler=settings.db_pooler,
            stopping=self._stopping,
        ) as ledger:
            await check_database(settings, ledger)
            backoff = Backoff(initial_s=0.5, max_s=10.0)
            epoch = 0
            while not stop.is_set():
                broker = BrokerConnection(settings.amqp_url, name=f"atlas-worker {settings.worker_id}")
                try:
                    await broker.open()
                except BROKER_ERRORS as exc:
                    if epoch == 0:
                        raise BrokerUnavailable(
                            f"cannot reach RabbitMQ at {broker.safe_url}: {self._text(exc)}"
                        ) from exc
                    delay = backoff.next()
                    log.warning(
                        "broker.unreachable_retrying", error=self._text(exc), retry_in_s=round(delay, 2)
                    )
                    await sleep_unless(stop, delay)
                    continue
                epoch += 1
                delay = 0.0
                async with broker:
                    try:
                        # The backoff resets once the epoch consumes, not when the connection opens: a
                        # node that accepts connections but cannot serve the topology (a cluster node
                        # whose peers are down) would otherwise be retried in a tight loop.
                        await self._serve_epoch(broker, ledger, stop, consuming=backoff.reset)
                    except BROKER_ERRORS as exc:
                        delay = backoff.next()
                        log.warning("broker.epoch_failed", error=self._text(exc), retry_in_s=round(delay, 2))
                        await self._cancel_inflight("broker connection lost")
                if delay:
                    await sleep_unless(stop, delay)
        log.info("worker.stopped", worker_id=settings.worker_id)

    def _text(self, exc: BaseException) -> str:
        """``repr(exc)`` without any secret of the broker or database URL: a client's error may quote the
        URL it was given, and this text goes to logs and to the one line the CLI prints."""
        return scrub_text(repr(exc), self._secrets)

    async def _serve_epoch(
        self,
        broker: BrokerConnection,
        ledger: TaskLedger,
        stop: asyncio.Event,
        *,
        consuming: Callable[[], None],
    ) -> None:
        settings, topology = self._settings, self._topology
        publish_channel = await broker.channel(publisher_confirms=True)
        consume_channel = await broker.channel(publisher_confirms=False, prefetch_count=settings.concurrency)
        await topology.declare_tasks(publish_channel)
        # The ingestor's queue too: telemetry published before any ingestor started is kept, not dropped
        # (publishes are mandatory, so a topology with no queue bound fails loudly instead).
        await topology.declare_ingestor(publish_channel)
        telemetry = await topology.declare_telemetry(publish_channel)
        # Refusals in a row end this connection's epoch (reconnect, maybe to another node): see _batcher.
        batcher = TelemetryBatcher(
            telemetry, linger_s=settings.telemetry_linger_s, on_refused=broker.lost.set
        )
        async with batcher:
            self._services = Services(settings, self._registry, ledger, batcher, self._metrics)
            self._settler = settler = Settler(
                topology,
                retry_exchange=await publish_channel.get_exchange(topology.retry_exchange, ensure=False),
                dead_exchange=await publish_channel.get_exchange(topology.dead_exchange, ensure=False),
            )
            try:
                consumer = await consume(consume_channel, topology.tasks_queue, self._on_message)
                consuming()
                log.info(
                    "worker.started",
                    worker_id=settings.worker_id,
                    queue=topology.tasks_queue,
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
                    log.warning("broker.connection_lost_reconnecting", inflight=len(self._inflight))
                    await self._cancel_inflight("broker connection lost")
                    return
                await self._shutdown(consumer)
            finally:
                # The acks still batched go out before the channel closes (after a lost connection they
                # cannot: the broker redelivers those tasks and the ledger acks them as duplicates).
                await settler.close()

    async def _shutdown(self, consumer: Consumer) -> None:
        """Stop intake, drain within the grace period, cancel the rest (they requeue themselves)."""
        self._stopping.set()
        with contextlib.suppress(*BROKER_ERRORS):
            await consumer.cancel()
        inflight = set(self._inflight)
        log.info("worker.draining", inflight=len(inflight), grace_s=self._settings.shutdown_grace_s)
        if inflight:
            _, still_running = await asyncio.wait(inflight, timeout=self._settings.shutdown_grace_s)
            if still_running:
                log.warning("worker.grace_expired_cancelling", tasks=len(still_running))
                await self._cancel_inflight("shutdown grace expired")

    async def _cancel_inflight(self, why: str) -> None:
        # After a lost connection aiormq has usually cancelled these already (closing a channel cancels
        # its consumers' tasks), so this second cancellation can cut a run's cleanup short: the ledger
        # commits a release whatever happens to its caller (TaskLedger.release).
        tasks = set(self._inflight)
        for task in tasks:
            task.cancel(why)
        if tasks:
            await asyncio.wait(tasks, timeout=CLEANUP_TIMEOUT_S * 3)

    async def _on_message(self, message: Delivery) -> None:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - aiormq always runs consumers in a task
            return
        self._inflight.add(task)
        try:
            await self._handle(message)
        finally:
            self._inflight.discard(task)

    async def _handle(self, message: Delivery) -> None:
        """Run the task, then settle its delivery: the one place that decides ack / retry / dead letter /
        hand back."""
        services, settler = self._services, self._settler
        if services is None or settler is None:  # pragma: no cover - consuming starts after both are set
            raise RuntimeError("the worker is not running")
        started = time.perf_counter()
        settler.started(message)
        try:
            outcome = await TaskRun(message, services).run()
            await settler.settle(message, outcome)
        except _INFRA_ERRORS as exc:
            # The broker or the ledger failed us: leave the task unacked (requeue if the channel lives);
            # the ledger makes the re-run safe.
            log.warning(
                "task.infrastructure_error_requeued", error=self._text(exc), message_id=message.message_id
            )
            await self._requeue_after_pause(settler, message)
            return
        except asyncio.CancelledError:
            await settler.hand_back(message)
            raise
        except Exception:  # a bug must not strand the delivery (it would hold a prefetch slot forever)
            # Logged with its traceback and handed back; if it keeps failing, the quorum queue's delivery
            # limit dead-letters the task instead of looping forever.
            log.exception("task.unexpected_error_requeued", message_id=message.message_id)
            await self._requeue_after_pause(settler, message)
            return
        self._metrics.observe(outcome, time.perf_counter() - started)

    async def _requeue_after_pause(self, settler: Settler, message: Delivery) -> None:
        # A pause before handing it back, so an outage (or a bug) is not a hot redelivery loop.
        await sleep_unless(self._stopping, _INFRA_BACKOFF_S)
        await settler.hand_back(message)
        self._metrics.infra_errors.inc()


__all__ = ["SchemaBehind", "Worker", "check_database"]
