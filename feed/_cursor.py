"""Durable cursors: where a named consumer of the feed stopped, kept on its own disk.

RabbitMQ tracks stream offsets on the server only for its stream protocol, not for AMQP 0-9-1 consumers,
so a follower keeps its own cursor, which also lets it work against any broker it can read from.

- :class:`StreamCursor` is an append-only log, one ``<offset>\\t<index>\\t<adapter_session_id>\\n`` line
  per session the consumer finished (a stream message holds a batch of sessions; ``index`` is the line in
  it), written before the next one is handed out, so a killed follower resumes after the last session it
  finished: no gap, no repeat. The log's tail also rebuilds the set of recently
  seen session ids that hides the stream's duplicates across restarts. It is compacted to its last
  ``window`` lines (written aside, fsynced, renamed) when it grows past twice that.
- :class:`FileCursor` is one small JSON document (file name, line, the files read to the end), replaced
  atomically (written aside, renamed) after each line, and fsynced when a file is finished.

Neither is fsynced per session: a killed follower loses nothing (the kernel has the writes); a power cut
may replay the last few sessions.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import orjson

CONSUMER_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
"""Consumer names become file names: no separators, no ``..``."""
_CONSUMER = re.compile(CONSUMER_PATTERN)


def cursor_path(directory: Path, consumer: str, suffix: str) -> Path:
    """The cursor file of ``consumer`` inside ``directory`` (ValueError for a name that could escape it)."""
    if not _CONSUMER.match(consumer) or ".." in consumer:
        raise ValueError(f"consumer name {consumer!r} must match {CONSUMER_PATTERN} without '..'")
    return directory / f"{consumer}.{suffix}"


def _replace(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write aside and rename: a reader (or a restart after a kill) sees the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as out:
        out.write(data)
        out.flush()
        if fsync:
            os.fsync(out.fileno())
    tmp.replace(path)


class StreamCursor:
    """The offset after which a consumer resumes, and the session ids it saw most recently."""

    def __init__(self, path: Path | None, *, window: int) -> None:
        self._path = path
        self._window = window
        self._recent: deque[tuple[int, int, str]] = deque()
        self._seen: dict[str, int] = {}
        """id -> how many times it is in ``_recent`` (a duplicate is logged too, to move the offset)."""
        self.offset: int | None = None
        """The stream offset of the last session finished, None when the consumer never finished one."""
        self.index = -1
        """Its line in that message."""
        self._lines = 0
        self._fd: int | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._load(path)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _load(self, path: Path) -> None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            # A torn last line (the follower was killed mid-write): it never counted. Cut it off, or the
            # next append would be glued to it.
            with path.open("r+b") as out:
                out.truncate(len(complete))
        for raw in complete.splitlines():
            offset, _, rest = raw.decode("utf-8", "replace").partition("\t")
            index, _, asid = rest.partition("\t")
            if not (offset.isdigit() and index.isdigit()):
                continue
            self.offset, self.index = int(offset), int(index)
            self._lines += 1
            self._remember(self.offset, self.index, asid)

    def _remember(self, offset: int, index: int, asid: str) -> None:
        self._recent.append((offset, index, asid))
        self._seen[asid] = self._seen.get(asid, 0) + 1
        while len(self._recent) > self._window:
            _, _, old = self._recent.popleft()
            left = self._seen[old] - 1
            if left:
                self._seen[old] = left
            else:
                del self._seen[old]

    def seen(self, asid: str) -> bool:
        return asid in self._seen

    def passed(self, offset: int, index: int) -> bool:
        """Whether the session at (``offset``, ``index``) is at or before the last one finished."""
        return self.offset is not None and (offset, index) <= (self.offset, self.index)

    def done(self, offset: int, index: int, asid: str) -> None:
        """The consumer finished line ``index`` of the message at ``offset`` (a session or a duplicate it
        skipped)."""
        self.offset, self.index = offset, index
        self._remember(offset, index, asid)
        if self._fd is None:
            return
        os.write(self._fd, f"{offset}\t{index}\t{asid}\n".encode())
        self._lines += 1
        if self._lines > 2 * self._window and self._path is not None:
            self._compact(self._path, self._fd)

    def _compact(self, path: Path, fd: int) -> None:
        lines = [f"{offset}\t{index}\t{asid}\n" for offset, index, asid in self._recent]
        os.close(fd)
        _replace(path, "".join(lines).encode())
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._lines = len(lines)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass(slots=True)
class FileCursor:
    """A consumer's place in a directory of finalised JSONL files."""

    path: Path | None
    file: str | None = None
    """The file being read (None: none started)."""
    line: int = 0
    """Lines of ``file`` finished."""
    finished: set[str] = field(default_factory=set)
    """Files read to the end. A set, not a position: files are named by their creation time but become
    final in any order (several ingestors, a recoverer), so an older name can appear later."""

    @classmethod
    def load(cls, path: Path | None) -> FileCursor:
        if path is None:
            return cls(None)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return cls(path)
        return cls(path, data.get("file"), int(data.get("line", 0)), set(data.get("finished", [])))

    def save(self, *, fsync: bool = False) -> None:
        """Replace the cursor file (a process kill never loses it; ``fsync`` also survives a power cut)."""
        if self.path is None:
            return
        body = {"file": self.file, "line": self.line, "finished": sorted(self.finished)}
        _replace(self.path, orjson.dumps(body), fsync=fsync)
