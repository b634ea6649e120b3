"""Cost per task: CPU time of each part of the stack over a window, from ``/proc/<pid>/stat``.

A :class:`CpuSample` reads utime + stime of the worker and the ingestor (by pid), of every ``beam.smp``
process (RabbitMQ) and of every process named ``postgres`` (the postmaster, its backends and auxiliary
processes; for these it adds cutime + cstime too, the time of children already reaped, so a backend that
exits inside the window still counts). Two samples around a window and the tasks done in it give CPU
milliseconds per task for each part. RabbitMQ and PostgreSQL are read server-wide: any other client's
work on the same servers counts too (a full run wants a quiet machine).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench._report import Result

PARTS: Final = ("worker", "ingestor", "rabbitmq", "postgres")
_LABELS: Final = {
    "worker": "atlas worker (python -m worker)",
    "ingestor": "atlas ingestor (python -m ingestor run)",
    "rabbitmq": "RabbitMQ (beam.smp)",
    "postgres": "PostgreSQL (all postgres processes)",
}


def cpu_name(part: str, what: str) -> str:
    """The row of one part, e.g. ``cpu_name("worker", "open loop")``."""
    return f"CPU per task, {what}: {_LABELS[part]}"


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float:
    """utime + stime of ``pid`` in seconds (plus cutime + cstime with ``reaped_children``)."""
    # Fields after the command name, which is in parentheses and may itself hold spaces or ")".
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])  # fields 14-17 of proc(5)
    ticks = utime + stime + (cutime + cstime if reaped_children else 0)
    return ticks / _clock_ticks()


def pids_named(comm: str) -> list[int]:
    """Every visible process whose ``/proc/<pid>/comm`` is ``comm``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):  # gone since the listing, or not ours to read
            if (entry / "comm").read_text().strip() == comm:
                pids.append(int(entry.name))
    return pids


def _sum_cpu(pids: list[int], *, reaped_children: bool = False) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):  # a backend may exit between the listing and the read
            total += cpu_seconds(pid, reaped_children=reaped_children)
    return total


@dataclass(frozen=True, slots=True)
class CpuSample:
    at: float
    """``time.time()`` when it was read."""
    seconds: Mapping[str, float]
    """Part (:data:`PARTS`) -> CPU seconds so far; a part with no visible process is left out."""
    processes: Mapping[str, int]
    """Part -> how many processes were read."""

    @classmethod
    def read(cls, *, worker_pid: int, ingestor_pid: int) -> CpuSample:
        by_part = {
            "worker": [worker_pid],
            "ingestor": [ingestor_pid],
            "rabbitmq": pids_named("beam.smp"),
            "postgres": pids_named("postgres"),
        }
        seconds = {
            part: _sum_cpu(pids, reaped_children=part == "postgres") for part, pids in by_part.items() if pids
        }
        return cls(time.time(), seconds, {part: len(pids) for part, pids in by_part.items()})


def cost_rows(start: CpuSample, end: CpuSample, tasks: int, *, what: str, window: str) -> list[Result]:
    """One ``CPU ms/task`` row per part seen in both samples: CPU time over the window / ``tasks``."""
    if tasks <= 0:
        raise RuntimeError(f"CPU per task ({what}): no task done in the window")
    wall = end.at - start.at
    rows = []
    for part in PARTS:
        if part not in start.seconds or part not in end.seconds:
            continue  # not visible from here (a remote server): no row rather than a wrong one
        used = end.seconds[part] - start.seconds[part]
        rows.append(
            Result(
                cpu_name(part, what),
                "CPU ms/task",
                used * 1000 / tasks,
                notes=(
                    f"{used:.2f} CPU s ({end.processes[part]} process(es)) over {window} of {wall:.1f}s "
                    f"= {100 * used / wall:.0f}% of one core; {tasks:,} tasks stored in it"
                ),
            )
        )
    return rows
