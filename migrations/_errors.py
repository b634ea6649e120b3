"""What can go wrong: one class per thing a caller would handle differently, all MigrationErrors."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

UnreachableReason = Literal[
    "bad_url", "refused", "unknown_host", "timeout", "no_database", "auth", "unavailable", "network", "lost"
]


class MigrationError(Exception):
    """Root of every error this package raises; ``str(err)`` is a one-line message fit for an operator."""


class BadMigrationFile(MigrationError):
    """A file in the migrations directory that cannot be a migration (name, number, encoding, content)."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(f"bad migration file {path.name}: {detail}")
        self.path = path
        self.detail = detail


class ChecksumMismatch(MigrationError):
    """A migration already applied to the database has been edited since; it is never re-run."""

    def __init__(self, filename: str, recorded_name: str) -> None:
        super().__init__(
            f"migration {filename} was changed after it was applied (recorded as {recorded_name}); "
            "restore the applied content and put the change in a new, higher-numbered file"
        )
        self.filename = filename
        self.recorded_name = recorded_name


class MigrationFailed(MigrationError):
    """The server rejected a migration's SQL; its transaction was rolled back and nothing of it remains."""

    def __init__(self, filename: str, sqlstate: str | None, server_message: str) -> None:
        super().__init__(f"migration {filename} failed and was rolled back: [{sqlstate}] {server_message}")
        self.filename = filename
        self.sqlstate = sqlstate
        self.server_message = server_message


class MigrationLockTimeout(MigrationError):
    """Another runner held the migration advisory lock for longer than the caller was willing to wait."""


class DatabaseUnreachable(MigrationError):
    """No usable connection. ``reason`` is a short code; ``str(err)`` says where and what to do."""

    def __init__(self, reason: UnreachableReason, message: str) -> None:
        super().__init__(message)
        self.reason: UnreachableReason = reason
