"""Worked example: the live training feed turned into GRPO groups and reward-model pairs.

    python -m examples.grpo_feed --out var/training [--group-size 4] [--from first] [--consumer grpo-example]

It follows complete sessions (``feed.follow_sessions``), groups the sessions of the same task (the same
prompt: the retries of one task, or one task submitted several times to sample several trajectories) and
writes, as they complete:

- ``grpo_groups.jsonl``: one line per group of ``--group-size`` sessions, with what a GRPO trainer needs:
  the prompt, and per sample the completion (the final answer), the trajectory (each step's description,
  tool, tool parameters and output) and a reward slot (the session's reward when a judge set one, else
  null: GRPO computes advantages within the group from these);
- ``rm_pairs.jsonl``: reward-model preference pairs within a group: a succeeded session as ``chosen``
  against a failed one as ``rejected`` (or, when both have rewards, the higher against the lower).

Resumable: with ``--consumer`` a restart continues after the last session it handled. Groups still open
at a clean stop are written with what they have when they hold two or more sessions; a kill loses the
open groups' samples for grouping (replay with ``--from`` to rebuild them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from feed import FeedSettings, Start, follow_sessions


def sample(record: dict[str, Any]) -> dict[str, Any]:
    """One session as a GRPO sample."""
    meta = record.get("session_metadata") or {}
    return {
        "adapter_session_id": record.get("adapter_session_id"),
        "task_id": meta.get("task_id"),
        "attempt": record.get("attempt", meta.get("attempt")),
        "status": meta.get("status"),
        "completion": record.get("final_answer") or "",
        "trajectory": [
            {
                "step_id": step.get("step_id"),
                "description": step.get("description"),
                "tool": step.get("tool"),
                "tool_params": step.get("tool_params"),
                "output": step.get("output"),
            }
            for step in record.get("steps") or []
        ],
        "reward": record.get("reward", meta.get("reward")),
    }


def preference_pairs(prompt: str, samples: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chosen/rejected pairs within one group: by reward when both have one, else succeeded > failed."""
    pairs = []
    for a, b in itertools.combinations(samples, 2):
        if a["reward"] is not None and b["reward"] is not None and a["reward"] != b["reward"]:
            chosen, rejected = (a, b) if a["reward"] > b["reward"] else (b, a)
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "by": "reward"})
            continue
        statuses = {a["status"], b["status"]}
        if statuses == {"succeeded", "failed"}:
            chosen, rejected = (a, b) if a["status"] == "succeeded" else (b, a)
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "by": "status"})
    return pairs


@dataclass
class Grouper:
    """Sessions grouped by prompt; a group is emitted once it holds ``group_size`` sessions."""

    group_size: int
    open_groups: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def add(self, record: dict[str, Any]) -> dict[str, Any] | None:
        prompt = str(record.get("task") or "")
        samples = self.open_groups.setdefault(prompt, [])
        samples.append(sample(record))
        if len(samples) < self.group_size:
            return None
        del self.open_groups[prompt]
        return {"prompt": prompt, "samples": samples, "rewards": [s["reward"] for s in samples]}

    def rest(self) -> list[dict[str, Any]]:
        """Groups still open with two or more sessions (at a stop)."""
        out = [
            {"prompt": p, "samples": s, "rewards": [x["reward"] for x in s]}
            for p, s in self.open_groups.items()
            if len(s) >= 2
        ]
        self.open_groups.clear()
        return out


async def run(
    out_dir: Path,
    *,
    group_size: int = 4,
    start: Start = "first",
    consumer: str | None = None,
    settings: FeedSettings | None = None,
    idle_exit_s: float | None = None,
) -> tuple[int, int, int]:
    """Follow the feed and write groups and pairs; returns (sessions, groups, pairs) written."""
    out_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 -- once, at start
    grouper = Grouper(group_size)
    sessions = groups = pairs = 0
    with (
        (out_dir / "grpo_groups.jsonl").open("ab") as g_out,
        (out_dir / "rm_pairs.jsonl").open("ab") as p_out,
    ):

        def emit(group: dict[str, Any]) -> None:
            nonlocal groups, pairs
            g_out.write(orjson.dumps(group) + b"\n")
            found = preference_pairs(group["prompt"], group["samples"])
            p_out.writelines(orjson.dumps(p) + b"\n" for p in found)
            g_out.flush()
            p_out.flush()
            groups += 1
            pairs += len(found)

        async with follow_sessions(settings, start=start, consumer=consumer) as feed:
            iterator = aiter(feed)
            with contextlib.suppress(TimeoutError, StopAsyncIteration):
                while True:
                    session = await asyncio.wait_for(anext(iterator), idle_exit_s)
                    if session.omitted_bytes is not None:
                        continue  # too large for the stream: read it from session.jsonl_file if needed
                    sessions += 1
                    group = grouper.add(session.record())
                    if group is not None:
                        emit(group)
        for group in grouper.rest():
            emit(group)
    return sessions, groups, pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.grpo_feed", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("var/training"))
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--from", dest="start", default="first", help="first, last, next or an offset")
    parser.add_argument("--consumer", default=None)
    parser.add_argument("--idle-exit-s", type=float, default=None, help="stop after this long with none")
    args = parser.parse_args(argv)
    start: Start = int(args.start) if args.start.isdigit() else args.start
    sessions, groups, pairs = asyncio.run(
        run(
            args.out,
            group_size=args.group_size,
            start=start,
            consumer=args.consumer,
            idle_exit_s=args.idle_exit_s,
        )
    )
    sys.stderr.write(
        f"{sessions} sessions -> {groups} GRPO groups, {pairs} reward-model pairs in {args.out}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
