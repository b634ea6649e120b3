"""Bulk CPU work in turns of the event loop, so the batch transactions are never kept waiting behind it.

A batch transaction holds its tasks' locks while it waits on PostgreSQL statement by statement, and the
next batch waits on those locks: every moment its next statement waits for the event loop is a moment the
whole chain of batches waits. Building a batch's rows (~10 ms for 2,500 records) or its lines (~20 ms) in
one go is such a moment; built a slice per turn, a ready transaction gets the loop between two slices.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


async def in_turns(items: Sequence[T], build: Callable[[T], R], per_turn: int) -> list[R]:
    """``[build(x) for x in items]``, ``per_turn`` items at a time, giving the loop a turn between."""
    if len(items) <= per_turn:
        return [build(x) for x in items]
    out: list[R] = []
    for start in range(0, len(items), per_turn):
        if start:
            await asyncio.sleep(0)
        out.extend([build(x) for x in items[start : start + per_turn]])
    return out
