"""The whole path on real services: producer -> worker processes -> ingestor -> Postgres + JSONL."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from typing import Any

import asyncpg
import orjson
import pytest

from ingestor import read_lines
from schemas import TaskMessage
from tests._pipeline import PipelineStack

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]


async def _wait_for(conn: asyncpg.Connection, query: str, want: int, timeout_s: float) -> int:
    got = -1
    for _ in range(int(timeout_s / 0.25)):
        got = int(await conn.fetchval(query))
        if got >= want:
            return got
        await asyncio.sleep(0.25)
    return got


def _finalised_lines(stack: PipelineStack) -> list[dict[str, Any]]:
    files = [p for p in stack.jsonl_dir.iterdir() if not p.name.startswith(".")]
    return [orjson.loads(line) for path in sorted(files) for line in read_lines(path)]


async def _check_tables_and_jsonl(stack: PipelineStack, conn: asyncpg.Connection, ids: list[str]) -> None:
    """Exactly one succeeded session per task, every step stored once, every succeeded session in exactly
    one finalised JSONL line with the Atlas shape and its adapter fields."""
    rows = await conn.fetch(
        "SELECT s.id, s.task_id, s.status, s.adapter_session_id, s.steps_expected, s.export_file,"
        " (SELECT count(*) FROM step_results r WHERE r.session_id = s.id) AS stored_steps"
        " FROM sessions s WHERE s.task_id IS NOT NULL"
    )
    succeeded = [r for r in rows if r["status"] == "succeeded"]
    assert Counter(r["task_id"] for r in succeeded) == Counter(ids)
    assert {r["status"] for r in rows} <= {"succeeded", "abandoned"}
    for row in succeeded:
        assert row["stored_steps"] == row["steps_expected"], row
        assert row["export_file"] is not None
    lines = _finalised_lines(stack)
    by_session = Counter(str(line["adapter_session_id"]) for line in lines)
    assert set(by_session) == {r["adapter_session_id"] for r in succeeded}
    assert set(by_session.values()) == {1}
    sample = lines[0]
    for key in (
        "task",
        "final_answer",
        "plan",
        "steps",
        "session_metadata",
        "adapter_usage",
        "adapter_events",
    ):
        assert key in sample
    assert sample["session_metadata"]["adapter_session"]["usage"]["calls"] >= 3
    # A line's steps are its session's step_results rows, plan and synthesis included.
    stored_steps = await conn.fetchval(
        "SELECT count(*) FROM step_results r JOIN sessions s ON s.id = r.session_id"
        " WHERE s.status = 'succeeded'"
    )
    assert sum(len(line["steps"]) for line in lines) == stored_steps
    open_files = await conn.fetchval("SELECT count(*) FROM jsonl_files WHERE state <> 'final'")
    assert open_files == 0
    assert (await stack.audit()).exported == len(ids)


async def test_two_thousand_tasks_land_exactly_once(pipeline: PipelineStack) -> None:
    """2,000 tasks, 2 workers, 1 ingestor: the tables and the JSONL files hold exactly the sessions and
    steps that ran, no more, no fewer."""
    ids = await pipeline.submit(
        TaskMessage(task_id=f"e2e-{i}", task=f"compare approach {i} with the baseline") for i in range(2000)
    )
    pipeline.start_ingestor()
    pipeline.start_worker("w1", "--concurrency", "32")
    pipeline.start_worker("w2", "--concurrency", "32")
    conn = await asyncpg.connect(pipeline.database_url)
    try:
        done = await _wait_for(
            conn,
            "SELECT count(*) FROM sessions WHERE status = 'succeeded' AND export_file IS NOT NULL",
            2000,
            240,
        )
        assert done == 2000
        pipeline.stop_all(signal.SIGTERM)
        assert [p.returncode for p in pipeline.procs] == [0, 0, 0]
        await _check_tables_and_jsonl(pipeline, conn, ids)
    finally:
        await conn.close()


_VICTIM_MID_SESSION = """
SELECT count(*) FROM sessions AS s JOIN task_ledger AS l ON l.task_id = s.task_id
WHERE s.status = 'running' AND l.state = 'running' AND l.worker_id = 'victim' AND s.attempt = l.attempts
  AND (SELECT count(*) FROM step_results AS r WHERE r.session_id = s.id) <= 1
"""


async def test_killed_worker_and_ingestor_still_land_exactly_once(pipeline: PipelineStack) -> None:
    """SIGKILL a worker and the ingestor mid-run, restart the ingestor: every task still ends with one
    succeeded session; the cut-off sessions are 'abandoned' in Postgres and absent from the JSONL."""
    ids = await pipeline.submit(
        TaskMessage(task_id=f"kill-{i}", task=f"study case {i} in depth") for i in range(150)
    )
    slow = ("--adapter", "slow=tests._adapters:Slow", "--concurrency", "20")
    ingestor = pipeline.start_ingestor()
    victim = pipeline.start_worker("victim", *slow)
    pipeline.start_worker("survivor", *slow)
    conn = await asyncpg.connect(pipeline.database_url)
    try:
        await _wait_for(conn, "SELECT count(*) FROM sessions WHERE status = 'succeeded'", 20, 120)
        # Kill only once the victim is mid-session: a session of its current claim stored as running with
        # at most its plan step (>= 0.6 s of work left). Killed at an arbitrary moment, the victim may hold
        # no opened session at all (it started late, or sat between claim and opened), and then nothing
        # can be abandoned (CI saw that once).
        cut = await _wait_for(conn, _VICTIM_MID_SESSION, 1, 60)
        assert cut >= 1, "the victim never had a session in flight"
        victim.send_signal(signal.SIGKILL)
        ingestor.send_signal(signal.SIGKILL)
        victim.wait()
        ingestor.wait()
        pipeline.start_ingestor("ingestor-2")
        done = await _wait_for(
            conn,
            "SELECT count(*) FROM sessions WHERE status = 'succeeded' AND export_file IS NOT NULL",
            150,
            240,
        )
        assert done == 150
        abandoned = await _wait_for(conn, "SELECT count(*) FROM sessions WHERE status = 'abandoned'", 1, 30)
        assert abandoned >= 1, "the kill cut sessions short; they must show as abandoned"
        still_running = await conn.fetchval("SELECT count(*) FROM sessions WHERE status = 'running'")
        assert still_running == 0
        pipeline.stop_all(signal.SIGTERM)
        await _check_tables_and_jsonl(pipeline, conn, ids)
    finally:
        await conn.close()
