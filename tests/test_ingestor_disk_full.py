"""A full JSONL disk: logged as a JSONL failure (not a Postgres one), and no recover temporaries pile up."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import structlog
from structlog.testing import LogCapture

from ingestor import IngestorSettings, _files, _health
from ingestor._batch import merge_batch
from ingestor._errors import DatabaseUnavailable, JsonlWriteError
from ingestor._files import Compression
from ingestor._health import Hold
from ingestor._liveness import Liveness, lock_key
from ingestor._recovery import Recoverer
from ingestor._store import Store
from ingestor._write import FileTarget
from tests._ingest_env import (
    exported_counts,
    fresh_settings,
    open_files,
    running,
    wait_drained,
)
from tests._ingest_gen import bodies, generate, publish

_DEAD_OWNER = "dead-ingestor/0123abcd/1"
_FILE = "sessions-20261125T090000.000000Z-dead-ingestor-000001.jsonl"


def _capture_service_log(monkeypatch: pytest.MonkeyPatch) -> LogCapture:
    """Record what ingestor._health logs (its module logger is replaced for the test)."""
    cap = LogCapture()
    logger = structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[cap],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    )
    monkeypatch.setattr(_health, "_log", logger)
    return cap


def _events(cap: LogCapture) -> list[str]:
    return [str(e["event"]) for e in cap.entries]


def _enospc(path: Path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


# --- Hold: what failed is what gets logged -----------------------------------------------------------


def _hold(log_interval_s: float) -> Hold:
    settings = IngestorSettings(
        db_down_log_interval_s=log_interval_s, db_retry_backoff_s=0.001, db_retry_backoff_max_s=0.001
    )
    return Hold(settings, asyncio.Event())


async def test_health_logs_jsonl_and_postgres_trouble_separately(monkeypatch: pytest.MonkeyPatch) -> None:
    """A JsonlWriteError logs jsonl.* events, a DatabaseUnavailable postgres.*; each recovers on its own."""
    cap = _capture_service_log(monkeypatch)
    health = _hold(3600)
    await health.failed(JsonlWriteError("cannot append to .x.tmp: [Errno 28] No space left on device"))
    await health.failed(JsonlWriteError("still full"))  # within the interval: not logged again
    assert _events(cap) == ["jsonl.write_failed"]
    assert cap.entries[0]["dependency"] == "jsonl"
    assert "No space left" in cap.entries[0]["error"]

    await health.failed(DatabaseUnavailable("ConnectionRefusedError"))
    assert _events(cap) == ["jsonl.write_failed", "postgres.unavailable"]
    assert health._backoff.failures == 3

    health.ok("postgres")  # a batch reached Postgres: says nothing about the disk
    assert _events(cap)[2:] == ["postgres.available"]
    await health.failed(JsonlWriteError("still full"))
    assert _events(cap)[3:] == []  # the JSONL outage is still the same one

    health.ok()  # a JSONL append succeeded
    assert _events(cap)[3:] == ["jsonl.writable"]
    assert health._backoff.failures == 0
    health.ok()
    assert len(cap.entries) == 4


def test_health_repeats_by_dependency(monkeypatch: pytest.MonkeyPatch) -> None:
    """While an outage lasts it is re-logged as jsonl.still_failing / postgres.still_unavailable."""
    cap = _capture_service_log(monkeypatch)
    health = _hold(1e-9)
    health.note(JsonlWriteError("full"))
    health.note(JsonlWriteError("full"))
    health.note(DatabaseUnavailable("down"))
    health.note(DatabaseUnavailable("down"))
    assert _events(cap) == [
        "jsonl.write_failed",
        "jsonl.still_failing",
        "postgres.unavailable",
        "postgres.still_unavailable",
    ]
    assert [e["dependency"] for e in cap.entries] == ["jsonl", "jsonl", "postgres", "postgres"]
    assert cap.entries[1]["down_s"] >= 0


@pytest.mark.integration
async def test_full_disk_is_logged_as_jsonl_not_postgres(
    make_database, amqp_url: str, tmp_path: Path, cleanup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appends failing with ENOSPC log jsonl.write_failed, then jsonl.writable, and no postgres.* event."""
    gen = generate(40, seed=31, retry_share=0)
    settings = await fresh_settings(make_database, amqp_url, tmp_path / "jsonl", jsonl_max_age_s=60)
    cleanup.append(settings.topology())
    cap = _capture_service_log(monkeypatch)
    real_append = _files.append_at
    failures = {"left": 4, "seen": 0}

    def full_disk_append(path: Path, offset: int, data: bytes) -> int:
        if failures["left"] > 0:
            failures["left"] -= 1
            failures["seen"] += 1
            real_append(path, offset, data[: len(data) // 3])  # a partial write, then the disk is full
            raise _enospc(path)
        return real_append(path, offset, data)

    monkeypatch.setattr(_files, "append_at", full_disk_append)
    await publish(amqp_url, settings.topology(), bodies(gen.in_order(), rng=random.Random(7)))
    async with running(settings):
        await wait_drained(settings, gen)
    assert failures["seen"] == 4
    events = _events(cap)
    assert [e for e in events if e.startswith("postgres.")] == []
    assert events.count("jsonl.write_failed") == 1
    assert events.count("jsonl.writable") == 1
    assert events.index("jsonl.write_failed") < events.index("jsonl.writable")
    failed = next(e for e in cap.entries if e["event"] == "jsonl.write_failed")
    assert "No space left on device" in failed["error"]
    counts = exported_counts(settings.jsonl_dir)  # nothing lost or doubled by the cut-back appends
    assert set(counts) == gen.exported()
    assert set(counts.values()) == {1}


# --- failed regenerations leave no temporaries ----------------------------------------------------------


async def _dead_owners_open_file(database_url: str, jsonl_dir: Path) -> tuple[IngestorSettings, set[str]]:
    """A migrated database with complete sessions assigned to an open file whose owner is gone."""
    settings = IngestorSettings(database_url=database_url, jsonl_dir=jsonl_dir, ingestor_id="recoverer")
    gen = generate(25, seed=32)
    async with Store(settings) as store:
        ids = await store.write(merge_batch(gen.in_order()), FileTarget(_FILE, _DEAD_OWNER))
    assert len(ids) == len(gen.exported()) > 0
    return settings, gen.exported()


def _recover_tmps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".recover-" in p.name)


@pytest.mark.integration
async def test_failed_regeneration_removes_its_temporary(
    migrated_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regenerating a dead owner's file on a full disk fails 3 times and leaves no .recover-* file behind."""
    settings, exported = await _dead_owners_open_file(migrated_database, tmp_path)
    real_write = _files.write_file
    attempts: list[Path] = []

    def full_disk_write(path: Path, chunks: Any, compression: Compression) -> None:
        attempts.append(path)
        with path.open("wb") as out:
            out.write(b'{"adapter_session_id": "par')  # a few bytes, then the disk is full
        raise _enospc(path)

    monkeypatch.setattr(_files, "write_file", full_disk_write)
    async with Store(settings) as store, Liveness(settings) as liveness:
        recoverer = Recoverer(settings, store, liveness)
        for attempt in range(1, 4):
            with pytest.raises(JsonlWriteError, match="No space left on device"):
                await recoverer.recover_open_files()
            assert len(attempts) == attempt
            assert ".recover-" in attempts[-1].name
            assert _recover_tmps(settings.jsonl_dir) == []
            assert list(settings.jsonl_dir.iterdir()) == []
            assert await open_files(migrated_database) == [_FILE]

        monkeypatch.setattr(_files, "write_file", real_write)  # space again
        assert await recoverer.recover_open_files() == 1
    assert await open_files(migrated_database) == []
    assert [p.name for p in settings.jsonl_dir.iterdir()] == [_FILE]
    lines = [orjson.loads(line) for line in _files.read_lines(settings.jsonl_dir / _FILE)]
    assert sorted(line["adapter_session_id"] for line in lines) == sorted(exported)


@pytest.mark.integration
async def test_cleanup_removes_stale_recover_temporaries(migrated_database: str, tmp_path: Path) -> None:
    """cleanup_tmp deletes recover temporaries of an open file nobody is regenerating, and only those."""
    settings, _ = await _dead_owners_open_file(migrated_database, tmp_path)
    directory = settings.jsonl_dir
    stale = [_files.recover_tmp_path(directory, _FILE, nonce) for nonce in ("0badf00d", "deadbeef")]
    for path in stale:
        path.write_bytes(b"")
    owners_tmp = _files.tmp_path(directory, _FILE)  # the dead owner's appends: kept until the file is final
    owners_tmp.write_bytes(b"{}\n")
    async with Store(settings) as store, Liveness(settings) as liveness:
        recoverer = Recoverer(settings, store, liveness)
        # While the owner (or a recoverer) holds the owner lock, its regeneration may be under way.
        holder = await asyncpg.connect(migrated_database)
        try:
            assert await holder.fetchval("SELECT pg_try_advisory_lock($1::int8)", lock_key(_DEAD_OWNER))
            assert await recoverer.cleanup_tmp(at_start=False) == 0
            assert all(path.exists() for path in stale)
        finally:
            await holder.close()
        assert await recoverer.cleanup_tmp(at_start=False) == 2
        assert [p.name for p in directory.iterdir()] == [owners_tmp.name]
        assert await recoverer.cleanup_tmp(at_start=True) == 0  # the row is open: the owner's tmp stays
        assert owners_tmp.exists()
        # The lock was given back: a recoverer can still take the file over.
        assert await recoverer.recover_open_files() == 1
        assert await recoverer.cleanup_tmp(at_start=False) == 1
    assert sorted(p.name for p in directory.iterdir()) == [_FILE]
