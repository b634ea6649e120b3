"""Following the directory of finalised JSONL files: :func:`follow_files`, for jobs that do not talk to
the broker.

Only final names are read (``sessions-<time>-<ingestor>-<n>.jsonl[.gz|.zst]``; an ingestor renames a file
to its final name atomically once it is complete, so a final file never changes), never a hidden
``.*.tmp``. Each session is in exactly one final file, once, so there is nothing to deduplicate. The
cursor (:class:`feed._cursor.FileCursor`) says which files were read to the end and how far into the
current one: a follower killed and started again resumes at the next line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from feed._cursor import FileCursor, cursor_path
from feed._handout import Handout
from feed._settings import FeedSettings
from ingestor import is_final_name, read_lines


@dataclass(frozen=True, slots=True)
class FileLine:
    """One session from a finalised file."""

    file: str
    line_no: int
    """0-based line of ``file``."""
    line: bytes
    """The JSONL line, without the newline."""

    def record(self) -> dict[str, Any]:
        parsed: dict[str, Any] = orjson.loads(self.line)
        return parsed


def _final_files(directory: Path) -> list[str]:
    try:
        with os.scandir(directory) as entries:
            return sorted(e.name for e in entries if e.is_file() and is_final_name(e.name))
    except FileNotFoundError:
        return []


class FileFollow(Handout[FileLine]):
    """``async with follow_files(dir, consumer="rm") as lines: async for line in lines: ...``; a line is
    finished (saved in the cursor) when the loop asks for the next one or the block ends without an
    exception, as with :class:`feed.SessionFollow`."""

    def __init__(
        self,
        directory: Path,
        settings: FeedSettings | None,
        consumer: str | None,
        live: bool,
        stop: asyncio.Event | None,
    ) -> None:
        self._dir = directory
        self._settings = settings or FeedSettings()
        self._path = (
            cursor_path(self._settings.cursor_dir, consumer, "file-cursor") if consumer is not None else None
        )
        self._live = live
        self._stop = stop or asyncio.Event()
        self._cursor = FileCursor(self._path)

    async def _open(self) -> None:
        self._cursor = await asyncio.to_thread(FileCursor.load, self._path)

    async def _finish(self, item: FileLine) -> None:
        self._cursor.file, self._cursor.line = item.file, item.line_no + 1
        await asyncio.to_thread(self._cursor.save)

    async def _items(self) -> AsyncGenerator[FileLine, None]:
        cursor, stop = self._cursor, self._stop
        while not stop.is_set():
            names = await asyncio.to_thread(_final_files, self._dir)
            present = set(names)
            cursor.finished &= present  # files removed by retention need not be remembered
            todo = [n for n in names if n not in cursor.finished]
            if cursor.file in todo:  # finish the file in progress first
                todo.remove(cursor.file)
                todo.insert(0, cursor.file)
            for name in todo:
                lines = await asyncio.to_thread(read_lines, self._dir / name)
                first = cursor.line if cursor.file == name else 0
                for number in range(first, len(lines)):
                    yield FileLine(name, number, lines[number])
                    if stop.is_set():
                        return
                cursor.finished.add(name)
                cursor.file, cursor.line = None, 0
                await asyncio.to_thread(lambda: cursor.save(fsync=True))
            if not self._live:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._settings.poll_interval_s)


def follow_files(
    directory: Path,
    *,
    consumer: str | None = None,
    settings: FeedSettings | None = None,
    live: bool = True,
    stop: asyncio.Event | None = None,
) -> FileFollow:
    """Every session line of the final files in ``directory``, oldest file name first, then new files as
    they become final (``live``; without it the loop ends once every final file is read). With a
    ``consumer`` name the place is saved in ``settings.cursor_dir`` and a later follow resumes there."""
    return FileFollow(directory, settings, consumer, live, stop)
