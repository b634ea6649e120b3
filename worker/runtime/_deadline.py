"""A deadline carried by a future instead of by the tasks awaiting it.

An ``asyncio.timeout`` scope around each wait costs a timeout object, ``current_task`` and a timer per
task; the ledger's calls and the telemetry confirms were four of them per task. A timer on the future
itself is one ``call_later``, cancelled as soon as the future is settled, and every task awaiting the
future sees the same deadline.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any


def fail_after(future: asyncio.Future[Any], timeout_s: float, error: type[Exception], text: str) -> None:
    """Fail ``future`` with ``error(text)`` if nothing settled it within ``timeout_s``."""
    timer = asyncio.get_running_loop().call_later(timeout_s, _expire, future, error, text)
    future.add_done_callback(functools.partial(_cancel, timer))


def _expire(future: asyncio.Future[Any], error: type[Exception], text: str) -> None:
    if not future.done():
        future.set_exception(error(text))
        future.exception()  # retrieved here: a caller that stopped waiting must not have it logged


def _cancel(timer: asyncio.TimerHandle, _future: asyncio.Future[Any]) -> None:
    timer.cancel()
