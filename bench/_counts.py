"""How many no-op tasks a baseline's worker processes really ran (not just acked or rejected).

Each worker process counts its runs in memory and writes the count to ``$BENCH_COUNT_DIR/<pid>.count``
when it shuts down; :func:`total_runs` adds them up.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_lock = threading.Lock()  # Dramatiq runs tasks in threads; += on a global is not atomic
_runs = [0]


def count_run() -> None:
    with _lock:
        _runs[0] += 1


def write_count() -> None:
    directory = os.environ.get("BENCH_COUNT_DIR")
    if directory:
        Path(directory, f"{os.getpid()}.count").write_text(str(_runs[0]))


def total_runs(directory: Path) -> int:
    """The sum of the counts written under ``directory`` (0 when none were)."""
    return sum(int(path.read_text() or 0) for path in directory.glob("*.count"))
