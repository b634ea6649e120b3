"""``python -m producer audit`` and the accountability figure of ``status``, on a real PostgreSQL with rows
written the way the pipeline writes them."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from atlas_common import Topology
from tests._ingest_env import fresh_settings, running, wait_for
from tests._pipeline import ROOT

pytestmark = pytest.mark.integration

_OLD = datetime.now(UTC) - timedelta(hours=1)
MakeDatabase = Callable[[], Awaitable[str]]


async def _succeeded(conn: asyncpg.Connection, task_id: str, asid: str, at: datetime = _OLD) -> None:
    await conn.execute(
        "INSERT INTO task_ledger (task_id, state, adapter_session_id, updated_at)"
        " VALUES ($1, 'succeeded', $2, $3)",
        task_id,
        asid,
        at,
    )


async def _session(conn: asyncpg.Connection, task_id: str, asid: str, export_file: str | None) -> None:
    await conn.execute(
        "INSERT INTO sessions (task, status, metadata, adapter_session_id, task_id, attempt, steps_expected,"
        " export_file) VALUES ('t', 'succeeded', '{}', $1, $2, 1, 0, $3)",
        asid,
        task_id,
        export_file,
    )


_FILE = "INSERT INTO jsonl_files (name, ingestor_id, owner_token, state) VALUES ('f1', 'i', 'o', 'final')"


async def _cli(*argv: str) -> tuple[int, str]:
    """The command as a user runs it: its exit status and what it printed."""
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "producer", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    return done.returncode, done.stdout


async def _audit(database_url: str, *extra: str) -> tuple[int, Any]:
    prefix = f"audit{uuid.uuid4().hex[:8]}"
    code, out = await _cli("--prefix", prefix, "audit", "--database-url", database_url, "--json", *extra)
    return code, orjson.loads(out)


async def test_every_kind_of_finding(migrated_database: str, tmp_path: Path) -> None:
    """Exported tasks pass; a succeeded task with no session is unexplained (exit 1); one whose records the
    ingestor refused is explained with the reason; a recent one is in flight; a session in two JSONL lines
    is a finding too."""
    conn = await asyncpg.connect(migrated_database)
    try:
        await conn.execute(
            "INSERT INTO jsonl_files (name, ingestor_id, owner_token, state) VALUES ('f1', 'i', 'o', 'final')"
        )
        for i in range(3):
            await _succeeded(conn, f"ok-{i}", f"s-ok-{i}")
            await _session(conn, f"ok-{i}", f"s-ok-{i}", "f1")
        await _succeeded(conn, "lost", "s-lost")
        await _succeeded(conn, "refused", "s-refused")
        await conn.execute(
            "INSERT INTO telemetry_problems (adapter_session_id, task_id, seq, kind, problem, reason)"
            " VALUES ('s-refused', 'refused', 2, 'step', 'rejected', 'trace holds a NUL character')"
        )
        await _succeeded(conn, "fresh", "s-fresh", datetime.now(UTC))
    finally:
        await conn.close()
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    lines = [{"adapter_session_id": f"s-ok-{i}"} for i in (0, 1, 2, 2)]
    (jsonl / "f1").write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))

    code, report = await _audit(migrated_database, "--jsonl-dir", str(jsonl), "--grace-s", "60")
    assert code == 1
    assert (report["checked"], report["exported"], report["in_flight"]) == (6, 2, 1)
    by_task = {f["task_id"]: f for f in report["findings"]}
    assert by_task["lost"]["verdict"] == "unexplained"
    assert by_task["lost"]["state"] == "no session stored"
    assert by_task["refused"]["verdict"] == "explained"
    assert "trace holds a NUL character" in by_task["refused"]["reasons"][0]
    assert by_task["fresh"]["verdict"] == "in_flight"
    assert by_task["ok-2"]["state"] == "in 2 finalised JSONL lines, not exactly one"
    assert report["unexplained"] == 2


async def test_a_clean_ledger_passes_and_status_counts_zero(migrated_database: str) -> None:
    """Everything stored and exported: the audit exits 0, and status shows no unaccounted task; one lost
    task makes status show 1."""
    conn = await asyncpg.connect(migrated_database)
    try:
        await conn.execute(
            "INSERT INTO jsonl_files (name, ingestor_id, owner_token, state) VALUES ('f1', 'i', 'o', 'final')"
        )
        await _succeeded(conn, "ok", "s-ok")
        await _session(conn, "ok", "s-ok", "f1")
    finally:
        await conn.close()
    code, report = await _audit(migrated_database, "--grace-s", "0")
    assert (code, report["unexplained"], report["exported"]) == (0, 0, 1)
    prefix = f"status{uuid.uuid4().hex[:8]}"
    code, out = await _cli("--prefix", prefix, "status", "--database-url", migrated_database, "--json")
    assert code == 0
    assert orjson.loads(out)["database"]["succeeded_not_stored"] == 0
    conn = await asyncpg.connect(migrated_database)
    try:
        await _succeeded(conn, "lost", "s-lost")
    finally:
        await conn.close()
    code, out = await _cli("--prefix", prefix, "status", "--database-url", migrated_database)
    assert code == 0
    assert (
        "succeeded but not stored and exported after 10 min: 1 (python -m producer audit lists them)" in out
    )


async def test_the_ingestor_gauge_counts_lost_tasks(
    make_database: MakeDatabase, amqp_url: str, tmp_path: Path, cleanup: list[Topology]
) -> None:
    """The ingestor's atlas_tasks_unaccounted is 1 for a task that succeeded an hour ago with no stored
    session (not for one exported, one younger than the grace, one older than the lookback), and 0 once it is
    stored and exported."""
    settings = await fresh_settings(
        make_database, amqp_url, tmp_path / "jsonl", sweep_interval_s=0.2, accounting_grace_s=60
    )
    cleanup.append(settings.topology())
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(_FILE)
        await _succeeded(conn, "ok", "s-ok")
        await _session(conn, "ok", "s-ok", "f1")
        await _succeeded(conn, "fresh", "s-fresh", datetime.now(UTC))
        await _succeeded(conn, "ancient", "s-ancient", datetime.now(UTC) - timedelta(days=2))
        await _succeeded(conn, "lost", "s-lost")
        async with running(settings) as ingestor:

            def gauge() -> float | None:
                return ingestor.metrics.registry.get_sample_value("atlas_tasks_unaccounted")

            async def reports(value: float) -> bool:
                return gauge() == value

            await wait_for(lambda: reports(1), within=30, what="the lost task counted")
            await asyncio.sleep(1.2)  # more sweeps (one per idle wait of 0.5 s): still that one task alone
            assert gauge() == 1
            await _session(conn, "lost", "s-lost", "f1")  # stored and exported after all
            await wait_for(lambda: reports(0), within=30, what="the gauge back to 0")
    finally:
        await conn.close()
