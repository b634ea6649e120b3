"""Every succeeded task is stored and exported, or accounted for: the failures users reported, end to end on
real services (producer -> worker processes -> ingestor -> PostgreSQL + JSONL), each ending with an audit
that finds nothing unexplained."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest

from ingestor import read_lines
from schemas import NUL_ESCAPE, TaskMessage, limits
from tests._pipeline import PipelineStack

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]

_ADAPTERS = (
    "--adapter",
    "demo=worker.adapters:DemoAdapter",
    "--adapter",
    "huge=tests._adapters:HugeOutput",
    "--adapter",
    "events=tests._adapters:ManyEvents",
    "--adapter",
    "giant=tests._adapters:GiantUsage",
)


async def _settled(stack: PipelineStack, expected: int, timeout_s: float) -> None:
    """Wait until ``expected`` tasks are settled in the ledger and every succeeded one is exported."""
    conn = await asyncpg.connect(stack.database_url)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            settled = await conn.fetchval(
                "SELECT count(*) FROM task_ledger WHERE state IN ('succeeded', 'dead')"
            )
            pending = await conn.fetchval(
                "SELECT count(*) FROM task_ledger l LEFT JOIN sessions s"
                " ON s.adapter_session_id = l.adapter_session_id"
                " WHERE l.state = 'succeeded' AND (s.export_file IS NULL)"
            )
            if settled >= expected and pending == 0:
                return
            assert time.monotonic() < deadline, f"{settled}/{expected} settled, {pending} not exported"
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


def _lines(stack: PipelineStack) -> dict[str, dict[str, Any]]:
    """adapter_session_id -> line, over every finalised file (each session must appear once)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in stack.jsonl_dir.iterdir() if not p.name.startswith(".")):
        for raw in read_lines(path):
            line = orjson.loads(raw)
            assert line["adapter_session_id"] not in found, "a session in two lines"
            found[line["adapter_session_id"]] = line
    return found


async def _sessions_by_task(stack: PipelineStack) -> dict[str, asyncpg.Record]:
    conn = await asyncpg.connect(stack.database_url)
    try:
        rows = await conn.fetch(
            "SELECT s.task_id, s.adapter_session_id, s.status, s.task, s.metadata FROM sessions s"
            " JOIN task_ledger l ON l.adapter_session_id = s.adapter_session_id WHERE l.state = 'succeeded'"
        )
        return {r["task_id"]: r for r in rows}
    finally:
        await conn.close()


async def test_oversized_records_take_no_innocent_session_with_them(pipeline: PipelineStack) -> None:
    """300 ordinary tasks beside 10 with a 1.5 MB output, 5 whose adapter emits 500 events of 1 KB and a
    200,000-emoji task: every one is stored and exported exactly once; the big values are cut by the
    documented rule (marker, original size in the step's metadata; the newest 50 events in the close)."""
    tasks = [TaskMessage(task_id=f"plain-{i}", task=f"ordinary task {i}", adapter="demo") for i in range(300)]
    tasks += [TaskMessage(task_id=f"huge-{i}", task=f"huge output {i}", adapter="huge") for i in range(10)]
    tasks += [TaskMessage(task_id=f"events-{i}", task=f"many events {i}", adapter="events") for i in range(5)]
    tasks.append(TaskMessage(task_id="emoji", task="😀" * 200_000, adapter="demo"))
    await pipeline.submit(tasks)
    pipeline.start_ingestor()
    pipeline.start_worker("w1", *_ADAPTERS, "--concurrency", "16")
    await _settled(pipeline, len(tasks), timeout_s=240)
    pipeline.stop_all(signal.SIGTERM)
    report = await pipeline.audit()
    assert (report.checked, report.exported) == (len(tasks), len(tasks))
    lines = _lines(pipeline)
    sessions = await _sessions_by_task(pipeline)
    assert set(sessions) == {t.task_id for t in tasks}
    for i in range(10):
        line = lines[sessions[f"huge-{i}"]["adapter_session_id"]]
        (step,) = [s for s in line["steps"] if s["phase"] == "execute"]
        assert step["output"].endswith("…[truncated: 1500000 bytes in all]")
        assert step["metadata"]["limits"]["output"]["original_bytes"] == 1_500_000
    for i in range(5):
        line = lines[sessions[f"events-{i}"]["adapter_session_id"]]
        assert [e["i"] for e in line["adapter_events"]] == list(range(450, 500))
        (step,) = [s for s in line["steps"] if s["phase"] == "execute"]
        assert len(step["adapter_events"]) == 500
    emoji = lines[sessions["emoji"]["adapter_session_id"]]
    assert emoji["task"] == "😀" * 200_000


async def test_nul_text_and_giant_counts_are_stored_or_accounted(pipeline: PipelineStack) -> None:
    """A task with NUL in its text is stored with NUL written as \\u0000; an adapter reporting 10**30 tokens
    fails its step with the reason (the task is dead, not 'succeeded'); the audit explains everything."""
    tasks = [
        TaskMessage(task_id="nul", task="before\x00after", adapter="demo", metadata={"k\x00": "v\x00"}),
        TaskMessage(task_id="giant", task="count the tokens", adapter="giant"),
        *(TaskMessage(task_id=f"ok-{i}", task=f"fine {i}", adapter="demo") for i in range(20)),
    ]
    await pipeline.submit(tasks)
    pipeline.start_ingestor()
    pipeline.start_worker("w1", *_ADAPTERS, ATLAS_MAX_ATTEMPTS="2")
    await _settled(pipeline, len(tasks), timeout_s=120)
    pipeline.stop_all(signal.SIGTERM)
    await pipeline.audit()
    sessions = await _sessions_by_task(pipeline)
    assert "giant" not in sessions
    nul = sessions["nul"]
    assert nul["task"] == f"before{NUL_ESCAPE}after"
    metadata = orjson.loads(nul["metadata"])
    assert metadata["task_metadata"] == {f"k{NUL_ESCAPE}": f"v{NUL_ESCAPE}"}
    assert metadata["limits"]["task"] == {"nul_escaped": True}
    ledger = {r["task_id"]: r for r in await pipeline.ledger()}
    assert ledger["giant"]["state"] == "dead"
    assert f"over the limit of {limits.MAX_COUNT}" in ledger["giant"]["last_error"]
    lines = _lines(pipeline)
    failed = [line for line in lines.values() if line["session_metadata"]["status"] == "failed"]
    assert len(lines) == 21 + 2  # failed sessions are exported too (reward models learn from them)
    assert len(failed) == 2
    assert all("over the limit" in line["session_metadata"]["reason"] for line in failed)


async def test_a_forged_retry_header_cannot_start_a_second_run(pipeline: PipelineStack) -> None:
    """The same task sent again with an x-atlas-retry header while its first run is going is dropped as a
    duplicate: one session, one attempt, stored and exported, and the audit finds nothing unexplained."""
    task = TaskMessage(task_id="once", task="take your time", adapter="slow")
    await pipeline.submit([task])
    pipeline.start_ingestor()
    pipeline.start_worker("w1", "--adapter", "slow=tests._adapters:Slow", "--concurrency", "4")
    conn = await asyncpg.connect(pipeline.database_url)
    try:
        for _ in range(100):
            if await conn.fetchval("SELECT state FROM task_ledger WHERE task_id = 'once'") == "running":
                break
            await asyncio.sleep(0.05)
        connection = await aio_pika.connect(pipeline.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange, _ = await pipeline.topology.declare_tasks(channel)
            forged = aio_pika.Message(
                task.model_dump_json().encode(), message_id="once", headers={"x-atlas-retry": 1}
            )
            await exchange.publish(forged, "task")
        await _settled(pipeline, 1, timeout_s=60)
        await asyncio.sleep(2)  # the forged copy had all this time to start (and open) a run of its own
        sessions = await conn.fetch("SELECT attempt, status FROM sessions WHERE task_id = 'once'")
        assert [(r["attempt"], r["status"]) for r in sessions] == [(1, "succeeded")]
        row = await conn.fetchrow("SELECT state, attempts FROM task_ledger WHERE task_id = 'once'")
        assert (row["state"], row["attempts"]) == ("succeeded", 1)
    finally:
        await conn.close()
    assert await pipeline.queue_depth(pipeline.topology.tasks_queue, expect=0) == 0
    pipeline.stop_all(signal.SIGTERM)
    report = await pipeline.audit()
    assert (report.checked, report.exported, report.unexplained) == (1, 1, 0)
