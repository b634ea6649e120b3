"""Find the migration files in a directory: pure, no database."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from migrations._errors import BadMigrationFile, MigrationError
from migrations._models import Migration

SQL_DIR = Path(__file__).resolve().parent / "sql"

_FILE_NAME = re.compile(r"(?P<version>[0-9]+)_(?P<label>[a-z0-9]+(?:_[a-z0-9]+)*)\.sql")
_MAX_VERSION = 2**31 - 1  # schema_migrations.version is a Postgres integer


def checksum(data: bytes) -> str:
    """SHA-256 of the file's exact bytes: any edit, even whitespace, counts as a change."""
    return hashlib.sha256(data).hexdigest()


def discover(directory: Path | None = None) -> list[Migration]:
    """The ``NNN_label.sql`` files of ``directory`` (default: the packaged ``sql/``), sorted by number.

    Raises BadMigrationFile for a ``.sql`` file that is misnamed, numbered 0, numbered like another file,
    empty, or not UTF-8: a broken set must stop the run before anything touches the database.
    """
    directory = SQL_DIR if directory is None else directory
    if not directory.is_dir():
        raise MigrationError(f"migrations directory {directory} does not exist")
    by_version: dict[int, Migration] = {}
    # Hidden files are editor locks and backups, never migrations.
    for path in sorted(p for p in directory.glob("*.sql") if p.is_file() and not p.name.startswith(".")):
        migration = _load(path)
        other = by_version.get(migration.version)
        if other is not None:
            raise BadMigrationFile(path, f"number {migration.version} is also used by {other.filename}")
        by_version[migration.version] = migration
    return [by_version[version] for version in sorted(by_version)]


def _load(path: Path) -> Migration:
    match = _FILE_NAME.fullmatch(path.name)
    if match is None:
        raise BadMigrationFile(path, "name must look like 001_lowercase_words.sql")
    version = int(match["version"])
    if not 1 <= version <= _MAX_VERSION:
        raise BadMigrationFile(path, f"number must be between 1 and {_MAX_VERSION}")
    data = path.read_bytes()
    try:
        sql = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadMigrationFile(path, f"not UTF-8 ({err.reason} at byte {err.start})") from err
    if not sql.strip():
        raise BadMigrationFile(path, "file is empty")
    return Migration(version=version, name=path.stem, path=path, checksum=checksum(data), sql=sql)
