"""Turning JSONL lines into tasks (pure: no I/O here, so it is tested without services).

A line without ``task_id`` gets one derived from its content (``sha256`` of the canonical task), so
submitting the same file twice names the same tasks, and the worker's task ledger runs each once.
Give explicit ``task_id`` values to run identical tasks separately.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import orjson

from producer._errors import InvalidTaskLine
from schemas import DecodeError, TaskMessage, decode_task


def content_task_id(fields: dict[str, object]) -> str:
    """A stable id for a task given without one: same content, same id."""
    canonical = {k: fields.get(k) for k in ("task", "execution_mode", "adapter", "metadata")}
    digest = hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"t-{digest[:32]}"


def parse_line(raw: bytes, line_no: int, *, max_bytes: int) -> TaskMessage:
    """One JSONL line -> a task, or :class:`InvalidTaskLine` naming the line and what is wrong."""
    try:
        task = decode_task(raw, max_bytes=max_bytes)
    except DecodeError as exc:
        raise InvalidTaskLine(line_no, str(exc)) from None
    if "task_id" in orjson.loads(raw):
        return task
    derived = content_task_id(task.model_dump(mode="json"))
    return task.model_copy(update={"task_id": derived})


@dataclass(frozen=True, slots=True)
class ParsedLines:
    tasks: list[TaskMessage]
    rejects: list[InvalidTaskLine]
    duplicates: int
    """Lines whose task_id repeats an earlier line's: submitted once."""


def parse_lines(lines: Iterable[bytes], *, max_bytes: int) -> ParsedLines:
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


def _numbered(lines: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    for line_no, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped:
            yield line_no, stripped
