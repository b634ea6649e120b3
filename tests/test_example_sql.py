"""The stateful SQLite example: one database per session, living across that session's steps."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from examples.stateful_adapter_sql.adapter import SQLiteAgent
from worker import PythonAdapter, SessionContext

SPEC = "examples.stateful_adapter_sql.adapter:SQLiteAgent"
CTX = SessionContext(task_id="demo", execution_mode="stepwise")
ROOT = Path(__file__).resolve().parents[1]


async def test_select_returns_seed_titles_with_usage_and_sql_event() -> None:
    """The seeded SELECT returns 'Atlas SDK' first, with token usage and one sql event."""
    adapter = PythonAdapter(SPEC)
    assert adapter.supports_sessions is True
    assert adapter.name == "sqlite-agent"
    async with adapter.session(CTX) as session:
        outcome = await session.step("SELECT title FROM documents ORDER BY id")
    assert isinstance(outcome.output, str)
    assert outcome.output.splitlines() == ["Atlas SDK", "Continual Learning", "Stateful Sessions"]
    assert outcome.usage.prompt_tokens == 7
    assert outcome.usage.total_tokens == outcome.usage.prompt_tokens + outcome.usage.completion_tokens
    assert outcome.usage.calls == 1
    assert outcome.events == [{"type": "sql", "query": "SELECT title FROM documents ORDER BY id", "rows": 3}]


async def test_connection_lives_across_steps_but_not_sessions() -> None:
    """An INSERT in step 1 is visible to a SELECT in step 2 of the same session, not in another session."""
    adapter = PythonAdapter(SPEC)
    async with adapter.session(CTX) as first:
        await first.step("INSERT INTO documents (title) VALUES ('Fresh Row')")
        seen = await first.step("SELECT title FROM documents WHERE title = 'Fresh Row'")
        assert seen.output == "Fresh Row"
        async with adapter.session(CTX) as second:
            unseen = await second.step("SELECT COUNT(*) FROM documents WHERE title = 'Fresh Row'")
            assert unseen.output == "0"
    meta = await first.close()
    assert (meta["queries"], meta["clean"]) == (2, True)


async def test_open_metadata_and_close_releases_connection() -> None:
    """on_open's metadata joins the session's; on_close closes the connection."""
    instances: list[SQLiteAgent] = []

    class Tracked(SQLiteAgent):
        def __init__(self) -> None:
            super().__init__()
            instances.append(self)

    async with PythonAdapter(Tracked).session(CTX) as session:
        assert session.metadata["seed_rows"] == 3
        assert instances[0].connection is not None
    assert instances[0].connection is None


async def test_multi_column_rows_and_bad_sql() -> None:
    """Multi-column results come back as rows; invalid SQL raises sqlite3's error from step."""
    async with PythonAdapter(SPEC).session(CTX) as session:
        rows = await session.step("SELECT id, title FROM documents ORDER BY id LIMIT 2")
        assert rows.output == [[1, "Atlas SDK"], [2, "Continual Learning"]]
        with pytest.raises(sqlite3.OperationalError, match="syntax error"):
            await session.step("SELEKT nothing")


def test_module_entry_point_runs_one_session() -> None:
    """``python -m examples.stateful_adapter_sql`` prints the steps, usage and close metadata."""
    proc = subprocess.run(
        [sys.executable, "-m", "examples.stateful_adapter_sql"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "'Atlas SDK\\nContinual Learning\\nStateful Sessions'" in proc.stdout
    assert "total usage:" in proc.stdout
    assert "'queries': 4" in proc.stdout
