"""The migrations package without a database: file discovery, planning, URL handling, settings."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from atlas_common import redact_url, scrub_secrets
from migrations import (
    BadMigrationFile,
    ChecksumMismatch,
    DatabaseUnreachable,
    MigrateSettings,
    MigrationError,
    discover,
)
from migrations._dsn import parse_target
from migrations._models import RecordedMigration
from migrations._plan import late, plan


def _write(directory: Path, name: str, sql: str = "SELECT 1;\n") -> Path:
    path = directory / name
    path.write_text(sql, encoding="utf-8")
    return path


def _recorded(
    *pairs: tuple[int, str], checksums: dict[int, str] | None = None
) -> dict[int, RecordedMigration]:
    checksums = checksums or {}
    return {v: RecordedMigration(v, n, checksums.get(v, "x")) for v, n in pairs}


def test_packaged_files_start_with_the_three_pipeline_migrations() -> None:
    """The default directory holds 001-003 under the names other services rely on (004+ come later)."""
    assert [(m.version, m.name) for m in discover()[:3]] == [
        (1, "001_atlas_tables"),
        (2, "002_adapter_sessions"),
        (3, "003_pipeline_indexes"),
    ]


def test_discover_sorts_by_number_not_by_name(tmp_path: Path) -> None:
    """10 comes after 9 even though "10_" sorts before "9_" as text."""
    for name in ["10_ten.sql", "9_nine.sql", "002_two.sql"]:
        _write(tmp_path, name)
    assert [m.version for m in discover(tmp_path)] == [2, 9, 10]


def test_discover_ignores_other_files(tmp_path: Path) -> None:
    """Non-.sql files, hidden files and directories are not migrations."""
    _write(tmp_path, "001_a.sql")
    _write(tmp_path, "README.md", "notes")
    _write(tmp_path, ".#002_b.sql", "editor lock")
    (tmp_path / "003_dir.sql").mkdir()
    assert [m.filename for m in discover(tmp_path)] == ["001_a.sql"]


def test_duplicate_numbers_are_refused(tmp_path: Path) -> None:
    """Two files with the same number (even spelled 001 and 1) stop discovery, naming both."""
    _write(tmp_path, "001_first.sql")
    _write(tmp_path, "1_second.sql")
    with pytest.raises(BadMigrationFile) as info:
        discover(tmp_path)
    assert "001_first.sql" in str(info.value)
    assert "1_second.sql" in str(info.value)


@pytest.mark.parametrize(
    "name",
    [
        "abc.sql",
        "001-dash.sql",
        "001_.sql",
        "001_Upper.sql",
        "001.sql",
        "_001_x.sql",
        "000_zero.sql",
        "99999999999_huge.sql",
        "001_trailing_.sql",
    ],
)
def test_bad_file_names_are_refused(tmp_path: Path, name: str) -> None:
    """A .sql file that is not NNN_lowercase_words.sql numbered 1..2^31-1 is refused by name."""
    _write(tmp_path, "002_fine.sql")
    _write(tmp_path, name)
    with pytest.raises(BadMigrationFile) as info:
        discover(tmp_path)
    assert info.value.path.name == name
    assert name in str(info.value)


def test_empty_and_non_utf8_files_are_refused(tmp_path: Path) -> None:
    """An empty file or one that is not UTF-8 is refused rather than recorded as applied."""
    _write(tmp_path, "001_empty.sql", "  \n")
    with pytest.raises(BadMigrationFile, match=r"001_empty\.sql: file is empty"):
        discover(tmp_path)
    (tmp_path / "001_empty.sql").unlink()
    (tmp_path / "002_latin1.sql").write_bytes("SELECT 'caf\xe9';".encode("latin-1"))
    with pytest.raises(BadMigrationFile, match=r"002_latin1\.sql: not UTF-8"):
        discover(tmp_path)


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    """A directory that does not exist is an error, not an empty set of migrations."""
    with pytest.raises(MigrationError, match="does not exist"):
        discover(tmp_path / "nope")


def test_checksum_is_sha256_of_the_bytes_and_stable(tmp_path: Path) -> None:
    """The checksum is the SHA-256 of the file bytes, equal across runs, different after any edit."""
    path = _write(tmp_path, "001_a.sql", "CREATE TABLE t (id int);\n")
    first = discover(tmp_path)[0].checksum
    assert first == hashlib.sha256(path.read_bytes()).hexdigest()
    assert discover(tmp_path)[0].checksum == first
    _write(tmp_path, "001_a.sql", "CREATE TABLE t (id int); \n")
    assert discover(tmp_path)[0].checksum != first


def test_plan_returns_unapplied_files_in_order(tmp_path: Path) -> None:
    """With 1 applied, 2 and 3 are pending, in number order."""
    for name in ["003_c.sql", "001_a.sql", "002_b.sql"]:
        _write(tmp_path, name)
    files = discover(tmp_path)
    recorded = _recorded((1, "001_a"), checksums={1: files[0].checksum})
    assert [m.name for m in plan(files, recorded)] == ["002_b", "003_c"]


def test_plan_refuses_an_edited_applied_file(tmp_path: Path) -> None:
    """A recorded checksum that differs from the file raises ChecksumMismatch naming the file."""
    _write(tmp_path, "001_a.sql")
    with pytest.raises(ChecksumMismatch, match=r"001_a\.sql was changed"):
        plan(discover(tmp_path), _recorded((1, "001_a"), checksums={1: "0" * 64}))


def test_plan_applies_a_pending_file_below_the_newest_applied(tmp_path: Path) -> None:
    """004 arriving after 005 was applied is still pending (numbers are handed out ahead) and flagged late."""
    _write(tmp_path, "004_late.sql")
    _write(tmp_path, "005_early.sql")
    files = discover(tmp_path)
    recorded = _recorded((5, "005_early"), checksums={5: files[1].checksum})
    pending = plan(files, recorded)
    assert [m.name for m in pending] == ["004_late"]
    assert late(pending, recorded) == ["004_late.sql"]
    assert late(pending, {}) == []


def test_plan_tolerates_versions_without_files(tmp_path: Path) -> None:
    """A database migrated by a newer checkout (version 9 recorded, no file) is not an error."""
    _write(tmp_path, "001_a.sql")
    files = discover(tmp_path)
    recorded = _recorded((1, "001_a"), (9, "009_newer"), checksums={1: files[0].checksum})
    assert plan(files, recorded) == []


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://u:s3cret@db:5432/atlas", "postgresql://u:***@db:5432/atlas"),
        ("postgresql://u@db/atlas", "postgresql://u@db/atlas"),
        (
            "postgres://db/atlas?sslmode=require&password=s3cret",
            "postgres://db/atlas?sslmode=require&password=***",
        ),
        ("postgresql://u:p%40ss@[::1]:5433/d", "postgresql://u:***@[::1]:5433/d"),
        ("postgresql:///atlas?host=/run/pg&password=x", "postgresql:///atlas?host=/run/pg&password=***"),
    ],
)
def test_redact_url_hides_passwords_only(url: str, masked: str) -> None:
    """Passwords in the user part or a password= parameter become ***; the rest is kept."""
    assert redact_url(url) == masked


def test_parse_target_names_host_port_database_user() -> None:
    """The printable target has host:port (default port filled in), database and user, no password."""
    target = parse_target("postgresql://u:s3cret@db.internal/atlas")
    assert (target.hosts, target.database, target.user) == ("db.internal:5432", "atlas", "u")
    assert "s3cret" not in str(target)
    assert parse_target("postgresql://a@h1:1,h2:2/d").hosts == "h1:1,h2:2"


@pytest.mark.parametrize(
    "url", ["mysql://u:s3cret@h/d", "", "postgresql://u:s3cret@h:99999/d", "postgresql://u:s3cret@h:x/d"]
)
def test_parse_target_rejects_bad_urls_without_leaking_the_password(url: str) -> None:
    """A URL asyncpg would reject raises DatabaseUnreachable(bad_url) whose message has no password."""
    with pytest.raises(DatabaseUnreachable) as info:
        parse_target(url)
    assert info.value.reason == "bad_url"
    assert "s3cret" not in str(info.value)


def test_scrub_removes_raw_and_decoded_password() -> None:
    """Both the percent-encoded and the decoded password are removed from free text."""
    assert scrub_secrets("p%40ss or p@ss", "postgresql://u:p%40ss@h/d") == "*** or ***"


def test_settings_read_database_url_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """DATABASE_URL feeds MigrateSettings.database_url; without it the documented default applies."""
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:s3cret@db/atlas")
    settings = MigrateSettings()
    assert settings.database_url == "postgresql://u:s3cret@db/atlas"
    assert "s3cret" not in repr(settings)
    monkeypatch.delenv("DATABASE_URL")
    assert MigrateSettings().database_url == "postgresql://postgres@127.0.0.1:5432/postgres"
