"""What the worker publishes is valid wire contract (records are built without re-validation)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from schemas import (
    DecodeError,
    SessionClosed,
    SessionOpened,
    StepRecorded,
    TaskMessage,
    decode_telemetry,
    encode,
)
from worker.adapters import DemoAdapter
from worker.runtime._telemetry import TelemetryPublisher
from worker.sessions import AdapterError, PythonAdapter, Student

Record = SessionOpened | StepRecorded | SessionClosed


class _Collecting:
    """Stands in for the TelemetryBatcher: keeps every record (decoded from the bytes it was sent) and
    confirms it at once."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.bodies: list[bytes] = []

    def send(self, kind: str, body: bytes) -> asyncio.Future[None]:
        record = decode_telemetry(body)
        assert record.kind == kind
        self.records.append(record)
        self.bodies.append(body)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def _round_trips(record: Record) -> None:
    body = encode(record)
    assert encode(decode_telemetry(body)) == body


async def test_worker_records_validate() -> None:
    """Every record of a demo run (opened, steps, close) decodes under the contract, byte for byte."""
    sink = _Collecting()
    task = TaskMessage(task="Compare two retrieval strategies " * 50, metadata={"team": "rl"})
    publisher = TelemetryPublisher(sink, task, adapter="demo", attempt=2)  # type: ignore[arg-type]
    await Student(DemoAdapter()).run(task.task, task_id=task.task_id, observer=publisher)
    publisher.publish_close()
    await publisher.flush()
    kinds = [r.kind for r in sink.records]
    assert kinds[0] == "session.opened"
    assert kinds[-1] == "session.closed"
    assert set(kinds[1:-1]) == {"step"}
    for record in sink.records:
        _round_trips(record)
    opened = sink.records[0]
    assert isinstance(opened, SessionOpened)
    assert (opened.adapter, opened.attempt, opened.task_metadata) == ("demo", 2, {"team": "rl"})


class _Broken:
    def on_step(self, metadata: dict[str, Any]) -> Any:
        if metadata["phase"] == "execute":
            raise ValueError("x" * 50_000)  # longer than the wire's reason limit
        return {"steps": [{"id": 1, "description": "only step"}]}


async def test_failed_and_cut_short_sessions_still_validate() -> None:
    """An error step with a huge message, the failed close, and a re-stated abandoned close all decode."""
    sink = _Collecting()
    task = TaskMessage(task="t")
    publisher = TelemetryPublisher(sink, task, adapter="broken", attempt=1)  # type: ignore[arg-type]
    with pytest.raises(AdapterError):
        await Student(PythonAdapter(_Broken)).run(task.task, task_id=task.task_id, observer=publisher)
    publisher.publish_close()
    close = publisher.close_instead("abandoned", "worker stopped")
    assert close is not None
    publisher.publish_close()
    for record in sink.records:
        _round_trips(record)
    statuses = [r.status for r in sink.records if isinstance(r, SessionClosed)]
    assert statuses == ["failed", "abandoned"]


def test_a_bad_record_would_be_caught_at_decode() -> None:
    """The guard the test above relies on: a constructed record that breaks the contract fails to decode."""
    wrong: dict[str, Any] = {"phase": "dream", "started_at": None, "finished_at": None}
    bad = StepRecorded.model_construct(adapter_session_id="s", task_id="t", seq=1, step_id=1, **wrong)
    with pytest.raises(DecodeError):
        decode_telemetry(encode(bad))


class _NotJson:
    def on_step(self, metadata: dict[str, Any]) -> Any:
        if metadata["phase"] == "plan":
            return {"steps": [{"id": 1, "description": "measure"}]}
        return {"output": {"score": float("nan"), "bounds": [float("-inf"), float("inf")]}}


async def test_non_json_floats_cannot_poison_an_envelope() -> None:
    """NaN / Infinity in an adapter's output are written as null, so the record (and the envelope it shares
    with other sessions' records) stays valid JSON."""
    sink = _Collecting()
    task = TaskMessage(task="t")
    publisher = TelemetryPublisher(sink, task, adapter="odd", attempt=1)  # type: ignore[arg-type]
    await Student(PythonAdapter(_NotJson)).run(task.task, task_id=task.task_id, observer=publisher)
    executes = [r for r in sink.records if isinstance(r, StepRecorded) and r.phase == "execute"]
    decoded = decode_telemetry(encode(executes[0]))
    assert isinstance(decoded, StepRecorded)
    assert decoded.output == {"score": None, "bounds": [None, None]}


class _BadUnicode:
    def on_step(self, metadata: dict[str, Any]) -> Any:
        if metadata["phase"] == "plan":
            return {"steps": [{"id": 1, "description": "decode"}]}
        return "half a character: \ud800 then more"


async def test_lone_surrogates_are_replaced_not_fatal() -> None:
    """Text that cannot be UTF-8 (a lone surrogate) is replaced in the record; the session does not fail."""
    sink = _Collecting()
    task = TaskMessage(task="t")
    publisher = TelemetryPublisher(sink, task, adapter="odd", attempt=1)  # type: ignore[arg-type]
    await Student(PythonAdapter(_BadUnicode)).run(task.task, task_id=task.task_id, observer=publisher)
    executes = [r for r in sink.records if isinstance(r, StepRecorded) and r.phase == "execute"]
    decoded = decode_telemetry(encode(executes[0]))
    assert decoded.output == "half a character: ? then more"  # type: ignore[union-attr]


class _BadSessionId:
    """An adapter whose sessions carry an id no record may carry (spaces, too long)."""

    name = "bad-id"

    async def open_session(self, context: Any) -> Any:
        from worker import StatelessSession

        session = StatelessSession(PythonAdapter(_NotJson), context)
        session._session_id = "not a valid id " * 20
        return session


async def test_an_invalid_adapter_session_id_fails_the_session_not_the_envelope() -> None:
    """A session id the wire refuses would get every record refused downstream: the session fails at once,
    saying why, and nothing is published under that id."""
    sink = _Collecting()
    task = TaskMessage(task="t")
    publisher = TelemetryPublisher(sink, task, adapter="odd", attempt=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is not a valid identifier"):
        await Student(_BadSessionId()).run(task.task, task_id=task.task_id, observer=publisher)  # type: ignore[arg-type]
    assert sink.records == []
