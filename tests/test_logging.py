"""configure_logging: stdlib logging (aiormq, aiohttp, asyncpg, asyncio) goes through structlog."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson

_ROOT = Path(__file__).resolve().parent.parent

_SCRIPT = """
import asyncio
import gc
import logging

import structlog

from atlas_common import configure_logging

configure_logging(level="INFO", log_format={log_format!r})
log = structlog.get_logger("probe")
try:
    raise ZeroDivisionError("library boom")
except ZeroDivisionError:
    logging.getLogger("aiormq.connection").exception("connection %s lost", "c1")
try:
    raise KeyError("structlog boom")
except KeyError:
    log.exception("probe.failed", attempt=2)
log.info("probe.plain", n=1)
with structlog.contextvars.bound_contextvars(task_id="t1", adapter_session_id="s1"):
    logging.getLogger("aiohttp.client").warning("POST %s failed; retrying", "http://agent")
    log.warning("probe.bound")
logging.getLogger("aiohttp.client").warning("outside any task")


async def main() -> None:
    async def fail() -> None:
        raise RuntimeError("nobody awaited me")

    task = asyncio.get_running_loop().create_task(fail())
    await asyncio.sleep(0.01)
    del task
    gc.collect()
    await asyncio.sleep(0)


asyncio.run(main())
"""


def _run(log_format: str) -> str:
    """stderr of a fresh interpreter that configures logging and logs through stdlib and structlog."""
    script = textwrap.dedent(_SCRIPT).replace("{log_format!r}", repr(log_format))
    env = {k: v for k, v in os.environ.items() if k not in ("LOG_FORMAT", "LOG_LEVEL")}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=_ROOT,
        env={**env, "LOG_FORMAT": log_format},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout == ""
    return done.stderr


def _json_lines() -> list[dict[str, Any]]:
    stderr = _run("json")
    lines = [line for line in stderr.splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(orjson.loads(line))
        except orjson.JSONDecodeError as err:
            raise AssertionError(f"not one JSON object per line: {line!r}\n--- stderr:\n{stderr}") from err
    assert all(isinstance(p, dict) for p in parsed)
    return parsed


def _one(lines: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [line for line in lines if all(line.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, lines)
    return found[0]


def test_json_every_stderr_line_is_one_object_with_the_traceback_inside() -> None:
    """LOG_FORMAT=json: library and asyncio tracebacks are fields of one JSON line, not stray text lines."""
    lines = _json_lines()
    library = _one(lines, logger="aiormq.connection")
    assert library["level"] == "error"
    assert library["event"] == "connection c1 lost"
    assert library["timestamp"].endswith("Z")
    assert library["exception"].startswith("Traceback (most recent call last):")
    assert "ZeroDivisionError: library boom" in library["exception"]

    never_retrieved = _one(lines, logger="asyncio")
    assert never_retrieved["level"] == "error"
    assert never_retrieved["event"].startswith("Task exception was never retrieved")
    assert "RuntimeError: nobody awaited me" in never_retrieved["exception"]


def test_json_structlog_lines_keep_their_keys() -> None:
    """structlog's own lines are unchanged: event, level, timestamp, exception and the bound values only."""
    lines = _json_lines()
    failed = _one(lines, event="probe.failed")
    assert set(failed) == {"event", "level", "timestamp", "exception", "attempt"}
    assert failed["level"] == "error"
    assert "KeyError: 'structlog boom'" in failed["exception"]
    assert set(_one(lines, event="probe.plain")) == {"event", "level", "timestamp", "n"}
    bound = _one(lines, event="probe.bound")
    assert (bound["task_id"], bound["adapter_session_id"]) == ("t1", "s1")


def test_json_stdlib_lines_carry_bound_contextvars() -> None:
    """A stdlib line (aiohttp, under an HTTP adapter) logged inside bound_contextvars carries task_id and
    adapter_session_id."""
    lines = _json_lines()
    inside = _one(lines, event="POST http://agent failed; retrying")
    assert inside["logger"] == "aiohttp.client"
    assert inside["level"] == "warning"
    assert (inside["task_id"], inside["adapter_session_id"]) == ("t1", "s1")
    outside = _one(lines, event="outside any task")
    assert "task_id" not in outside
    assert "adapter_session_id" not in outside


def test_console_stays_readable() -> None:
    """LOG_FORMAT=console: stdlib lines are rendered by structlog's console renderer, traceback included."""
    stderr = _run("console")
    assert not stderr.lstrip().startswith("{")
    library = [line for line in stderr.splitlines() if "connection c1 lost" in line]
    assert len(library) == 1
    assert "[error" in library[0]
    assert "aiormq.connection" in library[0]
    assert "ZeroDivisionError: library boom" in stderr
    retry = [line for line in stderr.splitlines() if "POST http://agent failed; retrying" in line]
    assert len(retry) == 1
    assert "task_id=t1" in retry[0]
