"""The worker runtime's pieces with in-process fakes (no broker, no database): the Settler when the broker
never confirms, one task's life through a timeout, a success and a takeover, and how the telemetry
batcher splits records into envelopes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiormq
import orjson
import pytest

from atlas_common import RETRY_HEADER, PublishNotConfirmed, Topology
from schemas import TaskMessage, decode_telemetry, encode
from worker.runtime import (
    AdapterRegistry,
    LedgerUnavailable,
    SchemaBehind,
    WorkerMetrics,
    WorkerRuntimeError,
    WorkerSettings,
)
from worker.runtime._acks import Acks
from worker.runtime._batcher import TelemetryBatcher
from worker.runtime._ledger_group import Claim, ClaimOp, Group, SettleOp, SucceedOp
from worker.runtime._policy import Ack, DeadLetter, Retry, Settler
from worker.runtime._taskrun import Services, TaskRun
from worker.runtime._telemetry import TelemetryError, TelemetryPublisher
from worker.sessions import AdapterConfigError, AdapterError, PythonAdapter, WorkerError


@dataclass
class _Message:
    """Stands in for an ``atlas_common.Delivery``: records whether it was acked or handed back."""

    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    redelivered: bool = False
    routing_key: str = "task"
    message_id: str = "m1"
    content_type: str = "application/json"
    content_encoding: str | None = None
    priority: int | None = None
    correlation_id: str | None = None
    timestamp: Any = None
    type: str | None = None
    app_id: str | None = None
    delivery_tag: int = 1
    acked: int = 0

    async def ack(self, multiple: bool = False) -> None:
        self.acked += 1


class _Exchange:
    """Stands in for an exchange whose broker answers ``answer`` (or raises it)."""

    name = "fake"

    def __init__(self, answer: Any) -> None:
        self._answer = answer
        self.published: list[tuple[bytes, str, dict[str, Any]]] = []

    async def publish(self, message: Any, routing_key: str, **options: Any) -> Any:
        self.published.append((message.body, routing_key, dict(message.headers)))
        if isinstance(self._answer, BaseException):
            raise self._answer
        return self._answer


@pytest.mark.parametrize(
    "answer",
    [
        aiormq.spec.Basic.Nack(),
        TimeoutError("no confirm"),
        aiormq.exceptions.ChannelInvalidStateError("closed"),
    ],
)
async def test_a_retry_never_confirmed_leaves_the_task_unacked(answer: Any) -> None:
    """A nack, a confirm that never comes, a channel gone: PublishNotConfirmed, and the task is not acked (the
    broker redelivers it; acking would lose it)."""
    exchange = _Exchange(answer)
    settler = Settler(Topology(), retry_exchange=exchange, dead_exchange=exchange)  # type: ignore[arg-type]
    message = _Message(b"{}")
    with pytest.raises(PublishNotConfirmed):
        await settler.settle(message, Retry("boom", 0))  # type: ignore[arg-type]
    assert message.acked == 0
    assert exchange.published[0][2][RETRY_HEADER] == 1


async def test_a_confirmed_dead_letter_acks_once() -> None:
    """A dead letter confirmed by the broker: published once with its reason, then the task acked once."""
    exchange = _Exchange(aiormq.spec.Basic.Ack())
    settler = Settler(Topology(), retry_exchange=exchange, dead_exchange=exchange)  # type: ignore[arg-type]
    message = _Message(b"{}")
    await settler.settle(message, DeadLetter("no such adapter"))  # type: ignore[arg-type]
    assert message.acked == 1
    ((_, key, headers),) = exchange.published
    assert (key, headers["x-atlas-reason"]) == ("task", "no such adapter")


class _Ledger:
    """An in-memory ledger: one holder per task, takeover on demand."""

    heartbeat_s = 0.01

    def __init__(self, *, taken_over: bool = False) -> None:
        self.taken_over = taken_over
        self.calls: list[str] = []

    async def claim(self, task_id: str, token: str | None = None) -> Claim:
        self.calls.append("claim")
        return Claim("run", token or "tok", attempt=1)

    async def succeed(self, task_id: str, token: str, adapter_session_id: str, close: bytes) -> bool:
        self.calls.append("succeed")
        return not self.taken_over

    async def settle(self, task_id: str, token: str, state: str, error: str | None) -> bool:
        self.calls.append(f"settle:{state}")
        return True

    async def release(self, task_id: str, token: str, why: str) -> None:
        self.calls.append("release")


class _Batcher:
    """Confirms every record at once and keeps them, decoded."""

    def __init__(self) -> None:
        self.records: list[Any] = []

    def send(self, kind: str, body: bytes) -> asyncio.Future[None]:
        self.records.append(decode_telemetry(body))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


class _Slow:
    async def on_step(self, metadata: dict[str, Any]) -> Any:
        if metadata["phase"] == "plan":
            return {"steps": [{"id": 1, "description": "wait"}]}
        await asyncio.sleep(5)
        return "late"


class _Quick:
    def on_step(self, metadata: dict[str, Any]) -> Any:
        if metadata["phase"] == "plan":
            return {"steps": [{"id": 1, "description": "do"}]}
        return "done"


def _run(
    adapter: Any, ledger: _Ledger, batcher: _Batcher, headers: dict[str, Any] | None = None, **settings: Any
) -> TaskRun:
    registry = AdapterRegistry(adapters={"a": PythonAdapter(adapter, name="a")}, default="a")
    services = Services(WorkerSettings(**settings), registry, ledger, batcher, WorkerMetrics())  # type: ignore[arg-type]
    message = _Message(encode(TaskMessage(task_id="t1", task="x")), headers=headers or {})
    return TaskRun(message, services)  # type: ignore[arg-type]


async def test_a_task_over_its_timeout_fails_its_session_and_retries() -> None:
    """Past WORKER_TASK_TIMEOUT_S the session closes failed ("timed out after ..."), its close is published,
    the ledger records 'retrying', and the outcome is a retry."""
    ledger, batcher = _Ledger(), _Batcher()
    outcome = await _run(_Slow, ledger, batcher, task_timeout_s=0.2).run()
    assert outcome == Retry("task timed out", 0)
    close = batcher.records[-1]
    assert (close.kind, close.status, close.reason) == ("session.closed", "failed", "timed out after 0.2s")
    assert ledger.calls == ["claim", "settle:retrying"]


async def test_one_task_reads_in_order() -> None:
    """A success: claim, the opened and steps confirmed, success recorded with the close's bytes, then the
    close published, then ack."""
    ledger, batcher = _Ledger(), _Batcher()
    outcome = await _run(_Quick, ledger, batcher).run()
    assert outcome == Ack()
    assert ledger.calls == ["claim", "succeed"]
    kinds = [r.kind for r in batcher.records]
    assert kinds == ["session.opened", "step", "step", "step", "session.closed"]
    assert orjson.loads(encode(batcher.records[-1]))["status"] == "succeeded"


async def test_a_run_taken_over_stands_down() -> None:
    """When the ledger says another run holds the task now, this session closes abandoned (not succeeded)
    and the delivery is acked as a duplicate: the task is stored once, from the run that holds it."""
    ledger, batcher = _Ledger(taken_over=True), _Batcher()
    outcome = await _run(_Quick, ledger, batcher).run()
    assert outcome == Ack(duplicate=True)
    close = batcher.records[-1]
    assert (close.status, close.reason) == ("abandoned", "another run of this task took it over")
    assert [r.kind for r in batcher.records].count("session.closed") == 1


class _FailingFlushBatcher(_Batcher):
    """Confirms nothing: every envelope fails, as when the broker connection drops mid-task."""

    def send(self, kind: str, body: bytes) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_exception(PublishNotConfirmed("channel closed"))
        return future


async def test_a_run_without_a_verdict_hands_its_claim_back() -> None:
    """Telemetry not confirmed (the delivery goes back to the queue): the claim is released, so no
    heartbeat keeps it looking alive while another worker gets the redelivery."""
    from worker.runtime._telemetry import TelemetryError

    ledger = _Ledger()
    with pytest.raises(TelemetryError):
        await _run(_Quick, ledger, _FailingFlushBatcher()).run()
    assert ledger.calls == ["claim", "release"]


class _SlowSucceedLedger(_Ledger):
    def __init__(self) -> None:
        super().__init__()
        self.recording = asyncio.Event()

    async def succeed(self, task_id: str, token: str, adapter_session_id: str, close: bytes) -> bool:
        self.calls.append("succeed")
        self.recording.set()
        await asyncio.sleep(10)
        return True


async def test_a_run_cancelled_while_recording_success_hands_its_claim_back() -> None:
    """Cancelled after the session, while the ledger records success (shutdown, lost broker): released too
    (before, only a cancellation inside the session was)."""
    ledger = _SlowSucceedLedger()
    run = asyncio.ensure_future(_run(_Quick, ledger, _Batcher()).run())
    await ledger.recording.wait()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert ledger.calls == ["claim", "succeed", "release"]


class _HeldLedger(_Ledger):
    """Another run holds the task for ``busy_for`` claims, then it has succeeded."""

    def __init__(self, busy_for: int) -> None:
        super().__init__()
        self.busy_for = busy_for

    async def claim(self, task_id: str, token: str | None = None) -> Claim:
        self.calls.append("claim")
        if self.busy_for > 0:
            self.busy_for -= 1
            return Claim("busy", token or "tok", holder="other", heartbeat_at=None)
        return Claim("done", token or "tok", close_message=None)


async def test_a_redelivery_never_counts_as_a_duplicate_of_a_live_holder() -> None:
    """A redelivered copy that finds the task held waits (the holder may be the run that just lost this very
    delivery) until the holder is done, and only then is a duplicate; a fresh copy is one at once."""
    registry = AdapterRegistry(adapters={"a": PythonAdapter(_Quick, name="a")}, default="a")
    body = encode(TaskMessage(task_id="t1", task="x"))
    for redelivered, expected_claims in ((False, 1), (True, 4)):
        ledger = _HeldLedger(busy_for=3)
        services = Services(WorkerSettings(), registry, ledger, _Batcher(), WorkerMetrics())  # type: ignore[arg-type]
        message = _Message(body, redelivered=redelivered)
        outcome = await TaskRun(message, services).run()  # type: ignore[arg-type]
        assert outcome == Ack(duplicate=True)
        assert ledger.calls.count("claim") == expected_claims


class _Failing:
    def on_step(self, metadata: dict[str, Any]) -> Any:
        if metadata["phase"] == "plan":
            return {"steps": [{"id": 1, "description": "do"}]}
        raise RuntimeError("the tool is down")


@pytest.mark.parametrize(("retries", "final"), [(0, False), (1, False), (2, True)])
async def test_a_failed_close_says_whether_a_retry_follows(retries: int, final: bool) -> None:
    """The failed close carries ``final_attempt`` from the retry decision (3 runs in all by default): False
    while a retry follows, True on the run that is dead-lettered; the ledger and outcome agree with it."""
    ledger, batcher = _Ledger(), _Batcher()
    run = _run(_Failing, ledger, batcher, headers={RETRY_HEADER: retries})
    outcome = await run.run()
    close = batcher.records[-1]
    assert (close.kind, close.status) == ("session.closed", "failed")
    assert close.close_metadata["final_attempt"] is final
    assert isinstance(outcome, DeadLetter if final else Retry)
    assert ledger.calls[-1] == ("settle:dead" if final else "settle:retrying")


async def test_a_succeeded_close_is_the_final_attempt() -> None:
    """A succeeded close carries ``final_attempt: true`` (a task that succeeded never runs again), in the
    bytes the ledger keeps as well as in what is published."""
    ledger, batcher = _Ledger(), _Batcher()
    assert await _run(_Quick, ledger, batcher).run() == Ack()
    close = batcher.records[-1]
    assert (close.status, close.close_metadata["final_attempt"]) == ("succeeded", True)


def _future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


async def test_a_group_names_each_task_once_successes_first() -> None:
    """One group is one statement, which must not change a row twice: a task named twice (a release
    queued behind its run's success, a duplicate claim) waits for the next group; successes go before
    settlements, settlements before claims; claims past the cap wait too."""
    pending = Group(
        claims=[ClaimOp(t, "tok", _future()) for t in ("t1", "t2", "t2", "t3", "t4")],
        succeeded=[SucceedOp("t1", "tok", "s1", b"{}", _future())],
        settled=[SettleOp("t1", "tok", "retrying", "released", _future())],
    )
    group, rest = pending.take(max_claims=2)
    assert [op.task_id for op in group.succeeded] == ["t1"]
    assert (group.settled, [op.task_id for op in group.claims]) == ([], ["t2", "t3"])
    assert [op.task_id for op in rest.settled] == ["t1"]
    assert [op.task_id for op in rest.claims] == ["t1", "t2", "t4"]
    again, left = rest.take(max_claims=2)
    assert ([op.task_id for op in again.settled], [op.task_id for op in again.claims]) == (
        ["t1"],
        ["t2", "t4"],
    )
    assert [op.task_id for op in left.claims] == ["t1"]


def _records(body: bytes) -> tuple[str, list[Any]]:
    """An envelope's kind and its records."""
    envelope = orjson.loads(body)
    return envelope["kind"], envelope["records"]


async def test_the_batcher_splits_by_record_count() -> None:
    """With max_records=3 and a long linger, every third record sends its envelope at once (confirmed
    without waiting for the linger); the rest goes out on close, order kept."""
    exchange = _Exchange(aiormq.spec.Basic.Ack())
    batcher = TelemetryBatcher(exchange, linger_s=60, max_records=3)  # type: ignore[arg-type]
    async with batcher:
        futures = [batcher.send("step", orjson.dumps({"n": n})) for n in range(7)]
        async with asyncio.timeout(5):
            await asyncio.gather(*futures[:6])
        assert [len(_records(body)[1]) for body, _, _ in exchange.published] == [3, 3]
        assert not futures[6].done()
    await futures[6]
    assert [[r["n"] for r in _records(body)[1]] for body, _, _ in exchange.published] == [
        [0, 1, 2],
        [3, 4, 5],
        [6],
    ]
    assert (batcher.batches_sent, batcher.records_sent) == (3, 7)


async def test_the_batcher_splits_by_bytes() -> None:
    """With max_bytes=100, records of 49 bytes (50 with their separator) go out two to an envelope as soon
    as the second is queued, whatever max_records allows."""
    exchange = _Exchange(aiormq.spec.Basic.Ack())
    parts = [orjson.dumps({"pad": f"{n}" + "x" * 38}) for n in range(5)]
    assert {len(part) for part in parts} == {49}
    batcher = TelemetryBatcher(exchange, linger_s=60, max_records=500, max_bytes=100)  # type: ignore[arg-type]
    async with batcher:
        futures = [batcher.send("step", part) for part in parts]
        async with asyncio.timeout(5):
            await asyncio.gather(*futures[:4])
        assert not futures[4].done()
    assert [len(_records(body)[1]) for body, _, _ in exchange.published] == [2, 2, 1]
    assert all(len(body) <= 100 + 64 for body, _, _ in exchange.published)


async def test_the_batcher_sends_one_envelope_per_kind() -> None:
    """Records of three kinds queued in one window: one envelope per kind, routed by its kind, holding
    only that kind's records in the order they were sent."""
    exchange = _Exchange(aiormq.spec.Basic.Ack())
    sent = [("opened", 1), ("step", 2), ("close", 3), ("step", 4), ("opened", 5), ("step", 6)]
    async with TelemetryBatcher(exchange, linger_s=0.05) as batcher:  # type: ignore[arg-type]
        async with asyncio.timeout(5):
            await asyncio.gather(*(batcher.send(kind, orjson.dumps({"n": n})) for kind, n in sent))
    envelopes = {routing_key: _records(body) for body, routing_key, _ in exchange.published}
    assert len(exchange.published) == 3
    assert {key: (kind, [r["n"] for r in records]) for key, (kind, records) in envelopes.items()} == {
        "opened": ("opened", [1, 5]),
        "step": ("step", [2, 4, 6]),
        "close": ("close", [3]),
    }


class _SilentExchange:
    """Stands in for a broker that takes a publish and never confirms it."""

    name = "silent"

    async def publish(self, message: Any, routing_key: str, **options: Any) -> Any:
        await asyncio.Event().wait()


async def test_a_confirm_that_never_comes_fails_the_tasks_waiting_on_it() -> None:
    """An envelope the broker never confirms fails its records' future at the batcher's deadline (a timer
    on the envelope, no timeout scope in the task), and the task's flush reports it as TelemetryError: the
    task is not acked, and nothing waits for ever."""
    batcher = TelemetryBatcher(_SilentExchange(), linger_s=0.001, confirm_timeout_s=0.2)  # type: ignore[arg-type]
    async with batcher:
        future = batcher.send("step", orjson.dumps({"n": 1}))
        with pytest.raises(PublishNotConfirmed, match=r"within 0\.2s"):
            await asyncio.wait_for(future, 5)
        publisher = TelemetryPublisher(
            batcher, TaskMessage(task_id="t1", task="x"), adapter="demo", attempt=1
        )
        publisher._pending.append(batcher.send("step", orjson.dumps({"n": 2})))
        with pytest.raises(TelemetryError, match=r"within 0\.2s"):
            await asyncio.wait_for(publisher.flush(), 5)
        for publishing in batcher._publishing:  # the silent publishes would hold close() for ever
            publishing.cancel()


@dataclass
class _Delivery:
    """A delivery of one channel: its acks go to the channel's frame log, in the order they are sent."""

    delivery_tag: int
    frames: list[tuple[int, bool]]

    async def ack(self, multiple: bool = False) -> None:
        await asyncio.sleep(0)  # a real ack awaits the socket: another flush may run meanwhile
        self.frames.append((self.delivery_tag, multiple))


async def test_acks_settled_in_one_turn_go_out_as_one_frame() -> None:
    """Tasks 1-5 settled in one turn of the loop: one basic.ack(multiple=True) at tag 5."""
    frames: list[tuple[int, bool]] = []
    acks = Acks()
    deliveries = [_Delivery(tag, frames) for tag in range(1, 6)]
    for delivery in deliveries:
        acks.delivered(delivery)  # type: ignore[arg-type]
    for delivery in reversed(deliveries):
        acks.ack(delivery)  # type: ignore[arg-type]
    await acks.close()
    assert frames == [(5, True)]
    assert acks.frames_sent == 1


async def test_an_ack_never_covers_a_running_delivery_nor_waits_for_it() -> None:
    """Tag 2 still running: 1, 3 and 4 are acked one by one at once (a slow task does not hold the fast
    ones behind it, and no multiple ack covers it); a delivery handed back (nacked, then forgotten) is
    never covered by any ack."""
    frames: list[tuple[int, bool]] = []
    acks = Acks()
    d = {tag: _Delivery(tag, frames) for tag in range(1, 7)}
    for delivery in d.values():
        acks.delivered(delivery)  # type: ignore[arg-type]
    for tag in (1, 3, 4):
        acks.ack(d[tag])  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert frames == [(1, False), (3, False), (4, False)]
    # 5 is still running (its nack not sent yet): 2 goes alone, 6 on its own.
    acks.ack(d[2])  # type: ignore[arg-type]
    acks.ack(d[6])  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert frames[3:] == [(2, False), (6, False)]
    # Its nack went out: nothing of it in any ack.
    acks.forget(d[5])  # type: ignore[arg-type]
    await acks.close()
    assert [tag for tag, _ in frames] == [1, 3, 4, 2, 6]


async def test_acks_of_successive_turns_go_out_in_order() -> None:
    """A multiple ack made by a later flush is never sent before an earlier flush's single ack of a tag
    below it (the broker would not know that tag any more: a channel error)."""
    frames: list[tuple[int, bool]] = []
    acks = Acks()
    d = {tag: _Delivery(tag, frames) for tag in range(1, 5)}
    for delivery in d.values():
        acks.delivered(delivery)  # type: ignore[arg-type]
    acks.ack(d[2])  # type: ignore[arg-type]
    acks.ack(d[3])  # type: ignore[arg-type]
    await asyncio.sleep(0)  # the first flush: 2 and 3 one by one (1 is running); its sends are queued
    acks.ack(d[1])  # type: ignore[arg-type]
    acks.ack(d[4])  # type: ignore[arg-type]
    await acks.close()
    assert frames == [(2, False), (3, False), (4, True)]


def test_the_runtime_errors_have_their_own_root() -> None:
    """The runtime's errors share WorkerRuntimeError and are still WorkerErrors (``except WorkerError`` keeps
    catching them); the SDK's errors are not runtime errors."""
    for runtime_error in (LedgerUnavailable, SchemaBehind, TelemetryError):
        assert issubclass(runtime_error, WorkerRuntimeError)
        assert issubclass(runtime_error, WorkerError)
    for sdk_error in (AdapterError, AdapterConfigError):
        assert not issubclass(sdk_error, WorkerRuntimeError)
