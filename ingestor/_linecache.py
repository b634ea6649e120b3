"""JSONL lines from memory: the step rows this ingestor wrote, kept until their session completes.

A session's records usually span batches (its steps are stored as they come, its close later), so the line
of a session a batch completes needs rows written before. Reading them back from Postgres after every
commit was a tenth of the ingestor's time and the largest read the database served; this cache keeps the
step rows this process inserted (and committed) until the session's line is built, within a memory bound.

A line is built here only when everything it holds is known to be what Postgres holds: the session row
and plan the completing transaction wrote or got back as it assigned the session (a session completed by a
late opened or by late steps), and exactly ``steps_expected`` step rows, each inserted by this process (a
duplicate that another process stored first is never taken for the stored one). Anything else (a cache
entry evicted, steps another ingestor stored) is ``None``: its line is read from Postgres, as recovery and
``export`` always do. The two agree
byte for byte except where jsonb normalises a number: ``-0.0`` is stored as ``0``, and a float written with
an exponent (``1e+16``) comes back as the integer it equals.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from ingestor._lines import build_line
from ingestor._rows import StepRow
from ingestor._turns import in_turns
from ingestor._write import Written

Assigned = tuple[int, bytes | None]
"""A session assigned to a file and its line (None: to be read from Postgres)."""

_LINES_PER_TURN: Final = 32
"""Lines built per turn of the event loop (~1.5 ms of work for demo-sized sessions)."""

_ROW_OVERHEAD_BYTES: Final = 600
"""What a cached step row costs besides its trace and output (dicts, metadata, usage, a few events)."""


def _line(known: tuple[dict[str, Any], list[StepRow]]) -> bytes:
    return build_line(*known)


def _size(rows: Iterable[StepRow]) -> int:
    return sum(len(r["trace"]) + len(r["output"] or "") + _ROW_OVERHEAD_BYTES for r in rows)


class LineCache:
    """Step rows by session id, oldest session evicted first past ``max_bytes`` (0 keeps nothing)."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._steps: dict[int, list[StepRow]] = {}
        self._sizes: dict[int, int] = {}
        self._bytes = 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._steps)

    async def committed(self, written: Written) -> list[Assigned]:
        """After a batch committed: keep its new step rows, and build the lines of the sessions it
        assigned that memory holds entirely. The cache is updated at once; the lines are built in turns of
        the event loop (``_turns``), so the other batches' transactions are not kept waiting."""
        assigned = set(written.assigned)
        for session_id, rows in written.steps.items():
            if session_id not in assigned:
                self._add(session_id, rows)
        known: list[tuple[dict[str, Any], list[StepRow]]] = []
        has_line: list[bool] = []
        for session_id in written.assigned:
            steps = self._pop(session_id) + written.steps.get(session_id, [])
            session = written.rows.get(session_id)
            if session is None or len({s["step_id"] for s in steps}) != written.steps_expected[session_id]:
                has_line.append(False)
                continue
            known.append((session, steps))
            has_line.append(True)
        self._evict()
        lines = iter(await in_turns(known, _line, _LINES_PER_TURN))
        return [
            (session_id, next(lines) if whole else None)
            for session_id, whole in zip(written.assigned, has_line, strict=True)
        ]

    def _add(self, session_id: int, rows: list[StepRow]) -> None:
        if self._max_bytes <= 0:
            return
        added = _size(rows)
        held = self._steps.pop(session_id, None)  # popped and put back: the session becomes the newest
        if held is not None:
            rows = held + rows
            added_total = self._sizes[session_id] + added
        else:
            added_total = added
        self._steps[session_id] = rows
        self._sizes[session_id] = added_total
        self._bytes += added

    def _pop(self, session_id: int) -> list[StepRow]:
        rows = self._steps.pop(session_id, None)
        if rows is None:
            return []
        self._bytes -= self._sizes.pop(session_id)
        return rows

    def _evict(self) -> None:
        while self._bytes > self._max_bytes and self._steps:
            oldest = next(iter(self._steps))
            self._pop(oldest)
