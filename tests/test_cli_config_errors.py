"""Bad configuration on any command line: one ``error: ...`` line, a non-zero exit, no traceback, no password.

Every command runs as a subprocess, as an operator would run it. The URLs point at port 1 (nothing
listens there) wherever they are valid, so a command that wrongly accepted its configuration could not
touch the shared broker or database.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._pipeline import ROOT

NEEDLE = "s3cret"
UNREACHABLE_AMQP = f"amqp://guest:{NEEDLE}@127.0.0.1:1/"
UNREACHABLE_DB = f"postgresql://postgres:{NEEDLE}@127.0.0.1:1/atlas_nowhere"
BAD_AMQP_URLS = [
    f"amqp://guest:{NEEDLE}@127.0.0.1:notaport/",
    f"amqp://guest:{NEEDLE}@127.0.0.1:99999/",
    f"http://guest:{NEEDLE}@127.0.0.1:5672/",
    f"amqp://guest:{NEEDLE}@[::1/",
]
BAD_DATABASE_URLS = [
    f"postgresql://postgres:{NEEDLE}@127.0.0.1:notaport/atlas",
    f"mysql://postgres:{NEEDLE}@127.0.0.1/atlas",
    f"postgresql://postgres:{NEEDLE}@[::1/atlas",
    f"postgresql://postgres@127.0.0.1/atlas?password={NEEDLE}&port=x",
]
COMMANDS = {
    "worker": ["worker"],
    "ingestor": ["ingestor"],
    "producer status": ["producer", "status"],
    "producer demo": ["producer", "demo", "--count", "1", "--no-progress"],
    "producer submit": ["producer", "submit", "{tasks}", "--no-progress"],
}


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"task": "one"}\n')
    full_env = {
        **os.environ,
        "AMQP_URL": UNREACHABLE_AMQP,
        "DATABASE_URL": UNREACHABLE_DB,
        "ATLAS_PREFIX": "tcfg",
        "PYTHONPATH": str(ROOT),
        **env,
    }
    argv = [arg.replace("{tasks}", str(tasks)) for arg in args]
    return subprocess.run(
        [sys.executable, "-m", *argv],
        env=full_env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def _assert_one_clean_error(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert NEEDLE not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], result.stderr


@pytest.mark.parametrize("url", BAD_AMQP_URLS)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_bad_amqp_url_is_one_clear_line(command: str, url: str, tmp_path: Path) -> None:
    """A malformed AMQP_URL: every service command exits 2 with one error line naming it, no password."""
    result = _run(COMMANDS[command], tmp_path, AMQP_URL=url)
    _assert_one_clean_error(result, "AMQP", "URL")


@pytest.mark.parametrize("url", BAD_DATABASE_URLS)
@pytest.mark.parametrize("command", [*sorted(COMMANDS), "migrations"])
def test_bad_database_url_is_one_clear_line(command: str, url: str, tmp_path: Path) -> None:
    """A malformed DATABASE_URL: every command (migrations too) exits 2 with one error line, no password."""
    result = _run(COMMANDS.get(command, [command]), tmp_path, DATABASE_URL=url)
    _assert_one_clean_error(result, "database URL")


def test_bad_url_flag_is_one_clear_line(tmp_path: Path) -> None:
    """A malformed --amqp-url / --database-url flag gets the same treatment as the environment variable."""
    bad_amqp = BAD_AMQP_URLS[0]
    _assert_one_clean_error(_run(["worker", "--amqp-url", bad_amqp], tmp_path), "AMQP")
    _assert_one_clean_error(_run(["producer", "--amqp-url", bad_amqp, "status"], tmp_path), "AMQP")
    bad_db = BAD_DATABASE_URLS[0]
    _assert_one_clean_error(_run(["migrations", "--database-url", bad_db], tmp_path), "database URL")
    _assert_one_clean_error(_run(["producer", "status", "--database-url", bad_db], tmp_path), "database URL")


@pytest.mark.parametrize(
    "args",
    [
        ["producer", "--prefix", "bad prefix!", "demo", "--count", "1"],
        ["producer", "--prefix", "bad prefix!", "status"],
        ["worker", "--prefix", "bad prefix!"],
    ],
)
def test_bad_prefix_flag_is_one_clear_line(args: list[str], tmp_path: Path) -> None:
    """--prefix with characters a queue name must not have: exit 2, one line naming the prefix."""
    _assert_one_clean_error(_run(args, tmp_path), "prefix", "bad prefix!")


def test_bad_prefix_in_environment_is_one_clear_line(tmp_path: Path) -> None:
    """ATLAS_PREFIX with bad characters is reported the same way by the ingestor."""
    _assert_one_clean_error(_run(["ingestor"], tmp_path, ATLAS_PREFIX="bad prefix!"), "ATLAS_PREFIX")


def test_every_problem_gets_its_own_line(tmp_path: Path) -> None:
    """Two bad settings at once: two error lines, still no password."""
    result = _run(["worker"], tmp_path, AMQP_URL=BAD_AMQP_URLS[0], DATABASE_URL=BAD_DATABASE_URLS[0])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert all(line.startswith("error: ") for line in lines)
    assert NEEDLE not in result.stderr


@pytest.mark.parametrize(
    ("args", "flag", "why"),
    [
        (["--adapter", "../x"], "--adapter", "adapter name"),
        (["--adapter", ""], "--adapter", "adapter name"),
        (["--count", "-5"], "--count", "at least 1"),
        (["--count", "0"], "--count", "at least 1"),
        (["--count", "many"], "--count", "whole number"),
    ],
)
def test_demo_arguments_are_checked_when_parsed(args: list[str], flag: str, why: str, tmp_path: Path) -> None:
    """demo --adapter must be an adapter name and --count at least 1: argparse refuses them (exit 2)."""
    result = _run(["producer", "demo", *args], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert flag in last
    assert why in last
    assert "submitted" not in result.stdout
