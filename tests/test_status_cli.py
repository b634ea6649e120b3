"""``python -m producer status``: queue depths, database counts, ingestion lag, and how it degrades.

Real RabbitMQ and PostgreSQL; the command runs as a subprocess, as an operator would run it.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from datetime import UTC, datetime, timedelta

import aio_pika
import asyncpg
import orjson
import pytest

from atlas_common import DEAD_TASK_ROUTING_KEY, dead_letter_headers
from producer import demo_tasks
from producer._status import oldest_emitted_at
from schemas import SessionOpened, encode_telemetry_batch
from tests._pipeline import ROOT, PipelineStack
from tests.conftest import MakeDatabase

pytestmark = pytest.mark.integration


async def _status(pipeline: PipelineStack, *args: str, **env: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "producer",
        "status",
        *args,
        env=pipeline.env(**env),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _declare_all(pipeline: PipelineStack) -> None:
    connection = await aio_pika.connect(pipeline.amqp_url)
    async with connection:
        channel = await connection.channel()
        await pipeline.topology.declare_tasks(channel)
        await pipeline.topology.declare_ingestor(channel)


async def _insert_rows(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.executemany(
            "INSERT INTO sessions (task, status, task_id) VALUES ($1, $2, $3)",
            [
                ("a", "succeeded", "t-a"),
                ("b", "succeeded", "t-b"),
                ("c", "running", "t-c"),
                ("legacy", "x", None),
            ],
        )
        await conn.executemany(
            "INSERT INTO task_ledger (task_id, state) VALUES ($1, $2)",
            [("t-a", "succeeded"), ("t-b", "succeeded"), ("t-d", "dead")],
        )
        await conn.executemany(
            "INSERT INTO jsonl_files (name, ingestor_id, owner_token, state, sessions, finalized_at) "
            "VALUES ($1, 'ing', 'tok', $2, $3, $4)",
            [
                ("old.jsonl", "final", 5, datetime(2025, 1, 1, tzinfo=UTC)),
                ("new.jsonl", "final", 7, datetime(2025, 1, 2, tzinfo=UTC)),
                ("open.jsonl", "open", 1, None),
            ],
        )
    finally:
        await conn.close()


async def test_status_json_shows_depths_counts_and_lag(pipeline: PipelineStack) -> None:
    """status --json: ready/consumers per queue, DB counts, newest JSONL, lag; the peek consumes nothing."""
    await _declare_all(pipeline)
    await pipeline.submit(demo_tasks(2, run_id=uuid.uuid4().hex[:8]))
    topology = pipeline.topology
    connection = await aio_pika.connect(pipeline.amqp_url)
    emitted = datetime.now(UTC) - timedelta(seconds=90)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        telemetry = await channel.get_exchange(topology.telemetry_exchange)
        records = [
            SessionOpened(adapter_session_id=f"as-{n}", task_id="t", adapter="demo", task="x", emitted_at=at)
            for n, at in enumerate((emitted + timedelta(seconds=30), emitted))
        ]
        await telemetry.publish(aio_pika.Message(encode_telemetry_batch(records)), "session.opened")
        dead = await channel.get_exchange(topology.dead_exchange)
        headers = dead_letter_headers("poison", source="worker", routing_key="task")
        await dead.publish(aio_pika.Message(b"{}", headers=headers), DEAD_TASK_ROUTING_KEY)
    await _insert_rows(pipeline.database_url)

    rc, out, err = await _status(pipeline, "--json")

    assert rc == 0, err
    data = orjson.loads(out)
    queues = {q["name"]: q for q in data["broker"]["queues"]}
    expected = {
        topology.tasks_queue: 2,
        topology.dead_tasks_queue: 1,
        topology.ingestor_queue: 1,
        topology.dead_telemetry_queue: 0,
        **{topology.retry_queue(ms): 0 for ms in topology.retry_delays_ms()},
    }
    assert {name: q["ready"] for name, q in queues.items()} == expected
    assert all(q["present"] and q["consumers"] == 0 for q in queues.values())
    lag = data["ingestion_lag"]
    assert lag["state"] == "ok"
    assert 90 <= lag["seconds"] < 600
    assert datetime.fromisoformat(lag["oldest_emitted_at"]) == emitted
    db = data["database"]
    assert db["reachable"]
    assert db["sessions_by_status"] == {"succeeded": 2, "running": 1}
    assert db["task_ledger_by_state"] == {"succeeded": 2, "dead": 1}
    assert db["newest_jsonl_file"]["name"] == "new.jsonl"
    assert db["newest_jsonl_file"]["sessions"] == 7
    assert db["missing"] == []
    assert await pipeline.queue_depth(topology.ingestor_queue, expect=1) == 1


async def test_status_text_table(pipeline: PipelineStack) -> None:
    """The default output is a readable table, with '0 (queue empty)' when no telemetry waits."""
    await _declare_all(pipeline)
    await _insert_rows(pipeline.database_url)

    rc, out, err = await _status(pipeline)

    assert rc == 0, err
    assert "queue" in out
    assert "consumers" in out
    assert pipeline.topology.tasks_queue in out
    assert pipeline.topology.dead_telemetry_queue in out
    assert "ingestion lag: 0 (queue empty)" in out
    assert "succeeded 2, running 1" in out
    assert "succeeded 2, dead 1" in out
    assert "new.jsonl (7 sessions" in out


async def test_status_without_migrations_or_queues(
    pipeline: PipelineStack, make_database: MakeDatabase
) -> None:
    """Undeclared queues show as absent and missing tables are named; the exit status is still 0."""
    empty_db = await make_database()

    rc, out, err = await _status(pipeline, "--database-url", empty_db)

    assert rc == 0, err
    assert "absent" in out
    assert "table task_ledger" in out
    assert "atlas-migrate" in out
    assert "Traceback" not in out + err


async def test_status_with_unreachable_database(pipeline: PipelineStack) -> None:
    """An unreachable database is reported (without its password) next to the broker part; exit 0."""
    await _declare_all(pipeline)

    rc, out, err = await _status(
        pipeline, "--json", DATABASE_URL="postgresql://postgres:db-s3cret@127.0.0.1:1/atlas"
    )

    assert rc == 0, err
    data = orjson.loads(out)
    assert data["database"]["reachable"] is False
    assert "cannot reach PostgreSQL" in data["database"]["error"]
    assert data["broker"]["queues"][0]["present"] is True
    assert "db-s3cret" not in out + err


async def test_status_with_unreachable_broker(pipeline: PipelineStack) -> None:
    """An unreachable broker: one clear line on stderr, exit status 2, the password never printed."""
    rc, out, err = await _status(pipeline, AMQP_URL="amqp://guest:amqp-s3cret@127.0.0.1:1/")

    assert rc == 2
    assert out == ""
    assert err.strip().count("\n") == 0, err
    assert err.startswith("error: cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/")
    assert "amqp-s3cret" not in err


def test_oldest_emitted_at() -> None:
    """The lag reads the smallest emitted_at of a batch envelope or of a single record, else None."""
    early = datetime(2025, 1, 1, tzinfo=UTC)
    late = early + timedelta(minutes=5)
    records = [{"emitted_at": late.isoformat()}, {"emitted_at": early.isoformat()}]
    batch = {"schema_version": 1, "kind": "step", "records": records}
    assert oldest_emitted_at(orjson.dumps(batch)) == early
    assert oldest_emitted_at(orjson.dumps({"emitted_at": "2025-01-01T00:00:00Z"})) == early
    assert oldest_emitted_at(b"not json") is None
    assert oldest_emitted_at(b"[1, 2]") is None
