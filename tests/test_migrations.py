"""The migration runner against a real PostgreSQL, and the atlas-migrate command as a subprocess."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from migrations import (
    ADVISORY_LOCK_KEY,
    AppliedMigration,
    ChecksumMismatch,
    MigrationError,
    MigrationFailed,
    MigrationLockTimeout,
    apply_migrations,
    discover,
    migration_status,
)
from migrations._discover import SQL_DIR

MakeDatabase = Callable[[], Awaitable[str]]
REPO = Path(__file__).resolve().parents[1]
PACKAGED = discover()
ADAPTER_COLUMNS = {"adapter_session_id": "text", "adapter_usage": "jsonb", "adapter_events": "jsonb"}

# A current Atlas deployment before the adapter-session migration: extra columns and tables included.
LEGACY_ATLAS = """
CREATE TABLE sessions (
    id SERIAL PRIMARY KEY,
    task TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'running',
    metadata JSONB,
    final_answer TEXT,
    reward JSONB,
    reward_stats JSONB,
    reward_audit JSONB,
    student_learning TEXT,
    teacher_learning TEXT,
    review_status TEXT NOT NULL DEFAULT 'pending',
    review_notes TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    completed_at TIMESTAMPTZ
);
CREATE TABLE plans (
    session_id INTEGER PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
    plan JSONB NOT NULL
);
CREATE TABLE step_results (
    session_id INTEGER REFERENCES sessions(id) ON DELETE CASCADE,
    step_id INTEGER NOT NULL,
    trace TEXT, output TEXT, evaluation JSONB, attempts INTEGER, metadata JSONB,
    PRIMARY KEY (session_id, step_id)
);
CREATE TABLE step_attempts (
    session_id INTEGER REFERENCES sessions(id) ON DELETE CASCADE,
    step_id INTEGER NOT NULL, attempt INTEGER NOT NULL, evaluation JSONB,
    PRIMARY KEY (session_id, step_id, attempt)
);
CREATE TABLE trajectory_events (
    id SERIAL PRIMARY KEY,
    session_id INTEGER REFERENCES sessions(id) ON DELETE CASCADE,
    event JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
INSERT INTO sessions (task, status, metadata, final_answer, reward, reward_stats, student_learning,
                      review_status, created_at, completed_at)
VALUES ('Summarise the report', 'succeeded', '{"learning_key": "k1", "note": "café ✓"}', '42',
        '{"score": 0.9}', '{"mean": 0.9}', 'cite sources', 'approved',
        '2024-05-01T10:00:00+00', '2024-05-01T10:05:00+00'),
       ('Plan a trip', 'running', NULL, NULL, NULL, NULL, NULL, DEFAULT, '2024-05-02T08:00:00+00', NULL);
INSERT INTO plans VALUES (1, '{"steps": [{"id": 1, "description": "read", "depends_on": []}]}');
INSERT INTO step_results VALUES
    (1, 1, 'thought...', 'read it', '{"reward": {"score": 1}}', 1, '{"tool": "reader"}'),
    (1, 2, 'more', 'summary', NULL, 2, NULL),
    (2, 1, NULL, NULL, NULL, NULL, NULL);
INSERT INTO step_attempts VALUES (1, 2, 1, '{"ok": false}');
INSERT INTO trajectory_events (session_id, event)
VALUES (1, '{"type": "tool_call"}'), (1, '{"type": "done"}');
"""
LEGACY_TABLES = ["sessions", "plans", "step_results", "step_attempts", "trajectory_events"]


@asynccontextmanager
async def _connected(url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()


async def _columns(conn: asyncpg.Connection, table: str) -> dict[str, tuple[str, str, str | None]]:
    rows = await conn.fetch(
        "SELECT column_name, data_type, is_nullable, column_default FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
        table,
    )
    return {r["column_name"]: (r["data_type"], r["is_nullable"], r["column_default"]) for r in rows}


async def _snapshot(conn: asyncpg.Connection, table: str, columns: list[str]) -> list[tuple[str, ...]]:
    """Every row as text, with xmin/ctid: an UPDATE or a table rewrite would change them."""
    cols = ", ".join(f'"{c}"::text' for c in columns)
    rows = await conn.fetch(f"SELECT xmin::text, ctid::text, {cols} FROM {table} ORDER BY ctid")  # noqa: S608
    return [tuple(r) for r in rows]


async def _recorded(conn: asyncpg.Connection) -> list[tuple[int, str, str]]:
    rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations ORDER BY version")
    return [(r["version"], r["name"], r["checksum"]) for r in rows]


def _copy_sql(tmp_path: Path) -> Path:
    directory = tmp_path / "sql"
    shutil.copytree(SQL_DIR, directory)
    return directory


async def _run_cli(*args: str, database_url: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "migrations",
        *args,
        cwd=REPO,
        env={**os.environ, "DATABASE_URL": database_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


@pytest.mark.integration
async def test_fresh_database_gets_every_table_column_and_index(make_database: MakeDatabase) -> None:
    """On an empty database every packaged file is applied and the Atlas schema plus adapter columns exist."""
    url = await make_database()
    applied = await apply_migrations(url)
    assert applied == [AppliedMigration(m.version, m.name) for m in PACKAGED]
    async with _connected(url) as conn:
        assert await _recorded(conn) == [(m.version, m.name, m.checksum) for m in PACKAGED]
        assert [v for v, _, _ in await _recorded(conn)][:3] == [1, 2, 3]
        for table in ["sessions", "step_results"]:
            columns = await _columns(conn, table)
            assert {c: columns[c][0] for c in ADAPTER_COLUMNS if c in columns} == ADAPTER_COLUMNS, table
        sessions = await _columns(conn, "sessions")
        assert sessions["status"][2] == "'running'::text"
        assert set(await _columns(conn, "plans")) == {"session_id", "plan"}
        index = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'sessions' "
            "AND indexname = 'sessions_adapter_session_id_key'"
        )
        assert index is not None
        assert "UNIQUE" in index
        # 003 indexed step_results.adapter_session_id; 011 drops it again (random keys, nothing reads it).
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM pg_indexes WHERE tablename = 'step_results' "
                "AND indexdef LIKE '%(adapter_session_id)'"
            )
            == 0
        )


@pytest.mark.integration
async def test_unique_adapter_session_id_allows_many_nulls(make_database: MakeDatabase) -> None:
    """Sessions without an adapter session coexist; two with the same adapter_session_id do not."""
    url = await make_database()
    await apply_migrations(url)
    async with _connected(url) as conn:
        await conn.execute("INSERT INTO sessions (task) VALUES ('a'), ('b')")
        await conn.execute("INSERT INTO sessions (task, adapter_session_id) VALUES ('c', 'as-1')")
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("INSERT INTO sessions (task, adapter_session_id) VALUES ('d', 'as-1')")


@pytest.mark.integration
async def test_legacy_atlas_rows_are_untouched(make_database: MakeDatabase) -> None:
    """On a pre-adapter Atlas deployment, existing columns and rows are byte-for-byte unchanged."""
    url = await make_database()
    async with _connected(url) as conn:
        await conn.execute(LEGACY_ATLAS)
        before_columns = {t: await _columns(conn, t) for t in LEGACY_TABLES}
        before_rows = {t: await _snapshot(conn, t, list(before_columns[t])) for t in LEGACY_TABLES}
    assert len(await apply_migrations(url)) == len(PACKAGED)
    async with _connected(url) as conn:
        for table in LEGACY_TABLES:
            after_columns = await _columns(conn, table)
            assert {c: after_columns[c] for c in before_columns[table]} == before_columns[table], table
            assert await _snapshot(conn, table, list(before_columns[table])) == before_rows[table], table
        assert set(await _columns(conn, "plans")) == {"session_id", "plan"}
        for table in ["sessions", "step_results"]:
            nulls = await conn.fetchval(
                f"SELECT bool_and(adapter_session_id IS NULL AND adapter_usage IS NULL "  # noqa: S608
                f"AND adapter_events IS NULL) FROM {table}"
            )
            assert nulls is True, table


@pytest.mark.integration
async def test_early_atlas_tables_gain_the_columns_the_pipeline_writes(make_database: MakeDatabase) -> None:
    """Tables from early Atlas releases (no reward/learning, no step metadata) get them, rows kept."""
    url = await make_database()
    async with _connected(url) as conn:
        await conn.execute(
            "CREATE TABLE sessions (id SERIAL PRIMARY KEY, task TEXT NOT NULL, "
            "status TEXT NOT NULL DEFAULT 'running', metadata JSONB, final_answer TEXT, "
            "created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(), completed_at TIMESTAMPTZ);"
            "CREATE TABLE step_results (session_id INTEGER REFERENCES sessions(id) ON DELETE CASCADE, "
            "step_id INTEGER NOT NULL, trace TEXT, output TEXT, evaluation JSONB, attempts INTEGER, "
            "PRIMARY KEY (session_id, step_id));"
            "INSERT INTO sessions (task) VALUES ('old');"
            "INSERT INTO step_results VALUES (1, 1, 't', 'o', NULL, 1);"
        )
        old = {t: list(await _columns(conn, t)) for t in ["sessions", "step_results"]}
        before = {t: await _snapshot(conn, t, cols) for t, cols in old.items()}
    await apply_migrations(url)
    async with _connected(url) as conn:
        sessions = await _columns(conn, "sessions")
        assert {"reward", "student_learning", "teacher_learning"} <= set(sessions)
        assert "metadata" in await _columns(conn, "step_results")
        for table, cols in old.items():
            assert await _snapshot(conn, table, cols) == before[table], table


@pytest.mark.integration
async def test_second_run_applies_nothing(make_database: MakeDatabase) -> None:
    """Re-running on a migrated database returns [] and leaves schema_migrations as it was."""
    url = await make_database()
    await apply_migrations(url)
    async with _connected(url) as conn:
        before = await conn.fetch("SELECT * FROM schema_migrations ORDER BY version")
    assert await apply_migrations(url) == []
    async with _connected(url) as conn:
        assert await conn.fetch("SELECT * FROM schema_migrations ORDER BY version") == before


@pytest.mark.integration
async def test_concurrent_runners_apply_each_migration_once(make_database: MakeDatabase) -> None:
    """Several runners started together all succeed and, between them, apply each file exactly once."""
    url = await make_database()
    results = await asyncio.gather(*(apply_migrations(url) for _ in range(4)))
    versions = sorted(m.version for result in results for m in result)
    assert versions == [m.version for m in PACKAGED]
    assert sum(1 for result in results if result) == 1
    async with _connected(url) as conn:
        assert len(await _recorded(conn)) == len(PACKAGED)


@pytest.mark.integration
async def test_runner_waits_for_the_lock_then_proceeds(make_database: MakeDatabase) -> None:
    """While another session holds the advisory lock the runner waits, touching nothing, then applies."""
    url = await make_database()
    async with _connected(url) as holder:
        await holder.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)
        runner = asyncio.create_task(apply_migrations(url, lock_timeout_s=30))
        await asyncio.sleep(0.5)
        assert not runner.done()
        assert await holder.fetchval("SELECT to_regclass('schema_migrations')") is None
        await holder.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
        assert len(await asyncio.wait_for(runner, timeout=30)) == len(PACKAGED)


@pytest.mark.integration
async def test_lock_timeout_is_reported(make_database: MakeDatabase) -> None:
    """A runner that cannot get the lock within lock_timeout_s raises MigrationLockTimeout."""
    url = await make_database()
    async with _connected(url) as holder:
        await holder.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)
        with pytest.raises(MigrationLockTimeout, match=str(ADVISORY_LOCK_KEY)):
            await apply_migrations(url, lock_timeout_s=0.3)
        assert await holder.fetchval("SELECT to_regclass('schema_migrations')") is None


@pytest.mark.integration
async def test_edited_applied_file_is_a_checksum_mismatch(
    make_database: MakeDatabase, tmp_path: Path
) -> None:
    """Editing an applied file makes the next run fail with ChecksumMismatch naming it, applying nothing."""
    url = await make_database()
    await apply_migrations(url)
    directory = _copy_sql(tmp_path)
    edited = directory / "002_adapter_sessions.sql"
    edited.write_text(edited.read_text() + "\n-- tweak\n")
    (directory / "900_new.sql").write_text("CREATE TABLE should_not_exist (id int);\n")
    with pytest.raises(ChecksumMismatch, match=r"002_adapter_sessions\.sql"):
        await apply_migrations(url, directory=directory)
    async with _connected(url) as conn:
        assert await conn.fetchval("SELECT to_regclass('should_not_exist')") is None


@pytest.mark.integration
async def test_failing_file_is_rolled_back_alone(make_database: MakeDatabase, tmp_path: Path) -> None:
    """A failing file leaves no trace and no row; the files before it stay applied; a fixed file then runs."""
    url = await make_database()
    directory = _copy_sql(tmp_path)
    broken = directory / "900_broken.sql"
    broken.write_text("CREATE TABLE half_done (id int);\nSELECT * FROM no_such_table;\n")
    with pytest.raises(MigrationFailed, match=r"900_broken\.sql") as info:
        await apply_migrations(url, directory=directory)
    assert info.value.sqlstate == "42P01"
    async with _connected(url) as conn:
        assert await conn.fetchval("SELECT to_regclass('half_done')") is None
        assert [v for v, _, _ in await _recorded(conn)] == [m.version for m in PACKAGED]
    broken.write_text("CREATE TABLE half_done (id int);\n")
    assert await apply_migrations(url, directory=directory) == [AppliedMigration(900, "900_broken")]


@pytest.mark.integration
async def test_file_and_its_record_commit_together(make_database: MakeDatabase, tmp_path: Path) -> None:
    """If recording a file fails after its SQL ran, the SQL is rolled back with it (one transaction)."""
    url = await make_database()
    directory = tmp_path / "sql"
    directory.mkdir()
    # The file claims its own version, so the runner's INSERT into schema_migrations fails afterwards.
    (directory / "001_claims_itself.sql").write_text(
        "CREATE TABLE made_by_file (id int);\n"
        "INSERT INTO schema_migrations (version, name, checksum) VALUES (1, 'squatter', 'x');\n"
    )
    with pytest.raises(MigrationFailed, match=r"001_claims_itself\.sql") as info:
        await apply_migrations(url, directory=directory)
    assert info.value.sqlstate == "23505"
    async with _connected(url) as conn:
        assert await conn.fetchval("SELECT to_regclass('made_by_file')") is None
        assert await _recorded(conn) == []


@pytest.mark.integration
async def test_late_lower_numbered_file_is_applied(make_database: MakeDatabase, tmp_path: Path) -> None:
    """A file numbered below an applied one (004 after 005) is applied on the next run, not refused."""
    url = await make_database()
    directory = tmp_path / "sql"
    directory.mkdir()
    (directory / "005_second.sql").write_text("CREATE TABLE five (id int);\n")
    await apply_migrations(url, directory=directory)
    (directory / "004_first.sql").write_text("CREATE TABLE four (id int);\n")
    assert await apply_migrations(url, directory=directory) == [AppliedMigration(4, "004_first")]


@pytest.mark.integration
async def test_foreign_schema_migrations_table_is_refused(make_database: MakeDatabase) -> None:
    """A schema_migrations table of another tool (golang-migrate's shape) stops the run before any file."""
    url = await make_database()
    async with _connected(url) as conn:
        await conn.execute(
            "CREATE TABLE schema_migrations (version bigint PRIMARY KEY, dirty boolean NOT NULL)"
        )
    with pytest.raises(MigrationError, match="not atlas-pipeline's"):
        await apply_migrations(url)
    with pytest.raises(MigrationError, match="not atlas-pipeline's"):
        await migration_status(url)
    async with _connected(url) as conn:
        assert await conn.fetchval("SELECT to_regclass('sessions')") is None


@pytest.mark.integration
async def test_status_reads_without_changing_anything(make_database: MakeDatabase) -> None:
    """migration_status lists everything pending on a fresh database without creating schema_migrations."""
    url = await make_database()
    status = await migration_status(url)
    assert (status.applied, [m.name for m in status.pending]) == ((), [m.name for m in PACKAGED])
    async with _connected(url) as conn:
        assert await conn.fetchval("SELECT to_regclass('schema_migrations')") is None
    await apply_migrations(url)
    status = await migration_status(url)
    assert status.up_to_date
    assert [m.name for m in status.applied] == [m.name for m in PACKAGED]


@pytest.mark.integration
async def test_cli_applies_then_reports_up_to_date(make_database: MakeDatabase) -> None:
    """The command prints one line per applied file and a summary; --database-url beats $DATABASE_URL."""
    url = await make_database()
    unreachable = "postgresql://u:secret@127.0.0.1:1/x"
    code, out, err = await _run_cli("--database-url", url, database_url=unreachable)
    assert (code, err) == (0, "")
    assert out.splitlines() == [f"applied {m.name}" for m in PACKAGED] + [
        f"migrations: {len(PACKAGED)} applied, 0 pending"
    ]
    code, out, _ = await _run_cli(database_url=url)
    assert (code, out) == (0, "migrations: up to date\n")
    code, out, _ = await _run_cli("--status", database_url=url)
    assert code == 0
    assert out.splitlines()[-1] == f"migrations: {len(PACKAGED)} applied, 0 pending"


async def test_cli_unreachable_database_exits_2_without_leaking_the_password() -> None:
    """Connection refused: exit 2, one clear stderr line naming host, port and database, no password."""
    code, out, err = await _run_cli(database_url="postgresql://u:secret@127.0.0.1:1/x")
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1
    assert "127.0.0.1:1" in err
    assert 'database "x"' in err
    assert "connection refused" in err
    assert "DATABASE_URL" in err
    assert "Traceback" not in err
    assert "secret" not in err


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:secret@nosuchhost.invalid:5432/x", "host name not found"),
        ("mysql://u:secret@127.0.0.1/x", "invalid database URL 'mysql://u:***@127.0.0.1/x'"),
    ],
)
async def test_cli_bad_host_or_url_exits_2(url: str, expected: str) -> None:
    """An unknown host or a non-PostgreSQL URL is exit 2 with a clear message and the password masked."""
    code, _, err = await _run_cli(database_url=url)
    assert code == 2
    assert expected in err
    assert "Traceback" not in err
    assert "secret" not in err


@pytest.mark.integration
async def test_cli_missing_database_and_bad_role_exit_2(admin_database_url: str) -> None:
    """A database that does not exist, or a role the server refuses, is exit 2 naming it, no password."""
    parts = urlsplit(admin_database_url)
    code, _, err = await _run_cli(database_url=parts._replace(path="/atlas_no_such_db").geturl())
    assert code == 2
    assert 'database "atlas_no_such_db"' in err
    assert "does not exist" in err
    assert "Traceback" not in err
    hostport = parts.netloc.rpartition("@")[2]
    code, _, err = await _run_cli(database_url=f"postgresql://atlas_no_such_role:hunter2@{hostport}/postgres")
    assert code == 2
    assert "authentication failed" in err
    assert "hunter2" not in err
    assert "Traceback" not in err
