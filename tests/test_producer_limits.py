"""``producer submit`` against oversized and overly deep lines: refused by line number, memory bounded.

The reader never holds more than about ``MAX_TASK_BYTES`` of one line, and a refused line never lets the
rest of a file through in reject mode. The CLI tests run ``python -m producer`` against a real RabbitMQ.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import time
from pathlib import Path

import aio_pika
import orjson
import pytest

from producer import parse_lines
from producer._lines import OversizedLine, read_lines
from schemas import encode
from schemas.limits import MAX_JSON_DEPTH, MAX_TASK_BYTES
from tests._pipeline import ROOT, PipelineStack

HUGE_LINE_BYTES = 200 * 1024 * 1024
MAX_CHILD_RSS_KIB = 150 * 1024


def _nested(levels: int) -> dict[str, object]:
    value: dict[str, object] = {"leaf": True}
    for _ in range(levels - 1):
        value = {"k": value}
    return value


def _deep_json_line(levels: int) -> bytes:
    # Built as text: orjson itself refuses to serialise beyond its own nesting limit.
    return b'{"task": "deep", "metadata": ' + b'{"k": ' * (levels - 1) + b"{}" + b"}" * (levels - 1) + b"}"


def test_reader_reports_an_oversized_line_and_keeps_the_others() -> None:
    """A line longer than the limit comes out as OversizedLine with its length; the neighbours are intact."""
    stream = io.BytesIO(b'{"task": "one"}\n' + b"x" * 50_000 + b'\n{"task": "three"}')
    items = list(read_lines(stream, max_bytes=1000, chunk_bytes=4096))
    assert items[0] == b'{"task": "one"}\n'
    assert items[1] == OversizedLine(50_000)
    assert items[2] == b'{"task": "three"}'


def test_reader_keeps_a_line_exactly_at_the_limit() -> None:
    """A line of exactly max_bytes (plus its newline) is a line, not an oversized one."""
    line = b"y" * 1000
    assert list(read_lines(io.BytesIO(line + b"\n" + line), max_bytes=1000)) == [line + b"\n", line]


def test_oversized_line_is_rejected_with_its_number() -> None:
    """parse_lines turns an OversizedLine into a too_large rejection naming the line; others parse."""
    parsed = parse_lines([b'{"task": "a"}', OversizedLine(5_000_000), b'{"task": "b"}'], max_bytes=10_000)
    assert [t.task for t in parsed.tasks] == ["a", "b"]
    assert [r.line_no for r in parsed.rejects] == [2]
    assert "too_large" in str(parsed.rejects[0])
    assert "5000000 bytes" in str(parsed.rejects[0])


def test_task_too_large_once_encoded_is_rejected_at_parse_time() -> None:
    """A line under the limit whose encoded TaskMessage (with the fields the producer adds) is over it."""
    head = b'{"task": "big", "metadata": {"pad": "'
    tail = b'"}}'
    line = head + b"p" * (MAX_TASK_BYTES - len(head) - len(tail)) + tail
    assert len(line) == MAX_TASK_BYTES
    parsed = parse_lines([line])
    assert parsed.tasks == []
    [reject] = parsed.rejects
    assert reject.line_no == 1
    assert "too_large" in str(reject)
    assert "encoded" in str(reject)
    small = parse_lines([b'{"task": "fits"}'])
    assert len(encode(small.tasks[0])) <= MAX_TASK_BYTES


def test_metadata_deeper_than_the_limit_is_a_clean_rejection() -> None:
    """Metadata nested past MAX_JSON_DEPTH (300 levels), or past orjson's parser (2000), is rejected."""
    ok = orjson.dumps({"task": "ok", "metadata": _nested(MAX_JSON_DEPTH // 2)})
    parsed = parse_lines([ok, _deep_json_line(300), _deep_json_line(2000)])
    assert len(parsed.tasks) == 1
    assert [r.line_no for r in parsed.rejects] == [2, 3]
    assert "nested deeper" in str(parsed.rejects[0])
    assert "line 3" in str(parsed.rejects[1])


def _run_cli(stack: PipelineStack, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "producer", *args],
        env=stack.env(),
        capture_output=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def _run_measured(stack: PipelineStack, *args: str, workdir: Path) -> tuple[int, str, int]:
    """Run the producer; return its exit status, stderr and its own peak RSS in KiB.

    The peak is the new program's high-water mark (``VmHWM`` of /proc/<pid>/status, read until it exits):
    ``wait4``'s ``ru_maxrss`` would also count the test process's memory, which the child shares between
    the fork and the exec."""
    out_path, err_path = workdir / "out.txt", workdir / "err.txt"
    peak = 0
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "producer", *args], env=stack.env(), stdout=out, stderr=err, cwd=ROOT
        )
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            with contextlib.suppress(OSError):
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
            time.sleep(0.02)
    return proc.returncode, err_path.read_text(), peak


def _write_huge_line_file(path: Path) -> None:
    chunk = b"x" * (1024 * 1024)
    with path.open("wb") as out:
        out.write(b'{"task": "first"}\n{"task": "')
        for _ in range(HUGE_LINE_BYTES // len(chunk)):
            out.write(chunk)
        out.write(b'"}\n{"task": "third"}\n')


async def _queued_task_ids(stack: PipelineStack) -> list[str]:
    """The message ids waiting in the tasks queue (read and acked: the queue is empty afterwards)."""
    ids: list[str] = []
    connection = await aio_pika.connect(stack.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(stack.topology.tasks_queue, passive=True)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            ids.append(message.message_id or "")
    return ids


@pytest.mark.integration
@pytest.mark.slow
async def test_a_200_mb_line_is_refused_without_reading_it_whole(
    pipeline: PipelineStack, tmp_path: Path
) -> None:
    """A ~200 MB line: rejected as too large naming line 2, peak RSS stays low, and nothing is sent."""
    path = tmp_path / "huge.jsonl"
    _write_huge_line_file(path)
    await pipeline.declare()

    code, err, max_rss_kib = _run_measured(
        pipeline, "submit", str(path), "--on-error=reject", "--no-progress", workdir=tmp_path
    )
    path.unlink()

    assert code == 1, err
    assert "line 2: too_large" in err
    assert "nothing submitted" in err
    assert "Traceback" not in err
    assert max_rss_kib < MAX_CHILD_RSS_KIB, f"peak RSS {max_rss_kib} KiB"
    assert await pipeline.queue_depth(pipeline.topology.tasks_queue) == 0


@pytest.mark.integration
async def test_deep_metadata_line_rejects_the_file_or_is_skipped_alone(
    pipeline: PipelineStack, tmp_path: Path
) -> None:
    """Line 2 nested 300 levels: reject mode sends nothing and names line 2; skip sends lines 1 and 3."""
    path = tmp_path / "deep.jsonl"
    path.write_bytes(
        b'{"task_id": "line-1", "task": "one"}\n'
        + _deep_json_line(300)
        + b'\n{"task_id": "line-3", "task": "three"}\n'
    )
    await pipeline.declare()

    rejected = _run_cli(pipeline, "submit", str(path), "--on-error=reject", "--no-progress")
    assert rejected.returncode == 1, rejected.stderr
    assert b"line 2" in rejected.stderr
    assert b"Traceback" not in rejected.stderr
    assert await pipeline.queue_depth(pipeline.topology.tasks_queue) == 0

    skipped = _run_cli(pipeline, "submit", str(path), "--on-error=skip", "--no-progress")
    assert skipped.returncode == 1, skipped.stderr
    assert b"line 2" in skipped.stderr
    assert b"submitted 2 task(s)" in skipped.stdout
    assert await pipeline.queue_depth(pipeline.topology.tasks_queue, expect=2) == 2
    assert sorted(await _queued_task_ids(pipeline)) == ["line-1", "line-3"]
