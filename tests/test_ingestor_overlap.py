"""The overlap of batches in the ingestor, with in-process fakes for the broker and the database: a batch's
finish (append, problems, dead letters, ack) runs on while the next batch is stored, in batch order, and
an assignment noted during an append is never lost."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from typing import Any, cast

import pytest

from ingestor import IngestorSettings
from ingestor._batches import BatchWriter
from ingestor._consumer import Incoming
from ingestor._errors import JsonlWriteError, ShutdownDeadline
from ingestor._health import Hold
from ingestor._jsonl import RollingJsonl
from ingestor._metrics import IngestorMetrics
from tests._ingest_gen import generate


class _NoStore:
    """The store a flush needs only for lines memory does not hold: every line here is in memory."""

    async def lines(self, ids: list[int]) -> dict[int, bytes]:
        raise AssertionError(f"no line should be read from Postgres: {ids}")


async def _append_paused_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, fail_first: bool
) -> tuple[list[bytes], bool]:
    """Flush session 1's line; while its append runs, note session 2's; flush again. Returns the tmp's
    lines and whether something was still pending after the first flush."""
    from ingestor import _files

    entered, release = threading.Event(), threading.Event()
    real_append = _files.append_at
    calls = 0

    def paused_append(path: Path, offset: int, data: bytes) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            entered.set()
            release.wait(10)
            if fail_first:
                real_append(path, offset, data[: len(data) // 2])  # half written, then the disk fails
                raise OSError("disk full")
        return real_append(path, offset, data)

    monkeypatch.setattr(_files, "append_at", paused_append)
    settings = IngestorSettings(jsonl_dir=tmp_path, ingestor_id="unit")
    jsonl = RollingJsonl(settings, cast(Any, _NoStore()))
    target = jsonl.target("token-1")
    jsonl.note_assigned(target, [(1, b'{"session":1}\n')])
    first = asyncio.create_task(jsonl.flush())
    await asyncio.to_thread(entered.wait, 10)
    jsonl.note_assigned(target, [(2, b'{"session":2}\n')])  # the next batch's commit, mid-append
    release.set()
    with contextlib.suppress(JsonlWriteError):
        await first
    pending = jsonl.has_pending
    await jsonl.flush()
    return _files.read_lines(_files.tmp_path(tmp_path, target.name)), pending


async def test_sessions_assigned_during_an_append_are_appended_by_the_next_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's finish appending while the next batch commits loses no line: the later assignment stays
    pending for the next flush, and each line is in the file once."""
    lines, pending = await _append_paused_while(tmp_path, monkeypatch, fail_first=False)
    assert pending
    assert lines == [b'{"session":1}', b'{"session":2}']


async def test_a_failed_append_keeps_what_was_assigned_during_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append that fails halfway while another batch notes its sessions: the retry cuts the half line
    off and appends both batches' lines, once each, in commit order."""
    lines, pending = await _append_paused_while(tmp_path, monkeypatch, fail_first=True)
    assert pending
    assert lines == [b'{"session":1}', b'{"session":2}']


class _Delivery:
    """What the writer reads of a delivery (``channel``: it is not stale)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.message_id = f"m{n}"
        self.routing_key = "step"
        self.channel = object()


class _Broker:
    """Acks wait for ``acks_open``; the first ``failing_acks`` acks raise (a bug in a finish)."""

    def __init__(self, events: list[tuple[str, object]]) -> None:
        self.events = events
        self.acks_open = asyncio.Event()
        self.failing_acks = 0

    async def ack_through(self, delivery: _Delivery) -> None:
        await self.acks_open.wait()
        if self.failing_acks:
            self.failing_acks -= 1
            raise RuntimeError("a bug in the finish")
        self.events.append(("ack", delivery.n))

    async def dead_letter(self, delivery: _Delivery, reason: str, body: bytes | None) -> None:
        self.events.append(("dead", delivery.n))

    async def requeue(self, deliveries: Any) -> None:
        self.events.extend(("requeue", d.n) for d in deliveries)


class _Store:
    """Writes return at once, or, with ``gate`` set, only once it opens (``writing``: those waiting)."""

    def __init__(self, events: list[tuple[str, object]]) -> None:
        self.events = events
        self.gate: asyncio.Event | None = None
        self.writing = 0
        self.unavailable: set[str] = set()

    async def write(self, merged: Any, target: Any) -> list[tuple[int, bytes | None]]:
        names = tuple(s.adapter_session_id for s in merged.sessions)
        self.events.append(("write", names))
        if self.gate is not None:
            self.writing += 1
            await self.gate.wait()
            self.writing -= 1
        if self.unavailable & set(names):
            raise ShutdownDeadline("gave up after the shutdown grace")
        self.events.append(("committed", names))
        return []

    async def record_problems(self, rows: Any) -> None:
        return None


class _Liveness:
    async def ensure(self) -> str:
        return "token-1"


def _writer(
    tmp_path: Path, events: list[tuple[str, object]], in_flight: int = 2, store: _Store | None = None
) -> tuple[BatchWriter, dict[str, int]]:
    settings = IngestorSettings(jsonl_dir=tmp_path, ingestor_id="unit")
    stats = {"batches": 0, "messages": 0, "dead_lettered": 0, "exported": 0}
    writer = BatchWriter(
        store=cast(Any, store or _Store(events)),
        liveness=cast(Any, _Liveness()),
        jsonl=RollingJsonl(settings, cast(Any, _NoStore())),
        hold=Hold(settings, asyncio.Event()),
        metrics=IngestorMetrics(),
        stats=stats,
        in_flight=in_flight,
    )
    return writer, stats


def _incoming(n: int, session: Any) -> Incoming:
    records = [session.opened, *session.steps, session.closed]
    return Incoming(cast(Any, _Delivery(n)), records, [])


async def _until(condition: Any) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("never happened")


async def test_the_next_batch_is_stored_while_the_previous_one_finishes_and_acks_stay_in_order(
    tmp_path: Path,
) -> None:
    """handle() returns before its batch is acked; the next batch is written while that ack still waits,
    and its own finish starts only after the previous one's: acks in batch order."""
    events: list[tuple[str, object]] = []
    writer, stats = _writer(tmp_path, events)
    broker = _Broker(events)
    one, two = generate(2, retry_share=0.0).sessions
    # Returns with its ack still waiting (a writer that finished inline would time out here).
    await asyncio.wait_for(writer.handle([_incoming(1, one)], cast(Any, broker)), timeout=5)
    await _until(lambda: len(events) == 2)
    assert events == [("write", (one.adapter_session_id,)), ("committed", (one.adapter_session_id,))]
    second = asyncio.create_task(writer.handle([_incoming(2, two)], cast(Any, broker)))
    await _until(lambda: len(events) == 4)
    assert events[2:] == [("write", (two.adapter_session_id,)), ("committed", (two.adapter_session_id,))]
    assert not second.done()  # the second batch's finish waits for the first's
    broker.acks_open.set()
    await second
    await writer.settle()
    assert [e for e in events if e[0] == "ack"] == [("ack", 1), ("ack", 2)]
    assert stats["batches"] == 2


async def test_a_bug_in_a_finish_isolates_its_deliveries_and_the_service_goes_on(tmp_path: Path) -> None:
    """An unexpected error in a batch's finish (here its ack) is found when the writer settles: each
    delivery of that batch is handled again alone and acked; nothing is raised to the service."""
    events: list[tuple[str, object]] = []
    writer, stats = _writer(tmp_path, events)
    broker = _Broker(events)
    broker.acks_open.set()
    broker.failing_acks = 1
    one, two = generate(2, retry_share=0.0).sessions
    await writer.handle([_incoming(1, one), _incoming(2, two)], cast(Any, broker))
    await writer.settle()
    writes = [e for e in events if e[0] == "write"]
    assert writes == [
        ("write", tuple(sorted((one.adapter_session_id, two.adapter_session_id)))),
        ("write", (one.adapter_session_id,)),
        ("write", (two.adapter_session_id,)),
    ]
    assert [e for e in events if e[0] == "ack"] == [("ack", 1), ("ack", 2)]
    assert stats["batches"] == 2
    assert stats["dead_lettered"] == 0


async def test_batches_in_flight_write_side_by_side_and_finish_in_order(tmp_path: Path) -> None:
    """With three batches in flight, two transactions wait on the database at once while the caller
    collects the next batch; the one that commits first is still acked second, after its elder."""
    events: list[tuple[str, object]] = []
    store = _Store(events)
    store.gate = asyncio.Event()
    writer, stats = _writer(tmp_path, events, in_flight=3, store=store)
    broker = _Broker(events)
    broker.acks_open.set()
    one, two = generate(2, retry_share=0.0).sessions
    await asyncio.wait_for(writer.handle([_incoming(1, one)], cast(Any, broker)), timeout=5)
    await asyncio.wait_for(writer.handle([_incoming(2, two)], cast(Any, broker)), timeout=5)
    await _until(lambda: store.writing == 2)  # both transactions open at once
    store.gate.set()
    await writer.settle()
    acks = [e for e in events if e[0] == "ack"]
    assert acks == [("ack", 1), ("ack", 2)]
    assert stats["batches"] == 2


async def test_a_batch_given_back_is_requeued_before_a_later_batch_acks(tmp_path: Path) -> None:
    """A batch dropped unacked (the shutdown deadline hit its transaction) while the next one commits: its
    deliveries are requeued, and only then is the later batch acked (``multiple=True`` would cover them)."""
    events: list[tuple[str, object]] = []
    store = _Store(events)
    writer, stats = _writer(tmp_path, events, in_flight=3, store=store)
    broker = _Broker(events)
    broker.acks_open.set()
    one, two = generate(2, retry_share=0.0).sessions
    store.unavailable = {one.adapter_session_id}
    await writer.handle([_incoming(1, one)], cast(Any, broker))
    await writer.handle([_incoming(2, two)], cast(Any, broker))
    await writer.settle()
    settled = [e for e in events if e[0] in {"ack", "requeue"}]
    assert settled == [("requeue", 1), ("ack", 2)]
    assert stats["batches"] == 1
