"""Recovery: finish the open JSONL files of dead owners, and delete stale hidden temporaries.

An owner is dead when its owner-token advisory lock can be taken (see ``_liveness``); the recoverer holds
that lock (transaction-level) through the transaction it works in, so two recoverers never work on one
file. The file is finalized by :func:`ingestor._jsonl.finalize_locked` under the ``jsonl_files`` row
lock, which is what makes a recovered file and a live owner's roll mutually exclusive (the proof is in
``_jsonl``).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import structlog

from ingestor import _files, _sql
from ingestor._jsonl import finalize_locked
from ingestor._liveness import Liveness, lock_key
from ingestor._settings import IngestorSettings
from ingestor._store import Store
from ingestor._stream import SessionStream

_log = structlog.get_logger("ingestor.recovery")


def _hidden_tmp_files(directory: Path) -> dict[Path, str]:
    found: dict[Path, str] = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_file() and (name := _files.name_of_tmp(entry.name)) is not None:
                found[Path(entry.path)] = name
    return found


class Recoverer:
    def __init__(
        self,
        settings: IngestorSettings,
        store: Store,
        liveness: Liveness,
        stream: SessionStream | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._liveness = liveness
        self._stream = stream
        self._dir = settings.jsonl_dir

    async def cleanup_tmp(self, *, at_start: bool) -> int:
        """Delete stale hidden temporaries; returns how many were deleted.

        Stale: any tmp whose file is final; at start, any tmp whose file has no row at all (a tmp is only
        created after its row committed, so such a tmp is garbage); and a regeneration's
        ``.recover-*.tmp`` of a still-open file when nobody is regenerating it, which is when its owner
        lock can be taken (only the owner, or a recoverer holding that lock, ever writes one)."""
        try:
            found = await asyncio.to_thread(_hidden_tmp_files, self._dir)
        except OSError as err:
            _log.warning("recovery.cannot_list_dir", dir=str(self._dir), error=str(err))
            return 0
        if not found:
            return 0
        deleted = 0
        async with self._store.connection() as conn:
            states = {
                r["name"]: r["state"] for r in await conn.fetch(_sql.FILE_STATES, sorted(set(found.values())))
            }
            stale = [
                (path, states.get(name) or "absent")
                for path, name in sorted(found.items())
                if states.get(name) == "final" or (name not in states and at_start)
            ]
            deleted += await self._delete(stale)
            recovering: dict[str, list[Path]] = {}
            for path, name in sorted(found.items()):
                if states.get(name) == "open" and _files.is_recover_tmp(path.name):
                    recovering.setdefault(name, []).append(path)
            if recovering:
                for row in await conn.fetch(_sql.OPEN_FILES, self._liveness.token or ""):
                    paths = recovering.get(row["name"])
                    if paths is None:
                        continue
                    # The lock lasts as long as this transaction: the deletes happen while it is held.
                    async with conn.transaction():
                        if not await conn.fetchval(_sql.TRY_XACT_LOCK, lock_key(row["owner_token"])):
                            continue  # the owner or a recoverer is at work: its tmp may be in use
                        deleted += await self._delete([(path, "open") for path in paths])
        return deleted

    @staticmethod
    async def _delete(paths: list[tuple[Path, str]]) -> int:
        deleted = 0
        for path, state in paths:
            try:
                await asyncio.to_thread(path.unlink, missing_ok=True)
            except OSError as err:
                _log.warning("recovery.cannot_delete_tmp", path=str(path), error=str(err))
                continue
            deleted += 1
            _log.info("recovery.deleted_stale_tmp", path=str(path), file_state=state)
        return deleted

    async def recover_open_files(self) -> int:
        """Finalize every open file whose owner is gone; returns how many were finalized."""
        mine = self._liveness.token or ""
        recovered = 0
        async with self._store.connection() as conn:
            for row in await conn.fetch(_sql.OPEN_FILES, mine):
                name, token = row["name"], row["owner_token"]
                try:
                    _files.check_file_name(name)
                except ValueError:
                    _log.error("recovery.bad_file_name", file=name)
                    continue
                # One transaction holds the owner's lock (transaction-level: it ends with the commit, and
                # works through a transaction pooler) and the file's row lock while the file is finalized.
                async with conn.transaction():
                    if not await conn.fetchval(_sql.TRY_XACT_LOCK, lock_key(token)):
                        continue  # the owner is alive
                    locked = await conn.fetchrow(_sql.FILE_LOCK, name)
                    if locked is None or locked["state"] != "open":
                        continue
                    how = await finalize_locked(conn, self._dir, name, None, self._stream)
                recovered += 1
                _log.warning(
                    "recovery.file_finalized",
                    file=name,
                    owner_token=token,
                    how=how,
                    sessions=locked["sessions"],
                )
        return recovered
