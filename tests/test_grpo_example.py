"""The worked example: the live feed into GRPO groups and reward-model pairs, against the real stack."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from examples.grpo_feed import Grouper, preference_pairs, run, sample
from feed import FeedSettings
from tests._ingest_env import delete_topology, fresh_settings, running, wait_drained
from tests._ingest_gen import bodies, generate, publish


def _record(asid: str, task: str, status: str, reward: float | None = None) -> dict[str, object]:
    return {
        "adapter_session_id": asid,
        "task": task,
        "final_answer": f"answer {asid}",
        "steps": [{"step_id": 1, "description": "d", "tool": "sql", "tool_params": {"q": 1}, "output": "o"}],
        "session_metadata": {"status": status, "task_id": f"t-{asid}"},
        "reward": reward,
    }


def test_groups_by_prompt_and_pairs_by_status_or_reward() -> None:
    """A group is emitted at its size with a reward slot per sample; pairs prefer rewards, else status."""
    grouper = Grouper(group_size=2)
    assert grouper.add(_record("a", "p1", "succeeded")) is None
    assert grouper.add(_record("b", "p2", "failed")) is None
    group = grouper.add(_record("c", "p1", "failed"))
    assert group is not None
    assert [s["adapter_session_id"] for s in group["samples"]] == ["a", "c"]
    assert group["rewards"] == [None, None]
    assert group["samples"][0]["trajectory"][0]["tool"] == "sql"
    pairs = preference_pairs("p1", group["samples"])
    assert [
        (p["chosen"]["adapter_session_id"], p["rejected"]["adapter_session_id"], p["by"]) for p in pairs
    ] == [("a", "c", "status")]
    scored = [sample(_record("x", "p", "failed", 0.9)), sample(_record("y", "p", "succeeded", 0.1))]
    assert preference_pairs("p", scored)[0]["chosen"]["adapter_session_id"] == "x"
    assert grouper.rest() == []  # p2 has one session: nothing to compare


@pytest.mark.integration
@pytest.mark.timeout(180)
async def test_example_runs_live_off_the_feed(make_database, amqp_url: str, tmp_path: Path) -> None:
    """Sessions ingested by the real ingestor come out of the example as groups of the same prompt, every
    exported session in exactly one group, and pairs that put a succeeded session over a failed one."""
    settings = await fresh_settings(make_database, amqp_url, tmp_path / "jsonl")
    gen = generate(90, seed=41)
    prompts = [f"prompt {i}" for i in range(3)]
    for n, s in enumerate(gen.sessions):  # three prompts, so that groups form
        s.opened = s.opened.model_copy(update={"task": prompts[n % 3]})
    feed = FeedSettings(amqp_url=amqp_url, prefix=settings.prefix, cursor_dir=tmp_path / "cursors")
    try:
        async with running(settings):
            await publish(amqp_url, settings.topology(), bodies(gen.in_order()))
            await wait_drained(settings, gen)
        sessions, groups, pairs = await run(tmp_path / "out", group_size=5, settings=feed, idle_exit_s=3)
    finally:
        await delete_topology(amqp_url, settings.topology())
    assert sessions == len(gen.exported())
    written = [orjson.loads(x) for x in (tmp_path / "out" / "grpo_groups.jsonl").read_bytes().splitlines()]
    assert len(written) == groups
    in_groups = [s["adapter_session_id"] for g in written for s in g["samples"]]
    assert sorted(in_groups) == sorted(gen.exported())
    for group in written:
        assert group["prompt"] in prompts
        assert len(group["rewards"]) == len(group["samples"])
    found = [orjson.loads(x) for x in (tmp_path / "out" / "rm_pairs.jsonl").read_bytes().splitlines()]
    assert len(found) == pairs
    statuses = {s.adapter_session_id: s.closed.status for s in gen.sessions if s.closed is not None}
    assert pairs > 0
    for pair in found:
        assert statuses[pair["chosen"]["adapter_session_id"]] == "succeeded"
        assert statuses[pair["rejected"]["adapter_session_id"]] == "failed"
