"""``ingestor export`` pages: closed sessions in completion order, lines for the complete ones only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import orjson
import pytest

from ingestor import IngestorSettings, _export, export_sessions, read_lines

pytestmark = pytest.mark.integration

T0 = datetime(2026, 6, 1, tzinfo=UTC)

# (name, status, steps announced, steps stored); completed one minute apart in this order.
SESSIONS = [
    ("c1", "succeeded", 2, 2),
    ("c2", "failed", 1, 1),
    ("i1", "succeeded", 3, 1),
    ("i2", "succeeded", 2, 0),
    ("c3", "succeeded", 2, 2),
    ("running", "running", None, 1),
    ("i3", "failed", 2, 1),
]


async def _build(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for n, (name, status, announced, stored) in enumerate(SESSIONS):
            at = T0 + timedelta(minutes=n)
            session_id = await conn.fetchval(
                "INSERT INTO sessions (task, status, metadata, adapter_session_id, task_id, attempt,"
                " steps_expected, created_at, completed_at)"
                " VALUES ('t', $1, '{}', $2, $3, 1, $4, $5, $6) RETURNING id",
                status,
                f"as-{name}",
                f"task-{name}",
                announced,
                at - timedelta(seconds=5),
                None if status == "running" else at,
            )
            await conn.executemany(
                "INSERT INTO step_results (session_id, step_id, output, metadata, adapter_session_id)"
                " VALUES ($1, $2, 'out', '{}', $3)",
                [(session_id, k, f"as-{name}") for k in range(stored)],
            )
    finally:
        await conn.close()


async def test_export_skips_incomplete_sessions_across_pages(
    migrated_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With two sessions a page, a page of incomplete sessions only is passed over, not taken for the end:
    every complete session is exported once, in completion order, and nothing else."""
    await _build(migrated_database)
    monkeypatch.setattr(_export, "_PAGE", 2)
    out = tmp_path / "out.jsonl"
    settings = IngestorSettings(database_url=migrated_database, log_level="WARNING")

    count = await export_sessions(settings, since=T0, until=None, out=out, progress=False)

    names = [orjson.loads(line)["adapter_session_id"] for line in read_lines(out)]
    assert names == ["as-c1", "as-c2", "as-c3"]
    assert count == 3
