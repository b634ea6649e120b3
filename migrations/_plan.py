"""Decide what to apply, given the files and the database's record: pure, no database."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from migrations._errors import ChecksumMismatch
from migrations._models import Migration, RecordedMigration


def plan(migrations: Sequence[Migration], recorded: Mapping[int, RecordedMigration]) -> list[Migration]:
    """The migrations still to apply, in number order; ChecksumMismatch if an applied file was edited.

    A pending file numbered below the newest applied one is still applied: numbers are handed out ahead
    (004 ingestor, 005 worker), so 005 may reach a database before 004. Recorded versions with no file are
    allowed too: a service built from an older checkout may start against a database a newer one migrated.
    """
    for migration in migrations:
        row = recorded.get(migration.version)
        if row is not None and row.checksum != migration.checksum:
            raise ChecksumMismatch(migration.filename, row.name)
    return [m for m in migrations if m.version not in recorded]


def late(pending: Sequence[Migration], recorded: Mapping[int, RecordedMigration]) -> list[str]:
    """File names of pending migrations numbered below the newest applied one (worth a warning)."""
    newest = max(recorded, default=0)
    return [m.filename for m in pending if m.version < newest]
