"""atlas_common.run: the services' event loop and the collector settings it runs them with."""

from __future__ import annotations

import asyncio
import gc

import pytest

from atlas_common import run
from atlas_common._loop import GC_THRESHOLDS, service_gc


def test_run_tunes_the_collector_while_the_service_runs_and_restores_it() -> None:
    """Inside run() the thresholds are the service ones, start-up objects are frozen and collection stays on;
    after it, the process's collector is as it was."""
    before = gc.get_threshold()

    async def inside() -> tuple[tuple[int, int, int], int, bool]:
        await asyncio.sleep(0)
        return gc.get_threshold(), gc.get_freeze_count(), gc.isenabled()

    thresholds, frozen, enabled = run(inside())
    assert thresholds == GC_THRESHOLDS
    assert frozen > 1000  # the interpreter, pytest and the imported modules
    assert enabled
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_service_gc_restores_the_collector_when_the_body_raises() -> None:
    """An error escaping the service still leaves the collector as it was."""
    before = gc.get_threshold()

    def fail_inside() -> None:
        with service_gc((1234, 5, 6)):
            assert gc.get_threshold() == (1234, 5, 6)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
