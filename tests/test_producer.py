"""The producer: JSONL parsing (pure) and the submit/demo CLI against a real RabbitMQ."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import pytest

from producer import Producer, PublishRejected, content_task_id, demo_tasks, parse_lines
from tests._pipeline import ROOT, PipelineStack
from tests._proxy import TcpProxy


def test_lines_without_ids_get_stable_content_ids() -> None:
    """The same task content always gets the same id, so a re-submitted file names the same tasks."""
    first = parse_lines([b'{"task": "summarise the report"}'], max_bytes=10_000)
    again = parse_lines([b'{"task": "summarise the report"}\n'], max_bytes=10_000)
    other = parse_lines([b'{"task": "summarise the other report"}'], max_bytes=10_000)
    assert first.tasks[0].task_id == again.tasks[0].task_id
    assert first.tasks[0].task_id != other.tasks[0].task_id
    fields: dict[str, object] = {
        "task": "summarise the report",
        "execution_mode": "stepwise",
        "adapter": None,
        "metadata": {},
    }
    assert first.tasks[0].task_id == content_task_id(fields)


def test_explicit_ids_are_kept_and_repeats_are_folded() -> None:
    """A given task_id is used as is; a later line with the same id is counted, not sent twice."""
    parsed = parse_lines(
        [b'{"task_id": "a", "task": "x"}', b'{"task_id": "a", "task": "y"}'], max_bytes=10_000
    )
    assert [t.task_id for t in parsed.tasks] == ["a"]
    assert parsed.duplicates == 1


def test_bad_lines_are_reported_with_their_numbers() -> None:
    """Every bad line is listed with its 1-based line number and what is wrong; blank lines are skipped."""
    parsed = parse_lines(
        [b'{"task": "ok"}', b"", b"{oops", b'{"task": ""}', b'{"task": "fine too"}'], max_bytes=10_000
    )
    assert len(parsed.tasks) == 2
    assert [r.line_no for r in parsed.rejects] == [3, 4]
    assert "not_json" in str(parsed.rejects[0])
    assert "task" in str(parsed.rejects[1])


def _run_cli(
    stack: PipelineStack, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "producer", *args],
        env=stack.env(),
        input=stdin,
        capture_output=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


@pytest.mark.integration
async def test_submit_rejects_a_file_with_a_bad_line_before_sending(
    pipeline: PipelineStack, tmp_path: Path
) -> None:
    """Default policy: one bad line rejects the whole file, names the line, and nothing reaches the queue."""
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(b'{"task": "one"}\n{"task": 5}\n{"task": "three"}\n')
    await pipeline.declare()
    result = _run_cli(pipeline, "submit", str(path), "--no-progress")
    assert result.returncode == 1
    assert b"line 2" in result.stderr
    assert b"nothing submitted" in result.stderr
    assert await pipeline.queue_depth(pipeline.topology.tasks_queue) == 0


@pytest.mark.integration
async def test_submit_skip_sends_the_good_lines_and_lists_the_rest(pipeline: PipelineStack) -> None:
    """--on-error=skip sends every valid line (from stdin here) and still reports the bad one."""
    lines = b"\n".join(orjson.dumps({"task": f"task {i}"}) for i in range(5)) + b"\nnot json\n"
    result = _run_cli(pipeline, "submit", "-", "--on-error=skip", "--no-progress", stdin=lines)
    assert result.returncode == 1
    assert b"line 6" in result.stderr
    assert b"submitted 5 task(s)" in result.stdout
    assert await pipeline.queue_depth(pipeline.topology.tasks_queue, expect=5) == 5


@pytest.mark.integration
async def test_resubmitting_a_file_runs_each_task_once(pipeline: PipelineStack, tmp_path: Path) -> None:
    """The same file submitted twice: the worker's ledger runs each content-derived id exactly once."""
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps({"task": f"task {i}"}) for i in range(10)) + b"\n")
    for _ in range(2):
        assert _run_cli(pipeline, "submit", str(path), "--no-progress").returncode == 0
    pipeline.start_worker("w1")
    for _ in range(300):
        rows = await pipeline.ledger()
        settled = len(rows) == 10 and all(r["state"] == "succeeded" for r in rows)
        if settled and await pipeline.queue_depth(pipeline.topology.tasks_queue) == 0:
            break
        await asyncio.sleep(0.1)
    rows = await pipeline.ledger()
    assert len(rows) == 10
    assert {(r["state"], r["attempts"]) for r in rows} == {("succeeded", 1)}


@pytest.mark.integration
def test_unreachable_broker_is_a_clear_error(tmp_path: Path) -> None:
    """A broker that does not answer: exit 2, one clear line, no traceback, no password."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "producer",
            "--amqp-url",
            "amqp://guest:s3cret@127.0.0.1:1/",
            "demo",
            "--count",
            "1",
        ],
        capture_output=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert b"cannot reach RabbitMQ" in result.stderr
    assert b"Traceback" not in result.stderr
    assert b"s3cret" not in result.stderr


@pytest.mark.integration
async def test_a_producer_reconnects_after_its_connection_is_cut(pipeline: PipelineStack) -> None:
    """A long-lived producer whose connection is cut publishes again once the broker is back: it starts a
    new connection by itself, and no task is enqueued twice."""
    first, second = demo_tasks(2, run_id="reconnect")
    broker = urlsplit(pipeline.amqp_url)
    async with (
        TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672) as proxy,
        Producer(proxy.proxied_url(pipeline.amqp_url), pipeline.topology, connect_timeout_s=2) as producer,
    ):
        assert await producer.submit(first) == first.task_id
        proxy.cut()
        await asyncio.sleep(0.5)
        proxy.restore()
        deadline = time.monotonic() + 20
        while True:
            try:
                assert await producer.submit(second) == second.task_id
                break
            except PublishRejected:  # published on the cut connection before its loss was seen
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
    assert await pipeline.queue_depth(pipeline.topology.tasks_queue, expect=2) == 2
