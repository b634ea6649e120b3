"""``DemoAdapter``: a deterministic, offline, cheap stateful adapter for demos, tests and benchmarks.

Everything it returns depends only on the task text and the session's own history (never on time,
ids or randomness): the plan has 2-4 steps chosen by a CRC32 of the task (or ``steps`` when given),
each execute step emits a ``tool_call`` and a ``tool_result`` event, usage is ``len(text) // 4 + 1``
tokens each way, and the session keeps a turn counter and a scratchpad of step notes that the
synthesis reports (proving that state lives across the steps of one session and only that session).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Mapping
from typing import Any, Final

from pydantic import JsonValue

from schemas import Usage
from worker.sessions import (
    AgentSession,
    BaseSession,
    SessionContext,
    StatefulAgentAdapterMixin,
    StepOutcome,
    new_session_id,
    to_text,
)

_ACTIONS: Final = ("Research", "Analyse", "Outline", "Draft", "Check", "Summarise", "Compare")
_TOOLS: Final = ("search", "calculator", "notes", "lookup")
_TOPIC_CHARS: Final = 60


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def _tokens(text: str) -> int:
    return len(text) // 4 + 1


class DemoFailureError(RuntimeError):
    """Raised by the demo adapter's execute step when the task contains ``fail_on``."""


class DemoAdapter(StatefulAgentAdapterMixin):
    """A built-in stateful adapter: no network, no keys, deterministic output.

    ``latency_s`` sleeps (``asyncio.sleep``) in every step; ``steps`` fixes the plan length (else 2-4
    from the task's hash); ``fail_on`` makes the execute step raise :class:`DemoFailureError` when that
    substring occurs in the task. Steps without a Student ``phase`` in their metadata are echoed.
    """

    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        steps: int | None = None,
        name: str = "demo",
        fail_on: str | None = None,
    ) -> None:
        if latency_s < 0:
            raise ValueError("latency_s must not be negative")
        if steps is not None and not 1 <= steps <= 32:
            raise ValueError("steps must be between 1 and 32")
        self.latency_s = latency_s
        self.steps = steps
        self.name = name
        self.fail_on = fail_on or None

    def plan_for(self, task: str) -> list[dict[str, JsonValue]]:
        """The plan this adapter proposes for ``task`` (deterministic)."""
        digest = _crc(task)
        count = self.steps if self.steps is not None else 2 + digest % 3
        topic = " ".join(task.split())[:_TOPIC_CHARS] or "the task"
        return [
            {
                "id": i,
                "description": f"{_ACTIONS[(digest >> (3 * i)) % len(_ACTIONS)]}: {topic} (part {i})",
                "depends_on": [i - 1] if i > 1 else [],
            }
            for i in range(1, count + 1)
        ]

    async def open_session(self, context: SessionContext) -> AgentSession:
        return _DemoSession(self, context)


class _DemoSession(BaseSession):
    def __init__(self, adapter: DemoAdapter, context: SessionContext) -> None:
        super().__init__(
            new_session_id(context),
            {"adapter": adapter.name, "demo": True, "task_id": context.task_id},
        )
        self._adapter = adapter
        self._context = context
        self.turns = 0
        self.scratchpad: list[str] = []

    def _task(self, payload_text: str, metadata: Mapping[str, Any]) -> str:
        task = metadata.get("task") or self._context.extra.get("task")
        return task if isinstance(task, str) and task else payload_text

    async def _step(self, payload: Any, metadata: dict[str, Any]) -> Any:
        if self._adapter.latency_s:
            await asyncio.sleep(self._adapter.latency_s)
        self.turns += 1
        text = to_text(payload)
        phase = metadata.get("phase")
        events: list[dict[str, JsonValue]] = []
        output: JsonValue
        if phase == "plan":
            output = {"steps": list(self._adapter.plan_for(self._task(text, metadata)))}
        elif phase == "execute":
            output, events = self._execute(self._task(text, metadata), metadata)
        elif phase == "synthesize":
            notes = "; ".join(self.scratchpad) or "no notes"
            output = (
                f"Answer to {self._task(text, metadata)!r}: {len(self.scratchpad)} steps in "
                f"{self.turns} turns. {notes}"
            )
        else:
            output = f"[turn {self.turns}] {text}"
        out_text = output if isinstance(output, str) else to_text(output)
        prompt_tokens, completion_tokens = _tokens(text), _tokens(out_text)
        # The counts are small non-negative ints by construction: no validation needed.
        usage = Usage.of(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens, 1)
        return StepOutcome(output=output, usage=usage, events=events)

    def _execute(self, task: str, metadata: Mapping[str, Any]) -> tuple[str, list[dict[str, JsonValue]]]:
        fail_on = self._adapter.fail_on
        if fail_on is not None and fail_on in task:
            raise DemoFailureError(f"demo adapter failure: the task contains {fail_on!r}")
        step_id = metadata.get("step_id", self.turns)
        description = str(metadata.get("description") or f"step {step_id}")
        tool = _TOOLS[_crc(description) % len(_TOOLS)]
        result = f"{tool} found {_crc(description) % 97} items"
        self.scratchpad.append(f"step {step_id}: {result}")
        events: list[dict[str, JsonValue]] = [
            {"type": "tool_call", "tool": tool, "arguments": {"query": description[:_TOPIC_CHARS]}},
            {"type": "tool_result", "tool": tool, "result": result},
        ]
        output = f"Step {step_id} via {tool}: {result} (turn {self.turns}, {len(self.scratchpad)} notes)"
        return output, events

    async def _close(self, reason: str | None) -> Mapping[str, Any]:  # noqa: ARG002 -- base records it
        return {"turns": self.turns, "notes": len(self.scratchpad)}
