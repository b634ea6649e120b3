"""The value types the package hands out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Migration:
    """One SQL file on disk: ``name`` is the file name without ``.sql`` (``001_atlas_tables``)."""

    version: int
    name: str
    path: Path
    checksum: str
    sql: str = field(repr=False)

    @property
    def filename(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class AppliedMigration:
    """A migration recorded in ``schema_migrations``."""

    version: int
    name: str


@dataclass(frozen=True)
class RecordedMigration:
    """A ``schema_migrations`` row as the runner compares it with the files."""

    version: int
    name: str
    checksum: str


@dataclass(frozen=True)
class MigrationStatus:
    """What the database has (``applied``, in version order) and what a run would apply (``pending``)."""

    applied: tuple[AppliedMigration, ...]
    pending: tuple[Migration, ...]

    @property
    def up_to_date(self) -> bool:
        return not self.pending
