"""Harness for ingestor tests: fresh settings per test, a running ingestor, table snapshots, drains."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import orjson

from atlas_common import Topology, configure_logging
from ingestor import Ingestor, IngestorSettings, read_lines
from ingestor._batch import merge_batch
from ingestor._store import Store
from ingestor._write import FileTarget
from migrations import apply_migrations
from tests._ingest_gen import Generated


async def fresh_settings(
    make_database: Callable[[], Awaitable[str]], amqp_url: str, jsonl_dir: Path, **overrides: Any
) -> IngestorSettings:
    """A migrated database of its own, a unique broker prefix, and fast timers."""
    database_url = await make_database()
    await apply_migrations(database_url)
    values: dict[str, Any] = {
        "amqp_url": amqp_url,
        "database_url": database_url,
        "prefix": f"t{uuid.uuid4().hex[:12]}",
        "jsonl_dir": jsonl_dir,
        "batch_max_messages": 200,
        "flush_interval_s": 0.05,
        "jsonl_max_age_s": 2.0,
        "recovery_interval_s": 1.0,
        "sweep_interval_s": 2.0,
        "db_retry_backoff_max_s": 0.5,
        "log_level": "WARNING",
    }
    values.update(overrides)
    configure_logging(level=str(values["log_level"]), log_format="console")
    return IngestorSettings(**values)


@contextlib.asynccontextmanager
async def running(settings: IngestorSettings) -> AsyncIterator[Ingestor]:
    """An in-process ingestor; leaving the block stops it the way SIGTERM does and waits for it."""
    stop = asyncio.Event()
    ingestor = Ingestor(settings)
    task = asyncio.create_task(ingestor.run(stop))
    try:
        yield ingestor
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)


async def wait_for(check: Callable[[], Awaitable[bool]], *, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.2)


async def ready_count(amqp_url: str, topology: Topology, *, consumers: bool = False) -> int:
    """Ready messages in the ingestor queue (or, with ``consumers``, how many consumers it has)."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(topology.ingestor_queue, passive=True)
        result = declared.declaration_result
        return int((result.consumer_count if consumers else result.message_count) or 0)
    finally:
        await connection.close()


async def db_counts(database_url: str) -> tuple[int, int, int]:
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM sessions), (SELECT count(*) FROM step_results),"
            " (SELECT count(*) FROM sessions WHERE steps_expected IS NOT NULL)"
        )
        return int(row[0]), int(row[1]), int(row[2])
    finally:
        await conn.close()


def gen_counts(gen: Generated) -> tuple[int, int, int]:
    return (
        len(gen.sessions),
        sum(len(s.steps) for s in gen.sessions),
        sum(s.closed is not None for s in gen.sessions),
    )


async def wait_drained(settings: IngestorSettings, gen: Generated, *, within: float = 60) -> None:
    """Until the queue is empty and every generated row is in Postgres."""
    topology = settings.topology()
    want = gen_counts(gen)

    async def done() -> bool:
        return (
            await ready_count(settings.amqp_url, topology) == 0
            and await db_counts(settings.database_url) == want
        )

    await wait_for(done, within=within, what=f"drain to {want}")


async def wait_for_rows(settings: IngestorSettings, sessions: int, steps: int, *, within: float = 60) -> None:
    async def done() -> bool:
        got = await db_counts(settings.database_url)
        return got[:2] == (sessions, steps) and await ready_count(settings.amqp_url, settings.topology()) == 0

    await wait_for(done, within=within, what=f"{sessions} sessions and {steps} steps")


SESSION_COLUMNS = (
    "adapter_session_id, task_id, task, status, metadata, final_answer, created_at, completed_at, "
    "adapter_usage, adapter_events, attempt, steps_expected, reward, student_learning, teacher_learning"
)


async def snapshot(database_url: str) -> dict[str, Any]:
    """The tables as values, keyed by adapter session (ids and file names are left out: they vary)."""
    conn = await asyncpg.connect(database_url)
    try:
        sessions = {
            r["adapter_session_id"]: dict(r)
            for r in await conn.fetch(f"SELECT {SESSION_COLUMNS} FROM sessions")  # noqa: S608
        }
        steps = {
            (r["asid"], r["step_id"]): dict(r)
            for r in await conn.fetch(
                "SELECT s.adapter_session_id AS asid, r.step_id, r.trace, r.output, r.evaluation, r.attempts,"
                " r.metadata, r.adapter_session_id, r.adapter_usage, r.adapter_events"
                " FROM step_results r JOIN sessions s ON s.id = r.session_id"
            )
        }
        plans = {
            r["adapter_session_id"]: r["plan"]
            for r in await conn.fetch(
                "SELECT s.adapter_session_id, p.plan FROM plans p JOIN sessions s ON s.id = p.session_id"
            )
        }
    finally:
        await conn.close()
    return {"sessions": sessions, "step_results": steps, "plans": plans}


async def reference_snapshot(
    make_database: Callable[[], Awaitable[str]], gen: Generated, *, skip: Collection[str] = ()
) -> dict[str, Any]:
    """What one in-order delivery gives: the generated messages (less the ``skip`` message ids) written in
    order, in batches of 50, by the ingestor's own store into a database of its own."""
    database_url = await make_database()
    await apply_migrations(database_url)
    settings = IngestorSettings(database_url=database_url, ingestor_id="reference")
    target = FileTarget("sessions-20000101T000000.000000Z-reference-000001.jsonl", "reference/0/1")
    messages = [m for m in gen.in_order() if f"{m.adapter_session_id}:{m.seq}" not in skip]
    async with Store(settings) as store:
        for start in range(0, len(messages), 50):
            await store.write(merge_batch(messages[start : start + 50]), target)
    return await snapshot(database_url)


def final_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.startswith("sessions-"))


def exported_counts(directory: Path) -> collections.Counter[str]:
    """How many lines each adapter session has across the finalized files."""
    counts: collections.Counter[str] = collections.Counter()
    for path in final_files(directory):
        for line in read_lines(path):
            counts[orjson.loads(line)["adapter_session_id"]] += 1
    return counts


async def open_files(database_url: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        return [r["name"] for r in await conn.fetch("SELECT name FROM jsonl_files WHERE state = 'open'")]
    finally:
        await conn.close()


async def dead_letters(amqp_url: str, topology: Topology) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.dead_telemetry_queue, passive=True)
        out = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            out.append(message)
        return out
    finally:
        await connection.close()


async def delete_topology(amqp_url: str, topology: Topology) -> None:
    """Remove the test's queues and exchanges from the shared broker."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queues = (topology.ingestor_queue, topology.dead_telemetry_queue, topology.dead_tasks_queue)
        for queue in (*queues, topology.sessions_stream):
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.queue_delete(queue)
        for exchange in (topology.telemetry_exchange, topology.dead_exchange):
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.exchange_delete(exchange)
    finally:
        await connection.close()


def check_against_generated(got: dict[str, Any], gen: Generated) -> None:
    """Independent of the ingestor's merge code: the rows say what the generated sessions say."""
    statuses = gen.expected_status()
    assert set(got["sessions"]) == set(statuses)
    for s in gen.sessions:
        row = got["sessions"][s.adapter_session_id]
        assert row["status"] == statuses[s.adapter_session_id]
        assert (row["task"], row["task_id"], row["attempt"]) == (s.opened.task, s.task_id, s.attempt)
        assert row["created_at"] == s.opened.opened_at
        metadata = orjson.loads(row["metadata"])
        assert metadata["adapter_session"]["adapter_session_id"] == s.adapter_session_id
        assert metadata["execution_mode"] == s.opened.execution_mode
        if s.closed is not None:
            assert row["final_answer"] == s.closed.final_answer
            assert row["completed_at"] == s.closed.closed_at
            assert orjson.loads(row["adapter_usage"]) == s.closed.totals.model_dump()
            assert orjson.loads(row["adapter_events"]) == s.closed.events
            assert got["plans"][s.adapter_session_id] is not None
        elif row["status"] == "abandoned":
            assert row["completed_at"] is not None
            assert metadata["reason"].startswith("superseded by attempt ")
        for step in s.steps:
            stored = got["step_results"][(s.adapter_session_id, step.step_id)]
            assert stored["trace"] == step.trace
            assert orjson.loads(stored["metadata"])["seq"] == step.seq
    assert len(got["step_results"]) == sum(len(s.steps) for s in gen.sessions)
