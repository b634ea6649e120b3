"""Adapters the pipeline tests configure workers with (loaded by import string in worker processes)."""

from __future__ import annotations

import asyncio
from typing import Any


class AlwaysFails:
    """A stateful adapter whose execute steps always raise: exercises retry and dead-letter paths."""

    def on_step(self, metadata: dict[str, Any]) -> Any:
        if metadata.get("phase") == "execute":
            raise RuntimeError("the agent endpoint is broken")
        if metadata.get("phase") == "plan":
            return {"steps": [{"id": 1, "description": "do it", "depends_on": []}]}
        return "done"


class Slow:
    """Each call sleeps 0.3 s: sessions are in flight long enough to signal or kill a worker mid-run."""

    async def on_step(self, metadata: dict[str, Any]) -> Any:
        await asyncio.sleep(0.3)
        if metadata.get("phase") == "plan":
            return {"steps": [{"id": 1, "description": "a", "depends_on": []}, {"id": 2, "description": "b"}]}
        return f"ok {metadata.get('phase')}"
