"""The task pipeline against a real RabbitMQ and PostgreSQL: producer -> worker processes -> telemetry."""

from __future__ import annotations

import asyncio
import signal
import time
from urllib.parse import urlsplit

import orjson
import pytest

from atlas_common import REASON_HEADER
from schemas import SessionClosed, SessionOpened, TaskMessage
from tests._pipeline import PipelineStack, TelemetryLog, ledger_counts
from tests._proxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _tasks(n: int, tag: str) -> list[TaskMessage]:
    return [TaskMessage(task_id=f"{tag}-{i}", task=f"investigate topic {i} for {tag}") for i in range(n)]


def _succeeded_per_task(log: TelemetryLog) -> dict[str, int]:
    counts: dict[str, int] = {}
    for close in log.closes():
        if close.status == "succeeded":
            counts[close.task_id] = counts.get(close.task_id, 0) + 1
    return counts


async def test_thousand_tasks_two_workers_one_succeeded_session_each(pipeline: PipelineStack) -> None:
    """1,000 tasks through 2 worker processes: one succeeded, complete, in-sequence session per task; both
    workers did work."""
    ids = await pipeline.submit(_tasks(1000, "bulk"))
    pipeline.start_worker("w1", "--concurrency", "32")
    pipeline.start_worker("w2", "--concurrency", "32")
    log = await pipeline.read_telemetry(
        TelemetryLog(), until=lambda lg: len(_succeeded_per_task(lg)) >= 1000, timeout_s=180
    )
    succeeded = _succeeded_per_task(log)
    assert set(succeeded) == set(ids)
    assert set(succeeded.values()) == {1}
    for asid in log.by_session:
        assert log.complete_in_sequence(asid), f"session {asid} is incomplete or out of sequence"
    rows = await pipeline.ledger()
    assert ledger_counts(rows) == {"succeeded": 1000}
    shares = {w: sum(1 for r in rows if r["worker_id"] == w) for w in ("w1", "w2")}
    assert min(shares.values()) > 0, shares


async def test_resubmitting_the_same_tasks_does_not_run_them_again(pipeline: PipelineStack) -> None:
    """task_id is the idempotency key: a second submission of done tasks opens no new session."""
    tasks = _tasks(20, "again")
    await pipeline.submit(tasks)
    pipeline.start_worker("w1")
    log = await pipeline.read_telemetry(TelemetryLog(), until=lambda lg: len(lg.closes()) >= 20, timeout_s=60)
    await pipeline.submit(tasks)
    # The worker re-publishes each stored close (a harmless duplicate for the ingestor) and runs nothing.
    log = await pipeline.read_telemetry(log, until=lambda lg: lg.duplicates >= 20, timeout_s=60)
    assert len(log.opened()) == 20
    assert {r["attempts"] for r in await pipeline.ledger()} == {1}


async def test_sigkill_one_worker_mid_run_loses_nothing(pipeline: PipelineStack) -> None:
    """SIGKILL one of 2 workers mid-run: every task still ends with exactly one succeeded session, and
    the killed attempts are left open sessions of a lower attempt than the success."""
    ids = await pipeline.submit(_tasks(60, "kill"))
    slow = ("--adapter", "slow=tests._adapters:Slow", "--concurrency", "8")
    victim = pipeline.start_worker("victim", *slow)
    pipeline.start_worker("survivor", *slow)
    log = await pipeline.read_telemetry(TelemetryLog(), until=lambda lg: len(lg.opened()) >= 12, timeout_s=60)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    log = await pipeline.read_telemetry(
        log, until=lambda lg: len(_succeeded_per_task(lg)) >= 60, timeout_s=180
    )
    succeeded = _succeeded_per_task(log)
    assert set(succeeded) == set(ids)
    assert set(succeeded.values()) == {1}
    cut_off = [
        s for s in log.by_session.values() if not any(isinstance(r, SessionClosed) for r in s.values())
    ]
    assert cut_off, "the kill should have cut at least one session short"
    for session in cut_off:
        opened = session[0]
        assert isinstance(opened, SessionOpened)
        later = [
            s[0]
            for s in log.sessions_of(opened.task_id)
            if isinstance(s.get(0), SessionOpened) and s[0].attempt > opened.attempt  # type: ignore[union-attr]
        ]
        assert later, f"task {opened.task_id} has no later attempt after its cut-off session"


async def test_sigterm_drains_in_flight_sessions_without_redelivery(pipeline: PipelineStack) -> None:
    """SIGTERM: in-flight sessions finish and close normally, the worker exits 0, nothing is redelivered."""
    await pipeline.submit(_tasks(30, "drain"))
    worker = pipeline.start_worker(
        "w1", "--adapter", "slow=tests._adapters:Slow", "--concurrency", "5", "--shutdown-grace-s", "20"
    )
    log = await pipeline.read_telemetry(TelemetryLog(), until=lambda lg: len(lg.opened()) >= 5, timeout_s=60)
    worker.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait, 30) == 0
    log = await pipeline.read_telemetry(
        log, until=lambda lg: len(lg.closes()) >= len(lg.opened()), timeout_s=30
    )
    assert {c.status for c in log.closes()} == {"succeeded"}
    done = len(log.closes())
    assert await pipeline.queue_depth(pipeline.topology.tasks_queue, expect=30 - done) == 30 - done
    # A second worker finishes the rest, and no task ever needed a second attempt.
    pipeline.start_worker("w2", "--adapter", "slow=tests._adapters:Slow", "--concurrency", "10")
    log = await pipeline.read_telemetry(log, until=lambda lg: len(lg.closes()) >= 30, timeout_s=120)
    assert {r["attempts"] for r in await pipeline.ledger()} == {1}
    assert "worker.stopped" in pipeline.log_of("w1")


async def test_failing_adapter_retries_with_backoff_then_dead_letters(pipeline: PipelineStack) -> None:
    """An adapter that always fails: 3 attempts with growing delays, each a failed session, then the
    dead-letter queue holds the original task with the reason."""
    task = TaskMessage(task_id="doomed", task="this will not work")
    await pipeline.submit([task])
    pipeline.start_worker("w1", "--adapter", "broken=tests._adapters:AlwaysFails", ATLAS_MAX_ATTEMPTS="3")
    log = await pipeline.read_telemetry(TelemetryLog(), until=lambda lg: len(lg.closes()) >= 3, timeout_s=60)
    closes = sorted(log.closes(), key=lambda c: c.closed_at)
    assert [c.status for c in closes] == ["failed"] * 3
    assert all("the agent endpoint is broken" in (c.reason or "") for c in closes)
    opened = sorted(log.opened(), key=lambda o: o.attempt)
    assert [o.attempt for o in opened] == [1, 2, 3]
    gaps = [(b.opened_at - a.closed_at).total_seconds() for a, b in zip(closes, opened[1:], strict=False)]
    assert gaps[0] >= 0.15, gaps  # backoff 0.2 s ...
    assert gaps[1] >= 0.35, gaps  # ... then 0.4 s
    dead = await pipeline.dead_letters(expect=1)
    assert len(dead) == 1
    assert TaskMessage.model_validate_json(dead[0].body).task_id == "doomed"
    assert "the agent endpoint is broken" in str(dead[0].headers[REASON_HEADER])
    rows = await pipeline.ledger()
    assert [(r["state"], r["attempts"]) for r in rows] == [("dead", 3)]
    failures = [orjson.loads(line) for line in pipeline.log_of("w1").splitlines() if '"task.failed"' in line]
    assert len(failures) == 3
    assert {f["adapter_session_id"] for f in failures} == {o.adapter_session_id for o in opened}
    assert {f["task_id"] for f in failures} == {"doomed"}


async def test_poison_messages_are_dead_lettered_while_good_tasks_flow(pipeline: PipelineStack) -> None:
    """Non-JSON, wrong schema, oversized and unknown-adapter tasks each reach the dead-letter queue
    with a reason; the good tasks around them all succeed."""
    await pipeline.submit(_tasks(10, "good-a"))
    await pipeline.publish_raw(b"{not json", message_id="p-notjson")
    await pipeline.publish_raw(b'{"task_id": "p-shape", "tusk": "typo"}', message_id="p-shape")
    await pipeline.publish_raw(b'{"task": "' + b"x" * 3_000_000 + b'"}', message_id="p-big")
    await pipeline.publish_raw(b'{"task": "hi", "schema_version": 9}', message_id="p-version")
    await pipeline.submit([TaskMessage(task_id="p-adapter", task="hi", adapter="nope")])
    await pipeline.submit(_tasks(10, "good-b"))
    pipeline.start_worker("w1")
    log = await pipeline.read_telemetry(TelemetryLog(), until=lambda lg: len(lg.closes()) >= 20, timeout_s=60)
    assert {c.status for c in log.closes()} == {"succeeded"}
    dead = await pipeline.dead_letters(expect=5)
    reasons = {m.message_id: str(m.headers[REASON_HEADER]) for m in dead}
    assert set(reasons) == {"p-notjson", "p-shape", "p-big", "p-version", "p-adapter"}
    assert "not_json" in reasons["p-notjson"]
    assert "tusk" in reasons["p-shape"]
    assert "too_large" in reasons["p-big"]
    assert "unsupported_version" in reasons["p-version"]
    assert "unknown adapter 'nope'" in reasons["p-adapter"]
    assert len(next(m for m in dead if m.message_id == "p-big").body) > 3_000_000  # the original body


async def test_worker_survives_a_broker_connection_drop(pipeline: PipelineStack) -> None:
    """The worker's broker connection is cut mid-run: it reconnects by itself and every task still ends
    with exactly one succeeded session."""
    broker = urlsplit(pipeline.amqp_url)
    ids = await pipeline.submit(_tasks(200, "drop"))
    async with TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672) as proxy:
        pipeline.start_worker(
            "w1",
            "--adapter",
            "slow=tests._adapters:Slow",
            "--concurrency",
            "20",
            AMQP_URL=proxy.proxied_url(pipeline.amqp_url),
        )
        log = await pipeline.read_telemetry(
            TelemetryLog(), until=lambda lg: len(lg.closes()) >= 20, timeout_s=60
        )
        proxy.cut()
        await asyncio.sleep(2)
        proxy.restore()
        started = time.monotonic()
        log = await pipeline.read_telemetry(
            log, until=lambda lg: len(_succeeded_per_task(lg)) >= 200, timeout_s=180
        )
    succeeded = _succeeded_per_task(log)
    assert set(succeeded) == set(ids)
    assert set(succeeded.values()) == {1}
    assert time.monotonic() - started < 170


async def test_a_lost_broker_connection_hands_the_claims_back_at_once(pipeline: PipelineStack) -> None:
    """The worker's broker connection is cut while every task is running: each cut-off run releases its
    ledger claim, so the redeliveries run at once instead of waiting for the claims to go stale (60 s).
    (Whether the second cancellation of a cut-off run lands during its release is a matter of timing
    here; tests/test_ledger.py pins that case down.)"""
    broker = urlsplit(pipeline.amqp_url)
    ids = await pipeline.submit(_tasks(8, "lost"))
    async with TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672) as proxy:
        pipeline.start_worker(
            "w1",
            "--concurrency",
            "8",
            "--demo-latency-s",
            "0.5",  # ~3 s a task
            AMQP_URL=proxy.proxied_url(pipeline.amqp_url),
            WORKER_LEDGER_HEARTBEAT_S="1",
            WORKER_LEDGER_STALE_AFTER_S="60",
        )
        deadline = time.monotonic() + 60
        while (counts := ledger_counts(await pipeline.ledger())).get("running", 0) < len(ids):
            assert "succeeded" not in counts, counts  # the cut must come while every task runs
            assert time.monotonic() < deadline, counts
            await asyncio.sleep(0.05)
        proxy.cut()
        cut = time.monotonic()
        await asyncio.sleep(0.5)
        proxy.restore()
        while ledger_counts(rows := await pipeline.ledger()) != {"succeeded": len(ids)}:
            assert time.monotonic() - cut < 40, [dict(r) for r in rows]
            await asyncio.sleep(0.1)
        took = time.monotonic() - cut
        # In a thread: this event loop runs the proxy, and the worker needs it to shut down.
        await asyncio.to_thread(pipeline.stop_all, signal.SIGTERM, 30)
    assert "broker.connection_lost_reconnecting" in pipeline.log_of("w1")
    assert {r["attempts"] for r in rows} == {2}, [dict(r) for r in rows]  # each ran again, once
    assert took < 20, f"the redeliveries took {took:.1f}s after the cut"
