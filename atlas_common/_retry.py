"""The one backoff every retry loop of every service uses: capped exponential delays with jitter."""

from __future__ import annotations

import random


class Backoff:
    """``delay = backoff.next()`` gives ``initial_s * 2**n`` (n = failures so far), capped at ``max_s``, with
    up to 20 % jitter taken off so that many processes retrying one server do not stay in step;
    ``reset()`` after a success. ``initial_s=0`` retries at once (a caller whose own setting allows 0)."""

    def __init__(self, *, initial_s: float = 0.2, max_s: float = 10.0) -> None:
        if initial_s < 0 or max_s < initial_s:
            raise ValueError("need 0 <= initial_s <= max_s")
        self._initial_s = initial_s
        self._max_s = max_s
        self.failures = 0

    def next(self) -> float:
        delay: float = min(self._initial_s * 2.0 ** min(self.failures, 30), self._max_s)
        self.failures += 1
        return delay * random.uniform(0.8, 1.0)  # noqa: S311 -- jitter, not security

    def reset(self) -> None:
        self.failures = 0
