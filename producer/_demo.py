"""Generated demo tasks for ``python -m producer demo`` and the main job."""

from __future__ import annotations

from collections.abc import Iterator

from schemas import TaskMessage

_TOPICS = (
    "stateful adapter sessions",
    "continual learning from agent traces",
    "reward models for tool use",
    "GRPO on multi-step plans",
    "queue-based agent orchestration",
    "telemetry for LLM agents",
)


def demo_tasks(count: int, *, run_id: str, adapter: str | None = None) -> Iterator[TaskMessage]:
    """``count`` distinct tasks with ids ``demo-<run_id>-<n>`` (re-running the same run_id is idempotent)."""
    for n in range(count):
        topic = _TOPICS[n % len(_TOPICS)]
        yield TaskMessage(
            task_id=f"demo-{run_id}-{n:07d}",
            task=f"Research {topic}, compare two approaches and recommend one (case {n}).",
            adapter=adapter,
            metadata={"source": "demo", "run_id": run_id, "n": n},
        )
