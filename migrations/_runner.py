"""Apply the pending migrations to one database, one transaction per file, under an advisory lock."""

from __future__ import annotations

import time
from pathlib import Path

import asyncpg
import structlog

from migrations._connect import CONNECTION_LOST, connect, connection_lost
from migrations._discover import discover
from migrations._errors import MigrationError, MigrationFailed, MigrationLockTimeout
from migrations._models import AppliedMigration, Migration, MigrationStatus, RecordedMigration
from migrations._plan import late, plan

# Key of the session-level pg_advisory_lock every runner takes before reading or writing schema_migrations:
# the bytes b"atlasmig" read as a big-endian bigint. Fixed forever, so any version of any service serialises
# with any other. Anything else taking this key would block migrations.
ADVISORY_LOCK_KEY = 0x61746C61736D6967

_log = structlog.get_logger("migrations")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
_REQUIRED_COLUMNS = {
    "version": "integer",
    "name": "text",
    "checksum": "text",
    "applied_at": "timestamp with time zone",
}


async def apply_migrations(
    database_url: str,
    *,
    directory: Path | None = None,
    lock_timeout_s: float = 60.0,
    connect_timeout_s: float = 10.0,
) -> list[AppliedMigration]:
    """Apply every pending migration of ``directory`` (default: the packaged files); return those applied now.

    Safe to call from every service at start-up: runners serialise on ADVISORY_LOCK_KEY, waiting up to
    ``lock_timeout_s`` (MigrationLockTimeout after that), and a runner that finds nothing pending returns [].
    Files are checked before connecting, so a broken set fails fast.
    """
    if lock_timeout_s <= 0:
        raise ValueError("lock_timeout_s must be positive")
    migrations = discover(directory)
    conn = await connect(database_url, timeout_s=connect_timeout_s)
    try:
        await _lock(conn, lock_timeout_s)
        await conn.execute(_CREATE_TABLE)
        await _check_table(conn)
        recorded = await _recorded(conn)
        pending = plan(migrations, recorded)
        if late_files := late(pending, recorded):
            _log.warning("migrations.out_of_order", files=late_files, newest_applied=max(recorded))
        if unknown := sorted(set(recorded) - {m.version for m in migrations}):
            _log.warning("migrations.database_ahead", versions_without_file=unknown)
        applied: list[AppliedMigration] = []
        for migration in pending:
            await _apply(conn, migration)
            applied.append(AppliedMigration(migration.version, migration.name))
    except CONNECTION_LOST as err:
        raise connection_lost(err, database_url) from err
    except asyncpg.PostgresError as err:
        raise _bookkeeping_failed(err) from err
    finally:
        # Closing the session releases its advisory lock; an explicit unlock would only add a failure path.
        await conn.close(timeout=5)
    return applied


async def migration_status(
    database_url: str, *, directory: Path | None = None, connect_timeout_s: float = 10.0
) -> MigrationStatus:
    """What is applied and what is pending, without taking the lock or changing anything.

    Raises the same ChecksumMismatch an apply run would.
    """
    migrations = discover(directory)
    # No statement cache: the services call this with their own URL, which may go through a transaction
    # pooler (PgBouncer), where a named statement can be prepared on one server connection and run on
    # another. A few statements at start-up: the extra Parse each costs nothing that matters.
    conn = await connect(database_url, timeout_s=connect_timeout_s, statement_cache_size=0)
    try:
        recorded: dict[int, RecordedMigration] = {}
        if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
            await _check_table(conn)
            recorded = await _recorded(conn)
    except CONNECTION_LOST as err:
        raise connection_lost(err, database_url) from err
    except asyncpg.PostgresError as err:
        raise _bookkeeping_failed(err) from err
    finally:
        await conn.close(timeout=5)
    pending = plan(migrations, recorded)
    applied = tuple(AppliedMigration(r.version, r.name) for _, r in sorted(recorded.items()))
    return MigrationStatus(applied=applied, pending=tuple(pending))


def _bookkeeping_failed(err: asyncpg.PostgresError) -> MigrationError:
    # Errors of the runner's own statements (e.g. no CREATE privilege); a file's errors are MigrationFailed.
    return MigrationError(f"could not create or read schema_migrations: [{err.sqlstate}] {err}")


async def _lock(conn: asyncpg.Connection, timeout_s: float) -> None:
    if await conn.fetchval("SELECT pg_try_advisory_lock($1)", ADVISORY_LOCK_KEY):
        return
    _log.warning("migrations.waiting_for_lock", key=ADVISORY_LOCK_KEY, timeout_s=timeout_s)
    # lock_timeout bounds the wait server-side, so the waiting runner's session is never left half-locked.
    await conn.execute("SELECT set_config('lock_timeout', $1, false)", f"{max(1, round(timeout_s * 1000))}ms")
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)
    except asyncpg.LockNotAvailableError as err:
        raise MigrationLockTimeout(
            f"another migration runner held advisory lock {ADVISORY_LOCK_KEY} for over {timeout_s:g}s; "
            "see pg_locks for the holder, or wait and run again"
        ) from err
    await conn.execute("RESET lock_timeout")


async def _check_table(conn: asyncpg.Connection) -> None:
    # Other tools (golang-migrate, Rails) also use the name schema_migrations, with other columns.
    rows = await conn.fetch(
        "SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute "
        "WHERE attrelid = 'schema_migrations'::regclass AND attnum > 0 AND NOT attisdropped"
    )
    found = {str(row["attname"]): str(row["type"]) for row in rows}
    wrong = sorted(col for col, type_ in _REQUIRED_COLUMNS.items() if found.get(col) != type_)
    if wrong:
        raise MigrationError(
            f"table schema_migrations exists but is not atlas-pipeline's (columns {', '.join(wrong)} missing "
            "or of another type); is another migration tool using this database?"
        )


async def _recorded(conn: asyncpg.Connection) -> dict[int, RecordedMigration]:
    rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
    return {
        int(row["version"]): RecordedMigration(int(row["version"]), str(row["name"]), str(row["checksum"]))
        for row in rows
    }


async def _apply(conn: asyncpg.Connection, migration: Migration) -> None:
    started = time.monotonic()
    try:
        async with conn.transaction():
            # No arguments: asyncpg sends the file as one simple query, so it may hold many statements.
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
    except asyncpg.PostgresError as err:
        if isinstance(err, asyncpg.PostgresConnectionError):
            raise
        raise MigrationFailed(migration.filename, err.sqlstate, str(err)) from err
    _log.info(
        "migrations.applied",
        version=migration.version,
        migration=migration.name,
        ms=round((time.monotonic() - started) * 1000),
    )
