"""The rolling JSONL writer, and why every complete session lands in exactly one final file exactly once.

Postgres is the source of truth; a file is a projection of ``sessions.export_file``.

Protocol
--------
1. *Assignment.* The batch transaction that makes a session complete (opened seen, status
   succeeded|failed, ``count(step_results) == steps_expected``; after that the row never changes) sets
   ``export_file`` to this ingestor's open file, only where it is NULL, while holding the session's row
   lock (task advisory locks + upsert). In the same transaction it bumps that file's ``jsonl_files`` row
   with ``... WHERE state = 'open' AND owner_token = $me``; no row means a recoverer finalized the file:
   the transaction rolls back and is retried with a new file.
2. *Append.* After commit, the lines of the just-assigned sessions (built from the rows the batch wrote,
   or read from Postgres where memory does not hold them all: ``_linecache``) are appended to
   ``.<name>.tmp`` (one gzip member / zstd frame per append), flushed and fsynced, then published to the
   sessions stream (confirmed, ``_stream``), before the batch is acked. A failed append is cut back to the
   last fsynced size and retried; a failed publish is retried (lines already appended are not appended
   again).
3. *Roll* (size or age). In one transaction: lock the file row FOR UPDATE; if it is still open, rename the
   tmp to the final name, fsync the directory, set ``state = 'final'``; if it is already final, delete
   the tmp.
4. *Recovery* (start and periodically). For an open row whose owner's advisory lock can be taken (the
   owner's liveness connection is gone): lock the row FOR UPDATE; if the final file exists, just mark it
   final; else regenerate it from ``WHERE export_file = name``, publish its lines to the sessions stream
   (they may be there already: at-least-once, duplicates carry the session's id), write them into a
   separate tmp, fsync, rename, fsync the directory, mark final. So a file is final only once all its lines
   are in the stream. A safety sweep assigns any complete-but-unassigned session (normally none).

Proof sketch
------------
*Exactly one file per session:* ``export_file`` goes from NULL to a name once, under the session's row
lock, and is never changed again. *The file's content is fixed when it becomes final:* every assignment
to F updates F's row in its own transaction, and the finalizer holds F's row lock, so an assigning
transaction either committed before the finalizer read the sessions (READ COMMITTED: each statement sees
everything committed before it) or blocks and then finds ``state = 'final'`` and rolls back.
*The final file holds exactly that set, once each:* the owner renames its tmp only while the row is open
and under its lock, and the tmp holds one line per committed assignment (appends follow every commit and
precede both the ack and the roll; a failed append is cut back and redone; an owner that cannot trust its
tmp regenerates instead, and so does one whose file row counts more assignments than it appended: a
commit whose reply was lost). Otherwise the file is regenerated from Postgres, which is that set by
definition. A rename is atomic and happens at most once per row transition (open -> final, under the row
lock); crashes leave only open rows (recovered) and hidden tmp files (deleted once their row is final or
absent, or, for a regeneration's tmp, once nobody holds the owner lock; a regeneration that fails deletes
its own tmp), never a second visible copy. Abandoned sessions never complete, so they are never exported.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import asyncpg
import structlog

from ingestor import _files, _sql
from ingestor._errors import JsonlWriteError
from ingestor._linecache import Assigned
from ingestor._settings import IngestorSettings
from ingestor._store import Store, fetch_lines
from ingestor._stream import SessionStream
from ingestor._write import FileTarget

_log = structlog.get_logger("ingestor.jsonl")

Finalized = Literal["renamed", "existing", "regenerated"]


async def finalize_locked(
    conn: asyncpg.Connection,
    directory: Path,
    name: str,
    trusted_tmp: Path | None,
    stream: SessionStream | None = None,
) -> Finalized:
    """Make ``name`` final on disk and in ``jsonl_files``; the caller holds the row lock (state 'open').

    ``trusted_tmp`` is the owner's complete tmp, its lines already in the stream; None regenerates from
    Postgres (recovery) and publishes the lines to ``stream`` first (StreamUnavailable: try again later)."""
    final = _files.safe_path(directory, name)
    how: Finalized
    try:
        if await asyncio.to_thread(final.exists):
            how = "existing"
        elif trusted_tmp is not None and await asyncio.to_thread(trusted_tmp.exists):
            await asyncio.to_thread(_files.publish, trusted_tmp, final)
            how = "renamed"
        else:
            ids = [r["id"] for r in await conn.fetch(_sql.FILE_SESSION_IDS, name)]
            lines = await fetch_lines(conn, ids)
            if stream is not None:
                await stream.publish(lines, name)
            tmp = _files.recover_tmp_path(directory, name, secrets.token_hex(4))
            # One thread call: a failed write deletes its own tmp before anything else can run.
            await asyncio.to_thread(_files.write_and_publish, tmp, final, lines, _files.compression_of(name))
            if trusted_tmp is not None:
                await asyncio.to_thread(trusted_tmp.unlink, missing_ok=True)
            how = "regenerated"
    except OSError as err:
        raise JsonlWriteError(f"cannot finalize {name}: {err}") from err
    await conn.execute(_sql.FILE_FINAL, name)
    return how


@dataclass(slots=True)
class _OpenFile:
    name: str
    owner_token: str
    tmp: Path
    size: int = 0
    """Bytes of the tmp known to be fsynced; a retried append starts here."""
    assigned: int = 0
    """Sessions committed to this file (so its jsonl_files row exists once this is > 0)."""
    first_assigned: float | None = None
    pending: list[Assigned] = field(default_factory=list)
    """Sessions committed to this file whose lines are not appended yet (with the line when memory
    held it; the others are read from Postgres)."""
    unstreamed: list[bytes] = field(default_factory=list)
    """Lines appended (fsynced) but not yet confirmed by the sessions stream."""
    trusted: bool = True


class RollingJsonl:
    """The one open file of this ingestor. One flush (or roll) runs at a time; the next batch's commit may
    note its assignments while a flush is appending the previous batch's (each flush takes what is pending
    when it starts)."""

    def __init__(
        self,
        settings: IngestorSettings,
        store: Store,
        *,
        stream: SessionStream | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._store = store
        self._stream = stream
        self._clock = clock
        self._dir = settings.jsonl_dir
        self._counter = 0
        self._current: _OpenFile | None = None

    @property
    def current_name(self) -> str | None:
        return self._current.name if self._current is not None else None

    def target(self, owner_token: str) -> FileTarget:
        """The file to assign to now; a new one when there is none or it belongs to an older token."""
        if self._current is not None and self._current.owner_token != owner_token:
            self.abandon("liveness connection replaced")
        if self._current is None:
            self._counter += 1
            name = _files.make_file_name(
                self._settings.ingestor_id, self._counter, compression=self._settings.jsonl_compression
            )
            self._current = _OpenFile(name, owner_token, _files.tmp_path(self._dir, name))
        return FileTarget(self._current.name, self._current.owner_token)

    def note_assigned(self, target: FileTarget, assigned: list[Assigned]) -> None:
        """Record a commit that assigned sessions to ``target`` (dropped if that file was abandoned)."""
        current = self._current
        if not assigned or current is None or current.name != target.name:
            return
        current.assigned += len(assigned)
        current.pending.extend(assigned)
        if current.first_assigned is None:
            current.first_assigned = self._clock()

    def abandon(self, reason: str, target: FileTarget | None = None) -> None:
        """Stop using the open file (only if it is ``target``'s: a batch that assigned to a file already
        abandoned must not abandon the next); a recoverer finalizes it from Postgres once its owner lock
        is free."""
        if target is not None and (self._current is None or self._current.name != target.name):
            return
        current, self._current = self._current, None
        if current is not None and current.assigned:
            _log.warning("jsonl.file_abandoned", file=current.name, reason=reason, sessions=current.assigned)

    @property
    def has_pending(self) -> bool:
        current = self._current
        return current is not None and bool(current.pending or current.unstreamed)

    async def flush(self) -> None:
        """Append the pending sessions' lines and fsync, then publish them to the sessions stream
        (DatabaseUnavailable / JsonlWriteError / StreamUnavailable: call again)."""
        current = self._current
        if current is None:
            return
        if current.pending:
            await self._append(current)
        if current.unstreamed and self._stream is not None:
            await self._stream.publish(current.unstreamed, current.name)
        current.unstreamed.clear()

    async def _append(self, current: _OpenFile) -> None:
        # Taken now: assignments noted while this appends (the next batch's commit) wait for the next flush.
        taken, current.pending = current.pending, []
        try:
            missing = [session_id for session_id, line in taken if line is None]
            read = await self._store.lines(missing) if missing else {}
            lines = [line if line is not None else read.get(session_id) for session_id, line in taken]
            data = _files.compress(
                b"".join(x for x in lines if x is not None), _files.compression_of(current.name)
            )
            try:
                current.size = await asyncio.to_thread(_files.append_at, current.tmp, current.size, data)
            except OSError as err:
                raise JsonlWriteError(f"cannot append to {current.tmp}: {err}") from err
        except BaseException:
            current.pending[:0] = taken  # appended again by the retry (cut back to the fsynced size first)
            raise
        if len(read) != len(missing):
            # Cannot happen (assigned rows are never deleted by the ingestor); if it does, do not trust
            # the tmp: the roll regenerates the file from Postgres instead.
            _log.error("jsonl.missing_lines", file=current.name, expected=len(missing), got=len(read))
            current.trusted = False
        current.unstreamed.extend(x for x in lines if x is not None)

    def roll_due(self) -> bool:
        current = self._current
        if current is None or current.first_assigned is None:
            return False
        return _files.should_roll(
            size=current.size,
            age_s=self._clock() - current.first_assigned,
            max_bytes=self._settings.jsonl_max_bytes,
            max_age_s=self._settings.jsonl_max_age_s,
            sessions=current.assigned,
        )

    async def roll(self) -> None:
        """Finalize the open file (if it holds sessions); the next batch starts a new one."""
        current = self._current
        if current is None:
            return
        if not current.assigned:
            self._current = None
            return
        await self.flush()
        async with self._store.transaction() as conn:
            row = await conn.fetchrow(_sql.FILE_LOCK, current.name)
            if row is not None and row["state"] == "open":
                trusted = current.trusted
                if row["sessions"] != current.assigned:
                    # A batch whose COMMIT went through but whose reply was lost (a pooler or proxy
                    # cutting the connection) assigned sessions this writer never appended: the row
                    # counts every committed assignment, the tmp only those it knew of. Postgres holds
                    # the whole set: regenerate from it.
                    _log.warning(
                        "jsonl.tmp_behind_postgres",
                        file=current.name,
                        committed=row["sessions"],
                        appended=current.assigned,
                    )
                    trusted = False
                how = await finalize_locked(
                    conn, self._dir, current.name, current.tmp if trusted else None, self._stream
                )
                _log.info("jsonl.finalized", file=current.name, sessions=row["sessions"], how=how)
            else:
                try:
                    await asyncio.to_thread(current.tmp.unlink, missing_ok=True)
                except OSError as err:
                    raise JsonlWriteError(f"cannot delete {current.tmp}: {err}") from err
                _log.info("jsonl.already_final", file=current.name)
        self._current = None
