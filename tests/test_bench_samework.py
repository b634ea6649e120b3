"""The same-work baselines' task body does the work the atlas end-to-end rows are compared on."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import orjson
import pytest

from bench._samework import DATABASE_URL_ENV, FILE_PREFIX, JSONL_DIR_ENV, close_thread_state, run_and_store
from ingestor import fetch_line_map
from producer import demo_tasks

pytestmark = pytest.mark.integration


async def test_the_body_stores_each_session_and_writes_the_line_atlas_would(
    migrated_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each task leaves its session, every step and its plan in PostgreSQL, and a JSONL line equal to the
    one atlas builds from those rows (what recovery and export write): the baseline does atlas's work."""
    monkeypatch.setenv(DATABASE_URL_ENV, migrated_database)
    monkeypatch.setenv(JSONL_DIR_ENV, str(tmp_path))
    tasks = list(demo_tasks(3, run_id="samework"))

    def run_all() -> None:  # one thread, as one Celery process: its loop, connection and file are reused
        try:
            for task in tasks:
                run_and_store(task.model_dump(mode="json"))
        finally:
            close_thread_state()
            close_thread_state()  # safe twice

    with ThreadPoolExecutor(1) as pool:
        await asyncio.get_running_loop().run_in_executor(pool, run_all)

    conn = await asyncpg.connect(migrated_database)
    await conn.set_type_codec(  # as the ingestor's connections read jsonb
        "jsonb", encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads, schema="pg_catalog"
    )
    try:
        rows = await conn.fetch(
            "SELECT s.id, s.task_id, s.status, s.steps_expected, s.stored_at,"
            " (SELECT count(*) FROM step_results r WHERE r.session_id = s.id) AS steps,"
            " (SELECT count(*) FROM plans p WHERE p.session_id = s.id) AS plans"
            " FROM sessions s ORDER BY s.id"
        )
        stored_lines = await fetch_line_map(conn, [r["id"] for r in rows])
    finally:
        await conn.close()
    assert [r["task_id"] for r in rows] == [t.task_id for t in tasks]
    for row in rows:
        assert row["status"] == "succeeded"
        assert row["stored_at"] is not None
        assert row["steps"] == row["steps_expected"] >= 4  # plan, 2-4 executes, synthesis
        assert row["plans"] == 1
    files = await asyncio.to_thread(lambda: [p.read_bytes() for p in tmp_path.glob(f"{FILE_PREFIX}*.jsonl")])
    assert len(files) == 1
    lines = files[0].splitlines(keepends=True)
    assert lines == [stored_lines[r["id"]] for r in rows]
    assert [orjson.loads(line)["task"] for line in lines] == [t.task for t in tasks]
