"""Turning JSONL lines into tasks (no network here, so it is tested without services).

A line without ``task_id`` gets one derived from its content (``sha256`` of the canonical task), so
submitting the same file twice names the same tasks, and the worker's task ledger runs each once.
Give explicit ``task_id`` values to run identical tasks separately.

Lines are read with a bound (:func:`read_lines`): a line longer than the task size limit is never held
whole, whatever its length; it is skipped in chunks and reported by its number.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Final

import orjson

from producer._errors import InvalidTaskLine
from schemas import DecodeError, TaskMessage, decode_task, encode
from schemas.limits import MAX_TASK_BYTES

READ_CHUNK_BYTES: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class OversizedLine:
    """A line longer than the limit, read past but not kept: only its length is known."""

    size: int
    """Bytes of the line, its newline not counted."""


def read_lines(
    stream: BinaryIO, *, max_bytes: int = MAX_TASK_BYTES, chunk_bytes: int = READ_CHUNK_BYTES
) -> Iterator[bytes | OversizedLine]:
    """Each line of ``stream`` (newline kept), or an :class:`OversizedLine` for one longer than ``max_bytes``.

    At most ``max_bytes + 1`` bytes of a line are held: ``readline`` with a size stops there, and the rest
    of a longer line is read and dropped ``chunk_bytes`` at a time."""
    while line := stream.readline(max_bytes + 1):
        if line.endswith(b"\n") or len(line) <= max_bytes:
            yield line
        else:
            yield OversizedLine(len(line) + _skip_rest_of_line(stream, chunk_bytes))


def _skip_rest_of_line(stream: BinaryIO, chunk_bytes: int) -> int:
    """Read up to and including the next newline; the bytes skipped, the newline not counted."""
    skipped = 0
    while chunk := stream.readline(chunk_bytes):
        if chunk.endswith(b"\n"):
            return skipped + len(chunk) - 1
        skipped += len(chunk)
    return skipped


def content_task_id(fields: dict[str, object]) -> str:
    """A stable id for a task given without one: same content, same id."""
    canonical = {k: fields.get(k) for k in ("task", "execution_mode", "adapter", "metadata")}
    digest = hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"t-{digest[:32]}"


def parse_line(raw: bytes | OversizedLine, line_no: int, *, max_bytes: int = MAX_TASK_BYTES) -> TaskMessage:
    """One JSONL line -> a task, or :class:`InvalidTaskLine` naming the line and what is wrong.

    The task is checked as it will travel too: its encoded message (with the fields the producer fills
    in) must fit ``max_bytes``, or every worker would refuse it."""
    if isinstance(raw, OversizedLine):
        raise InvalidTaskLine(line_no, f"too_large: line is {raw.size} bytes; the limit is {max_bytes}")
    try:
        task = decode_task(raw, max_bytes=max_bytes)
    except DecodeError as exc:
        raise InvalidTaskLine(line_no, str(exc)) from None
    if "task_id" not in task.model_fields_set:
        task = task.model_copy(update={"task_id": content_task_id(task.model_dump(mode="json"))})
    encoded = len(encode(task))
    if encoded > max_bytes:
        detail = f"too_large: the encoded task is {encoded} bytes; the limit is {max_bytes}"
        raise InvalidTaskLine(line_no, detail)
    return task


@dataclass(frozen=True, slots=True)
class ParsedLines:
    tasks: list[TaskMessage]
    rejects: list[InvalidTaskLine]
    duplicates: int
    """Lines whose task_id repeats an earlier line's: submitted once."""


def parse_lines(lines: Iterable[bytes | OversizedLine], *, max_bytes: int = MAX_TASK_BYTES) -> ParsedLines:
    """Every non-blank line parsed; bad lines collected (never dropped silently), repeats folded."""
    tasks: list[TaskMessage] = []
    rejects: list[InvalidTaskLine] = []
    seen: set[str] = set()
    duplicates = 0
    for line_no, raw in _numbered(lines):
        try:
            task = parse_line(raw, line_no, max_bytes=max_bytes)
        except InvalidTaskLine as exc:
            rejects.append(exc)
            continue
        if task.task_id in seen:
            duplicates += 1
            continue
        seen.add(task.task_id)
        tasks.append(task)
    return ParsedLines(tasks, rejects, duplicates)


def _numbered(lines: Iterable[bytes | OversizedLine]) -> Iterator[tuple[int, bytes | OversizedLine]]:
    for line_no, line in enumerate(lines, start=1):
        if isinstance(line, OversizedLine):
            yield line_no, line
        elif stripped := line.strip():
            yield line_no, stripped
