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

GC_THRESHOLDS: Final = (200_000, 20, 100)
"""The collector's thresholds while a service runs (CPython's default is (700, 10, 10)).

A service allocates a few hundred short-lived containers per message (decoded JSON, models, rows) and
frees them by reference counting: they hold no cycles. A young collection runs when the number of live
containers has grown by the first threshold since the last one, and it walks every young container still
alive: whatever is in flight (prefetched deliveries, the batches being written). At the default a young
collection ran every few messages; at (50,000, 50, 100) the ingestor's in-flight set still grew and shrank
by more than that with every batch of 2,500 records (~90,000 containers), so ~40 young collections of
~19 ms each walked it: 0.77 s of GC in 11.8 s, ~8 % of its CPU on 200,000 records. At 200,000 that rhythm
is gone (0.04 s of GC in all; 48 -> 45 us of ingestor CPU per record, 17,000 -> 18,000 records/s), and the
worker's task leg is unchanged within noise (2,387 -> 2,450 tasks/s, same conditions). A young collection
still walks at most what grew since the last one (~75 ms at 200,000 here). Cycles (exception
tracebacks, closed connections) are still collected, only less often."""


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
