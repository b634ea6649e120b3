"""atlas-pipeline's database schema: plain SQL files in ``migrations/sql/``, applied in number order.

Every service may call ``apply_migrations(DATABASE_URL)`` at start-up (or run ``atlas-migrate``): runners
serialise on a session-level ``pg_advisory_lock(ADVISORY_LOCK_KEY)``, so the second one waits, then finds
nothing to do. Each file runs in its own transaction together with its ``schema_migrations`` row.

Adding a migration: create ``sql/NNN_lowercase_words.sql`` with a number no other file uses (004 belongs
to the ingestor, 005 to the worker); pending files run in number order, even below an applied one.
Never edit a file once it has been applied anywhere (ChecksumMismatch); write a new one. Files run inside
a transaction, so no BEGIN/COMMIT, CREATE INDEX CONCURRENTLY or VACUUM. Prefer ``IF NOT EXISTS`` forms:
the tables may predate this project in an Atlas deployment.
"""

from migrations._discover import discover
from migrations._errors import (
    BadMigrationFile,
    ChecksumMismatch,
    DatabaseUnreachable,
    MigrationError,
    MigrationFailed,
    MigrationLockTimeout,
)
from migrations._models import AppliedMigration, Migration, MigrationStatus
from migrations._runner import ADVISORY_LOCK_KEY, apply_migrations, migration_status
from migrations._settings import MigrateSettings

__all__ = [
    "ADVISORY_LOCK_KEY",
    "AppliedMigration",
    "BadMigrationFile",
    "ChecksumMismatch",
    "DatabaseUnreachable",
    "MigrateSettings",
    "Migration",
    "MigrationError",
    "MigrationFailed",
    "MigrationLockTimeout",
    "MigrationStatus",
    "apply_migrations",
    "discover",
    "migration_status",
]
