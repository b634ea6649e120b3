"""Adapters the pipeline tests configure workers with (loaded by import string in worker processes)."""

from __future__ import annotations

import asyncio
import json
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


def _plan(metadata: dict[str, Any]) -> Any:
    return {"steps": [{"id": 1, "description": "the one step", "depends_on": []}]}


class HugeOutput:
    """Its execute step returns 1.5 MB of text: more than one telemetry message may carry."""

    def on_step(self, metadata: dict[str, Any]) -> Any:
        if metadata.get("phase") == "plan":
            return _plan(metadata)
        if metadata.get("phase") == "execute":
            return "x" * 1_500_000
        return "summary"


class ManyEvents:
    """Its execute step reports 500 events of 1 KB each (the session aggregate keeps the newest 50)."""

    def on_step(self, metadata: dict[str, Any]) -> Any:
        if metadata.get("phase") == "plan":
            return _plan(metadata)
        if metadata.get("phase") == "execute":
            return {
                "output": "done",
                "events": [{"type": "tick", "i": i, "pad": "p" * 1000} for i in range(500)],
            }
        return "summary"


class GiantUsage:
    """Reports 10**30 prompt tokens for its execute step: a count storage cannot hold."""

    def on_step(self, metadata: dict[str, Any]) -> Any:
        if metadata.get("phase") == "plan":
            return _plan(metadata)
        return {"output": "ok", "usage": {"prompt_tokens": 10**30, "completion_tokens": 1}}


def echo_spec(task: str) -> dict[str, Any]:
    """The spec at the head of an :class:`Echo` task: the JSON object the text starts with (parsed with the
    stdlib, so any depth); whatever text follows it is free text (NUL, lone surrogates, any size) that only
    reaches the prompts, hence the traces."""
    spec, _ = json.JSONDecoder().raw_decode(task)
    return dict(spec)


def echo_output(spec: dict[str, Any]) -> Any:
    """The output :class:`Echo` returns for ``spec`` (``pad_bytes`` wraps it beside that much padding)."""
    output = spec.get("output")
    pad = int(spec.get("pad_bytes", 0))
    return {"pad": "b" * pad, "v": output} if pad else output


def echo_answer(spec: dict[str, Any]) -> str:
    """The final answer :class:`Echo` returns for ``spec``: ``answer``, repeated to ``answer_chars``
    characters when that is given (answers past the task's own size limit)."""
    answer = str(spec.get("answer", ""))
    chars = spec.get("answer_chars")
    if chars is None or not answer:
        return answer
    return (answer * (int(chars) // len(answer) + 1))[: int(chars)]


class Echo:
    """Returns what the task asks for: the task text starts with JSON ``{"output": ..., "events": [...],
    "answer": ..., "answer_chars": n, "pad_bytes": n}`` (see :func:`echo_spec`); the property-based pipeline
    test drives it."""

    def on_step(self, metadata: dict[str, Any]) -> Any:
        spec = echo_spec(str(metadata.get("task")))
        if metadata.get("phase") == "plan":
            return _plan(metadata)
        if metadata.get("phase") == "execute":
            return {"output": echo_output(spec), "events": spec.get("events", [])}
        return echo_answer(spec)
