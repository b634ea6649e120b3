"""Helpers the main job and the benchmarks share."""

from __future__ import annotations

import contextlib
import gzip
import math
from pathlib import Path

from atlas_common import BROKER_ERRORS, Topology, connect_any


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def jsonl_stats(directory: Path) -> tuple[int, int]:
    """(finalised files, lines) under ``directory``; hidden temp files are not finalised."""
    files = lines = 0
    if not directory.exists():
        return 0, 0
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        files += 1
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                lines += sum(1 for _ in handle)
        elif path.suffix == ".zst":
            import zstandard

            with path.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as handle:
                lines += handle.read().count(b"\n")
        else:
            with path.open("rb") as handle:
                lines += sum(1 for _ in handle)
    return files, lines


async def delete_topology(amqp_url: str, topology: Topology) -> None:
    """Remove a run's queues and exchanges (runs use a prefix of their own); ``amqp_url`` may list a
    cluster's nodes."""
    with contextlib.suppress(*BROKER_ERRORS):
        connection = await connect_any(amqp_url, timeout_s=5, name="atlas-bench")
        async with connection:
            await topology.delete(connection)
