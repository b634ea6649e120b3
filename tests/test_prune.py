"""``python -m ingestor prune``: retention of ``sessions`` / ``step_results`` / ``plans``, on PostgreSQL.

Every kind of session the pipeline leaves is built with SQL in a migrated database: exported ones (in a
final file, in a file still open), abandoned ones, running ones, closed ones missing steps, recent ones, one
whose ledger row is newer than ``--before``, and a row an Atlas deployment wrote itself (no ``task_id``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from ingestor import IngestorSettings
from ingestor._batch import merge_batch
from ingestor._errors import ConfigError
from ingestor._prune import prune_sessions
from ingestor._store import _init_connection
from ingestor._write import FileTarget, write_batch
from producer._audit import count_unaccounted, run_audit
from schemas import SessionClosed
from tests._pipeline import ROOT

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)
BEFORE = NOW - timedelta(days=30)
OLD = NOW - timedelta(days=60)
RECENT = NOW - timedelta(days=3)


@dataclass(frozen=True)
class Row:
    """One session to build: what it looks like, and whether a prune before ``BEFORE`` may delete it."""

    name: str
    status: str
    completed_at: datetime | None
    export_file: str | None
    eligible: bool
    steps: int = 3
    task_id: str | None = "task"
    ledger_at: datetime | None = None
    """A ``succeeded`` ledger row naming this session, updated then (None: no ledger row names it)."""


ROWS = [
    Row("succeeded-old", "succeeded", OLD, "final.jsonl", eligible=True, ledger_at=OLD),
    Row("failed-old", "failed", OLD + timedelta(hours=1), "final.jsonl", eligible=True),
    Row("abandoned-old", "abandoned", OLD + timedelta(hours=2), None, eligible=True, steps=1),
    Row(
        "succeeded-old-2", "succeeded", OLD + timedelta(hours=3), "final.jsonl", eligible=True, ledger_at=OLD
    ),
    Row("succeeded-recent", "succeeded", RECENT, "final.jsonl", eligible=False, ledger_at=RECENT),
    Row("running-old", "running", None, None, eligible=False, steps=2),
    Row("missing-steps-old", "succeeded", OLD, None, eligible=False, ledger_at=OLD),
    Row("open-file-old", "succeeded", OLD, "open.jsonl", eligible=False),
    Row(
        "ledger-newer", "succeeded", OLD, "final.jsonl", eligible=False, ledger_at=BEFORE + timedelta(hours=1)
    ),
    Row("legacy-old", "failed", OLD, None, eligible=False, task_id=None),
    Row("legacy-abandoned-old", "abandoned", OLD, None, eligible=False, task_id=None),
]
ELIGIBLE = {r.name for r in ROWS if r.eligible}
ELIGIBLE_STEPS = sum(r.steps for r in ROWS if r.eligible)


async def _build(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO jsonl_files (name, ingestor_id, owner_token, state)"
            " VALUES ('final.jsonl', 'i', 'o', 'final'), ('open.jsonl', 'i', 'o', 'open')"
        )
        for row in ROWS:
            task_id = None if row.task_id is None else f"task-{row.name}"
            session_id = await conn.fetchval(
                "INSERT INTO sessions (task, status, metadata, adapter_session_id, task_id, attempt,"
                " steps_expected, export_file, created_at, completed_at)"
                " VALUES ('t', $1, '{}', $2, $3, 1, $4, $5, $6, $7) RETURNING id",
                row.status,
                f"as-{row.name}",
                task_id,
                None if row.status in ("running", "abandoned") else row.steps,
                row.export_file,
                (row.completed_at or NOW) - timedelta(seconds=10),
                row.completed_at,
            )
            await conn.executemany(
                "INSERT INTO step_results (session_id, step_id, output, metadata, adapter_session_id)"
                " VALUES ($1, $2, 'out', '{\"phase\": \"execute\"}', $3)",
                [(session_id, k, f"as-{row.name}") for k in range(row.steps)],
            )
            await conn.execute(
                "INSERT INTO plans (session_id, plan) VALUES ($1, '{\"steps\": []}')", session_id
            )
            if row.ledger_at is not None:
                await conn.execute(
                    "INSERT INTO task_ledger (task_id, state, adapter_session_id, close_message, created_at,"
                    " updated_at) VALUES ($1, 'succeeded', $2, 'close', $3, $3)",
                    task_id,
                    f"as-{row.name}",
                    row.ledger_at,
                )
    finally:
        await conn.close()


async def _left(url: str) -> tuple[set[str], dict[str, int], set[str], int, list[object]]:
    """Sessions left (by name), their step counts, sessions with a plan, ledger rows, retention rows."""
    conn = await asyncpg.connect(url)
    try:
        names = {r[0][3:] for r in await conn.fetch("SELECT adapter_session_id FROM sessions")}
        steps = {
            r[0][3:]: r[1]
            for r in await conn.fetch("SELECT adapter_session_id, count(*) FROM step_results GROUP BY 1")
        }
        planned = {
            r[0][3:]
            for r in await conn.fetch(
                "SELECT s.adapter_session_id FROM plans AS p JOIN sessions AS s ON s.id = p.session_id"
            )
        }
        orphans = await conn.fetchval(
            "SELECT count(*) FROM step_results AS r WHERE NOT EXISTS"
            " (SELECT 1 FROM sessions AS s WHERE s.id = r.session_id)"
        )
        assert orphans == 0
        ledger = await conn.fetchval("SELECT count(*) FROM task_ledger")
        retention = [r[0] for r in await conn.fetch("SELECT pruned_before FROM retention")]
    finally:
        await conn.close()
    return names, steps, planned, ledger, retention


def _settings(url: str) -> IngestorSettings:
    return IngestorSettings(database_url=url, log_level="WARNING")


async def test_prune_deletes_exactly_the_eligible_sessions_with_their_steps(migrated_database: str) -> None:
    """Exported and abandoned sessions completed before --before go with their steps and plans, in batches;
    every other session, step, plan and ledger row stays, and the horizon is recorded."""
    await _build(migrated_database)
    _, _, _, ledger_before, _ = await _left(migrated_database)

    pruned = await prune_sessions(_settings(migrated_database), before=BEFORE, batch=2, progress=False)

    assert (pruned.sessions, pruned.steps, pruned.batches) == (len(ELIGIBLE), ELIGIBLE_STEPS, 2)
    names, steps, planned, ledger, retention = await _left(migrated_database)
    kept = {r.name for r in ROWS} - ELIGIBLE
    assert names == kept
    assert steps == {r.name: r.steps for r in ROWS if not r.eligible}
    assert planned == kept
    assert ledger == ledger_before
    assert retention == [BEFORE]


async def test_dry_run_counts_and_deletes_nothing(migrated_database: str) -> None:
    """--dry-run reports what a prune would delete and changes nothing, not even the horizon."""
    await _build(migrated_database)
    before = await _left(migrated_database)

    pruned = await prune_sessions(
        _settings(migrated_database), before=BEFORE, batch=3, dry_run=True, progress=False
    )

    assert (pruned.sessions, pruned.steps) == (len(ELIGIBLE), ELIGIBLE_STEPS)
    assert await _left(migrated_database) == before
    assert before[4] == []


async def test_a_second_prune_finds_nothing_and_keeps_the_newest_horizon(migrated_database: str) -> None:
    """Pruning again deletes nothing more; an older --before does not move the recorded horizon back."""
    await _build(migrated_database)
    settings = _settings(migrated_database)
    await prune_sessions(settings, before=BEFORE, progress=False)

    again = await prune_sessions(settings, before=BEFORE - timedelta(days=1), progress=False)

    assert again.sessions == 0
    assert (await _left(migrated_database))[4] == [BEFORE]


async def test_before_must_be_older_than_the_accounting_lookback(migrated_database: str) -> None:
    """A --before inside INGESTOR_ACCOUNTING_LOOKBACK_S is refused before anything is read or deleted."""
    await _build(migrated_database)
    before = await _left(migrated_database)

    with pytest.raises(ConfigError, match="too recent"):
        await prune_sessions(_settings(migrated_database), before=NOW - timedelta(hours=2), progress=False)

    assert await _left(migrated_database) == before


async def test_the_audit_counts_pruned_tasks_as_pruned_not_lost(migrated_database: str) -> None:
    """After a prune, producer audit and status count the succeeded tasks whose sessions went as pruned;
    a task whose session was never stored is still unexplained."""
    await _build(migrated_database)
    conn = await asyncpg.connect(migrated_database)
    try:
        await conn.execute(
            "INSERT INTO task_ledger (task_id, state, adapter_session_id, updated_at)"
            " VALUES ('task-lost', 'succeeded', 'as-lost', $1)",
            RECENT,
        )
        unaccounted_before = await count_unaccounted(conn, 600)
    finally:
        await conn.close()

    await prune_sessions(_settings(migrated_database), before=BEFORE, progress=False)

    report = await run_audit(migrated_database, grace_s=600)
    by_task = {f.task_id: f for f in report.findings}
    assert report.pruned == 2  # succeeded-old and succeeded-old-2
    assert set(by_task) == {"task-lost", "task-missing-steps-old"}
    assert by_task["task-lost"].verdict == "unexplained"
    conn = await asyncpg.connect(migrated_database)
    try:
        assert await count_unaccounted(conn, 600) == unaccounted_before == 2
    finally:
        await conn.close()


async def test_a_republished_close_of_a_pruned_session_is_not_exported_again(migrated_database: str) -> None:
    """The ledger keeps the close a redelivered task re-publishes (the worker never reads sessions); when
    that close reaches the ingestor after a prune it leaves a close-only stub, which is never exported."""
    await _build(migrated_database)
    await prune_sessions(_settings(migrated_database), before=BEFORE, progress=False)
    conn = await asyncpg.connect(migrated_database)
    try:
        stored = await conn.fetchval(
            "SELECT close_message FROM task_ledger WHERE adapter_session_id = 'as-succeeded-old'"
        )
        assert stored == b"close"
        await _init_connection(conn)
        close = SessionClosed(
            adapter_session_id="as-succeeded-old",
            task_id="task-succeeded-old",
            seq=4,
            status="succeeded",
            final_answer="a",
            steps=3,
            closed_at=OLD,
            emitted_at=NOW,
        )
        async with conn.transaction():
            written = await write_batch(conn, merge_batch([close]), FileTarget("new.jsonl", "o"), "i")
        row = await conn.fetchrow(
            "SELECT attempt, export_file FROM sessions WHERE adapter_session_id = 'as-succeeded-old'"
        )
    finally:
        await conn.close()
    assert written.assigned == []
    assert (row["attempt"], row["export_file"]) == (None, None)


async def test_the_command_line(migrated_database: str) -> None:
    """`python -m ingestor prune --dry-run` prints what it would delete; a too recent --before exits 2."""
    await _build(migrated_database)
    env = {**os.environ, "DATABASE_URL": migrated_database, "LOG_LEVEL": "WARNING"}

    async def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "ingestor", "prune", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env=env,
            check=False,
        )

    dry = await cli("--before", BEFORE.isoformat(), "--dry-run", "--no-progress")
    assert dry.returncode == 0, dry.stderr
    assert f"would delete {len(ELIGIBLE)} sessions and {ELIGIBLE_STEPS} step rows" in dry.stdout
    refused = await cli("--before", NOW.isoformat())
    assert refused.returncode == 2
    assert "too recent" in refused.stderr + refused.stdout
    assert (await _left(migrated_database))[0] == {r.name for r in ROWS}
