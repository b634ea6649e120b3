"""The worker refuses to start on a database it cannot use, with one clear line saying what to do."""

from __future__ import annotations

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


async def test_a_schema_that_is_behind_is_refused(
    pipeline: PipelineStack, make_database, tmp_path: Path
) -> None:
    """On a database migrated only up to 006 the worker exits 2 with one line naming the pending migration
    and the command to run (it used to fail every task with UndefinedTableError)."""
    old = tmp_path / "sql"
    old.mkdir()
    for path in sorted(_SQL.glob("*.sql")):
        if path.name < "007":
            shutil.copy(path, old / path.name)
    url = await make_database()
    await apply_migrations(url, directory=old)
    result = _run_worker(pipeline, url)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "007_accountability.sql" in errors[0]
    assert "python -m migrations" in errors[0]


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
