"""The ingestor against real RabbitMQ and PostgreSQL: exactness, dead letters, JSONL, export, outages."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson
import pytest

from atlas_common import REASON_HEADER, SOURCE_HEADER
from ingestor import read_lines
from tests._ingest_env import (
    check_against_generated,
    db_counts,
    dead_letters,
    delete_topology,
    exported_counts,
    final_files,
    fresh_settings,
    gen_counts,
    open_files,
    reference_snapshot,
    running,
    snapshot,
    wait_drained,
    wait_for,
    wait_for_rows,
)
from tests._ingest_gen import BAD_RECORD, INVALID_BODIES, bodies, generate, publish
from tests._proxy import TcpProxy

pytestmark = pytest.mark.integration


async def test_duplicated_reordered_invalid(make_database, amqp_url: str, tmp_path: Path, cleanup) -> None:
    """Shuffled, 30%-duplicated, partly invalid telemetry: in-order tables, reasoned DLQ, one line each."""
    gen = generate(200, seed=11)
    # A file rolls between batches, once what was appended reaches the limit. Shuffled, a session is
    # complete only near the end of the stream; with 5 batches in flight the last ones could all be
    # admitted before any line was appended (a loaded machine), so everything went to one file. With 2,
    # the roll is due while most sessions are still to come, and two transactions still overlap.
    settings = await fresh_settings(
        make_database, amqp_url, tmp_path / "jsonl", jsonl_max_bytes=64 * 1024, batches_in_flight=2
    )
    cleanup.append(settings.topology())
    items = bodies(
        gen.in_order(),
        rng=random.Random(3),
        duplicate_share=0.3,
        invalid=INVALID_BODIES,
        bad_records=[BAD_RECORD],
    )
    await publish(amqp_url, settings.topology(), items)
    async with running(settings):
        await wait_drained(settings, gen)
    got = await snapshot(settings.database_url)
    assert got == await reference_snapshot(make_database, gen)
    check_against_generated(got, gen)
    dead = await dead_letters(amqp_url, settings.topology())
    assert sorted(m.body for m in dead) == sorted([*INVALID_BODIES, orjson.dumps(BAD_RECORD)])
    assert all(m.headers[SOURCE_HEADER] == "ingestor" and m.headers[REASON_HEADER] for m in dead)
    counts = exported_counts(settings.jsonl_dir)
    assert set(counts) == gen.exported()
    assert set(counts.values()) == {1}
    assert len(list(settings.jsonl_dir.iterdir())) > 1  # rolled by size at least once
    assert await open_files(settings.database_url) == []
    assert not [p for p in settings.jsonl_dir.iterdir() if p.name.startswith(".")]


async def test_two_ingestors(make_database, amqp_url: str, tmp_path: Path, cleanup) -> None:
    """Two ingestors on one queue and one database give the exact tables and one JSONL line per session."""
    gen = generate(200, seed=12)
    settings = await fresh_settings(make_database, amqp_url, tmp_path / "jsonl", batch_max_messages=40)
    cleanup.append(settings.topology())
    await publish(
        amqp_url, settings.topology(), bodies(gen.in_order(), rng=random.Random(4), duplicate_share=0.3)
    )
    second = settings.model_copy(update={"ingestor_id": "second-ingestor"})
    async with running(settings) as one, running(second) as two:
        await wait_drained(settings, gen)
    assert one.stats["messages"] > 0
    assert two.stats["messages"] > 0
    got = await snapshot(settings.database_url)
    assert got == await reference_snapshot(make_database, gen)
    check_against_generated(got, gen)
    counts = exported_counts(settings.jsonl_dir)
    assert set(counts) == gen.exported()
    assert set(counts.values()) == {1}
    assert await open_files(settings.database_url) == []


async def test_nul_message_dead_lettered(make_database, amqp_url: str, tmp_path: Path, cleanup) -> None:
    """NUL-byte records are dead-lettered, named with the field at fault and noted in telemetry_problems,
    while the rest of their batch lands."""
    gen = generate(30, seed=13, retry_share=0)
    victim_step = gen.sessions[3].steps[1]
    gen.sessions[3].steps[1] = victim_step.model_copy(update={"trace": "bad\x00trace"})
    victim_open = gen.sessions[7].opened
    gen.sessions[7].opened = victim_open.model_copy(update={"task_metadata": {"k": "nul\x00here"}})
    bad_ids = {f"{victim_step.adapter_session_id}:{victim_step.seq}", f"{victim_open.adapter_session_id}:0"}
    settings = await fresh_settings(
        make_database, amqp_url, tmp_path / "jsonl", batch_max_messages=1000, flush_interval_s=1.0
    )
    cleanup.append(settings.topology())
    await publish(amqp_url, settings.topology(), bodies(gen.in_order()))
    async with running(settings) as ingestor:
        await wait_for_rows(settings, len(gen.sessions), sum(len(s.steps) for s in gen.sessions) - 1)
    assert ingestor.stats["batches"] == 1
    dead = await dead_letters(amqp_url, settings.topology())
    assert {"{adapter_session_id}:{seq}".format(**orjson.loads(m.body)) for m in dead} == bad_ids
    reasons = sorted(str(m.headers[REASON_HEADER]) for m in dead)
    assert reasons == [
        "rejected: task_metadata holds a NUL character, which jsonb cannot hold",
        "rejected: trace holds a NUL character, which PostgreSQL text cannot hold",
    ]
    conn = await asyncpg.connect(settings.database_url)
    try:
        noted = await conn.fetch("SELECT adapter_session_id, seq, problem FROM telemetry_problems")
    finally:
        await conn.close()
    assert {f"{r['adapter_session_id']}:{r['seq']}" for r in noted} == bad_ids
    assert {r["problem"] for r in noted} == {"rejected"}
    got = await snapshot(settings.database_url)
    assert got == await reference_snapshot(make_database, gen, skip=bad_ids)
    assert got["sessions"][victim_open.adapter_session_id]["task"] == ""  # a stub: its opened was refused
    counts = exported_counts(settings.jsonl_dir)
    assert victim_step.adapter_session_id not in counts


async def test_postgres_outage(make_database, amqp_url: str, tmp_path: Path, cleanup) -> None:
    """Postgres cut off for 3 s mid-run (TCP proxy): nothing lost or duplicated, resumes by itself."""
    gen = generate(300, seed=14)
    settings = await fresh_settings(make_database, amqp_url, tmp_path / "jsonl", batch_max_messages=50)
    cleanup.append(settings.topology())
    db = urlsplit(settings.database_url)
    proxy = TcpProxy(db.hostname or "127.0.0.1", db.port or 5432)
    await proxy.start()
    proxied = settings.model_copy(update={"database_url": proxy.proxied_url(settings.database_url)})
    items = bodies(gen.in_order(), rng=random.Random(5), duplicate_share=0.3)
    half = len(items) // 2
    try:
        await publish(amqp_url, settings.topology(), items[:half])
        async with running(proxied) as ingestor:
            await wait_for(lambda: _has_rows(settings.database_url), within=30, what="first rows")
            proxy.cut()
            await publish(amqp_url, settings.topology(), items[half:])
            await asyncio.sleep(3)
            held = await db_counts(settings.database_url)
            proxy.restore()
            await wait_drained(settings, gen)
        assert held != gen_counts(gen)  # the outage really held work back
        assert ingestor.stats["batches"] > 0
    finally:
        await proxy.close()
    got = await snapshot(settings.database_url)
    assert got == await reference_snapshot(make_database, gen)
    counts = exported_counts(settings.jsonl_dir)
    assert set(counts) == gen.exported()
    assert set(counts.values()) == {1}
    assert await open_files(settings.database_url) == []


async def _has_rows(database_url: str) -> bool:
    return (await db_counts(database_url))[0] > 0


@pytest.fixture(scope="module")
async def ingested(make_database, amqp_url: str, tmp_path_factory: pytest.TempPathFactory):
    """One gzip-compressed run of 80 sessions shared by the line-shape and export tests."""
    gen = generate(80, seed=15)
    settings = await fresh_settings(
        make_database,
        amqp_url,
        tmp_path_factory.mktemp("ingested") / "jsonl",
        jsonl_compression="gzip",
        jsonl_max_bytes=16 * 1024,
    )
    await publish(amqp_url, settings.topology(), bodies(gen.in_order(), rng=random.Random(6)))
    async with running(settings):
        await wait_drained(settings, gen)
    yield settings, gen
    await delete_topology(amqp_url, settings.topology())


def _trainer_session(record: dict[str, Any]) -> dict[str, Any]:
    """Read a line the way the Atlas trainers do (per the export-format note): required keys, step core
    keys, every other step key folded into the step metadata."""
    core = {
        "step_id",
        "description",
        "trace",
        "output",
        "attempts",
        "tool",
        "tool_params",
        "context",
        "validation",
        "guidance",
        "reward",
        "metadata",
    }
    steps = []
    for step in record["steps"]:
        metadata = {**{k: v for k, v in step.items() if k not in core}, **step.get("metadata", {})}
        steps.append(
            {
                "step_id": int(step["step_id"]),
                "description": step["description"],
                "trace": step["trace"],
                "output": step["output"],
                "attempts": int(step.get("attempts", 1)),
                "metadata": metadata,
            }
        )
    return {
        "task": record["task"],
        "final_answer": record["final_answer"],
        "plan": record["plan"],
        "steps": steps,
        "session_metadata": record["session_metadata"],
    }


async def test_line_round_trips_to_trainer_shape(ingested) -> None:
    """A JSONL line reads into the Atlas trainer session shape with the adapter fields present."""
    settings, gen = ingested
    by_id = {s.adapter_session_id: s for s in gen.sessions}
    lines = [orjson.loads(line) for path in final_files(settings.jsonl_dir) for line in read_lines(path)]
    assert {r["adapter_session_id"] for r in lines} == gen.exported()
    for record in lines:
        source = by_id[record["adapter_session_id"]]
        assert source.closed is not None
        session = _trainer_session(record)
        assert session["task"] == source.opened.task
        assert session["final_answer"] == source.closed.final_answer
        assert session["plan"] == source.closed.plan
        # Every step row is a step of the line (plan, executes, synthesis), as in step_results.
        assert [s["step_id"] for s in session["steps"]] == [s.step_id for s in source.steps]
        for got, step in zip(session["steps"], source.steps, strict=True):
            assert got["trace"] == step.trace
            assert got["metadata"]["adapter_session_id"] == source.adapter_session_id
            assert got["metadata"]["adapter_usage"] == step.usage.model_dump()
            assert got["metadata"]["usage"] == step.usage.model_dump()
            assert got["metadata"]["adapter_events"] == step.events
            assert got["metadata"]["phase"] == step.phase
        meta = session["session_metadata"]
        assert meta["status"] == source.closed.status
        assert datetime.fromisoformat(meta["completed_at"]) == source.closed.closed_at
        assert datetime.fromisoformat(meta["created_at"]) == source.opened.opened_at
        assert isinstance(meta["session_id"], int)
        adapter = meta["adapter_session"]
        assert adapter["adapter_session_id"] == source.adapter_session_id
        assert adapter["usage"] == source.closed.totals.model_dump()
        assert adapter["events"] == source.closed.events
        assert "phases" not in adapter
        assert record["adapter_usage"] == source.closed.totals.model_dump()
        assert record["adapter_events"] == source.closed.events
        assert record["execution_mode"] == source.opened.execution_mode


async def test_export_matches_rolling_files(ingested, tmp_path: Path) -> None:
    """`python -m ingestor export` writes the rolling files' lines atomically; overwriting needs --force."""
    settings, _ = ingested
    rolled = sorted(line for path in final_files(settings.jsonl_dir) for line in read_lines(path))
    out = tmp_path / "export.jsonl.zst"
    env = {**os.environ, "DATABASE_URL": settings.database_url, "LOG_LEVEL": "WARNING"}
    command = [
        sys.executable,
        "-m",
        "ingestor",
        "export",
        "--since",
        "2000-01-01T00:00:00Z",
        "--out",
        str(out),
    ]
    first = await asyncio.to_thread(
        subprocess.run, command, env=env, capture_output=True, timeout=60, check=False
    )
    assert first.returncode == 0, first.stderr
    assert sorted(read_lines(out)) == rolled
    refused = await asyncio.to_thread(
        subprocess.run, command, env=env, capture_output=True, timeout=60, check=False
    )
    assert refused.returncode == 2
    forced = await asyncio.to_thread(
        subprocess.run,
        [*command, "--force", "--until", "2000-01-02"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert forced.returncode == 0, forced.stderr
    assert read_lines(out) == []
    assert sorted(await asyncio.to_thread(os.listdir, tmp_path)) == [out.name]


async def test_broker_connection_drop(make_database, amqp_url: str, tmp_path: Path, cleanup) -> None:
    """A dropped AMQP connection discards the held batch; redelivery after reconnect lands exactly once."""
    gen = generate(300, seed=16)
    broker = urlsplit(amqp_url)
    proxy = TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672)
    await proxy.start()
    settings = await fresh_settings(
        make_database, amqp_url, tmp_path / "jsonl", batch_max_messages=50, flush_interval_s=0.2
    )
    cleanup.append(settings.topology())
    proxied = settings.model_copy(
        update={"amqp_url": proxy.proxied_url(amqp_url) + "?reconnect_interval=0.5"}
    )
    items = bodies(gen.in_order(), rng=random.Random(7), duplicate_share=0.3)
    try:
        await publish(amqp_url, settings.topology(), items)
        async with running(proxied) as ingestor:
            await wait_for(lambda: _has_rows(settings.database_url), within=30, what="first rows")
            proxy.cut()
            await asyncio.sleep(1.0)
            proxy.restore()
            await wait_drained(settings, gen)
        assert ingestor.stats["batches"] > 0
    finally:
        await proxy.close()
    got = await snapshot(settings.database_url)
    assert got == await reference_snapshot(make_database, gen)
    counts = exported_counts(settings.jsonl_dir)
    assert set(counts) == gen.exported()
    assert set(counts.values()) == {1}
