"""The worker and the ingestor refuse to start on a database they cannot use, with one clear line saying
what to do."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from migrations import apply_migrations
from tests._pipeline import ROOT, PipelineStack

pytestmark = pytest.mark.integration

_SQL = ROOT / "migrations" / "sql"


def _run_worker(stack: PipelineStack, database_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker"],
        env=stack.env(DATABASE_URL=database_url, WORKER_ID="start-check"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def _run_ingestor(
    stack: PipelineStack, database_url: str, jsonl_dir: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ingestor", "run"],
        env=stack.env(DATABASE_URL=database_url, INGESTOR_JSONL_DIR=str(jsonl_dir)),  # LOG_FORMAT=json
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


async def _migrated_up_to_006(make_database, tmp_path: Path) -> str:
    """A new database with the migrations before 007 applied: 007_accountability is pending."""
    old = tmp_path / "sql"
    old.mkdir()
    for path in sorted(_SQL.glob("*.sql")):
        if path.name < "007":
            shutil.copy(path, old / path.name)
    url = await make_database()
    await apply_migrations(url, directory=old)
    return str(url)


async def test_a_schema_that_is_behind_is_refused(
    pipeline: PipelineStack, make_database, tmp_path: Path
) -> None:
    """On a database migrated only up to 006 the worker exits 2 with one line naming the pending migration
    and the command to run (it used to fail every task with UndefinedTableError)."""
    url = await _migrated_up_to_006(make_database, tmp_path)
    result = _run_worker(pipeline, url)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "007_accountability.sql" in errors[0]
    assert "python -m migrations" in errors[0]


async def test_the_ingestor_refuses_a_schema_that_is_behind(
    pipeline: PipelineStack, make_database, tmp_path: Path
) -> None:
    """The ingestor's twin of the test above: on a database migrated only up to 006 it exits 2, without a
    traceback, with one error line naming the pending migration and the command to run."""
    url = await _migrated_up_to_006(make_database, tmp_path)
    result = _run_ingestor(pipeline, url, tmp_path / "jsonl")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = [json.loads(line) for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line["level"] == "error"]
    assert len(errors) == 1, lines
    assert errors[0]["event"] == "ingestor.config_error"
    assert "007_accountability.sql" in errors[0]["error"]
    assert "run atlas-migrate" in errors[0]["error"]


async def test_missing_ledger_privileges_are_refused(pipeline: PipelineStack) -> None:
    """A role that may read the schema but not write task_ledger is refused at start, naming the privileges
    and the GRANT to run."""
    role = f"atlas_ro_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(pipeline.database_url)
    try:
        await conn.execute(f'CREATE ROLE "{role}" LOGIN')
        await conn.execute(f'GRANT SELECT ON schema_migrations, task_ledger TO "{role}"')
        base, _, database = pipeline.database_url.rpartition("/")
        scheme, _, rest = base.partition("://")
        host = rest.rpartition("@")[2]
        result = _run_worker(pipeline, f"{scheme}://{role}@{host}/{database}")
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result.stderr
        assert "lacks INSERT, UPDATE on task_ledger" in errors[0]
        assert "GRANT INSERT, UPDATE ON task_ledger" in errors[0]
    finally:
        await conn.execute(f'REVOKE ALL ON schema_migrations, task_ledger FROM "{role}"')
        await conn.execute(f'DROP ROLE "{role}"')
        await conn.close()
