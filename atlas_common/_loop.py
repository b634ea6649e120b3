"""The event loop every service runs on: uvloop when installed (``pip install 'atlas-pipeline[fast]'``), the
standard one otherwise, with the garbage collector tuned for a message service. The services are CPU-bound
Python; uvloop takes a good share of the per-message overhead (callbacks, transports, futures) off the
standard loop, and the collector's default rhythm was a third of the ingestor's CPU."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Final, TypeVar

T = TypeVar("T")

GC_THRESHOLDS: Final = (50_000, 50, 100)
"""The collector's thresholds while a service runs (CPython's default is (700, 10, 10)).

A service allocates a few hundred short-lived containers per message (decoded JSON, models, rows) and
frees them by reference counting: they hold no cycles. At the default, a young collection ran every few
messages and every tenth walked the older generation too, which holds whatever is in flight (prefetched
deliveries, the open batch): measured on 100,000 telemetry records, the ingestor spent 8.8 s of CPU at the
default and 5.7 s at these thresholds (and the worker's task leg went from ~1,580 to ~1,840 tasks/s).
Cycles (exception tracebacks, closed connections) are still collected, a few times less often."""


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None (the standard loop) when uvloop is not installed."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


@contextlib.contextmanager
def service_gc(thresholds: tuple[int, int, int] = GC_THRESHOLDS) -> Iterator[None]:
    """The collector tuned for a service while inside, as it was after.

    What is alive on entry (modules, classes, settings: the process's start-up) is frozen, moved where no
    collection walks it again; it lives as long as the process anyway."""
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the fastest loop available, with the collector tuned (:func:`service_gc`)."""
    with service_gc(), asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
