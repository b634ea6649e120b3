"""``python -m producer``: submit tasks from JSONL, or generated demo tasks."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import structlog
from tqdm import tqdm

from atlas_common import configure_logging
from producer._demo import demo_tasks
from producer._errors import ProducerError
from producer._lines import ParsedLines, parse_lines
from producer._producer import Producer
from producer._settings import ProducerSettings
from schemas import TaskMessage

log = structlog.get_logger("producer")
_MAX_REJECTS_SHOWN = 50

SUBMIT_HELP = """\
Submit one task per line (JSON objects with at least "task"; blank lines are skipped).

Bad lines: every line is validated BEFORE anything is sent. With --on-error=reject (the default) one bad
line rejects the whole file: nothing is sent and every bad line is listed with its line number. With
--on-error=skip the valid lines are sent and the bad ones are listed at the end (exit status 1).
Nothing is ever dropped silently.

Idempotency: task_id is the idempotency key. A line without "task_id" gets one derived from its content,
so re-running the same file names the same tasks. The worker enforces it: its task ledger in PostgreSQL
(table task_ledger) records each task_id that succeeded, and a task whose id already succeeded is acked
without running again. Lines repeating an earlier line's task_id in one file are sent once.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m producer", description="Enqueue atlas-pipeline tasks.")
    parser.add_argument("--amqp-url", help="RabbitMQ URL (default: $AMQP_URL)")
    parser.add_argument("--prefix", help="topology name prefix (default: $ATLAS_PREFIX or 'atlas')")
    sub = parser.add_subparsers(dest="command", required=True)

    submit = sub.add_parser(
        "submit",
        help="submit tasks from a JSONL file",
        description=SUBMIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    submit.add_argument("path", help="JSONL file, or - for standard input")
    submit.add_argument("--on-error", choices=("reject", "skip"), default="reject")
    submit.add_argument("--no-progress", action="store_true", help="no progress bar")

    demo = sub.add_parser("demo", help="submit N generated demo tasks")
    demo.add_argument("--count", type=int, default=1000)
    demo.add_argument(
        "--run-id", default=None, help="ids are demo-<run-id>-<n>; reuse to resubmit the same tasks"
    )
    demo.add_argument(
        "--adapter", default=None, help="adapter name the tasks ask for (worker's default if unset)"
    )
    demo.add_argument("--no-progress", action="store_true")
    return parser


def _read_lines(path: str) -> Iterator[bytes]:
    stream: BinaryIO
    if path == "-":
        stream = sys.stdin.buffer
        yield from stream
        return
    with Path(path).open("rb") as stream:
        yield from stream


def _report_rejects(parsed: ParsedLines) -> None:
    for reject in parsed.rejects[:_MAX_REJECTS_SHOWN]:
        print(f"rejected {reject}", file=sys.stderr)
    extra = len(parsed.rejects) - _MAX_REJECTS_SHOWN
    if extra > 0:
        print(f"... and {extra} more rejected lines", file=sys.stderr)


async def _submit(settings: ProducerSettings, tasks: list[TaskMessage], *, progress: bool) -> int:
    bar = tqdm(total=len(tasks), unit="task", desc="submitted", disable=not progress, file=sys.stderr)
    try:
        async with Producer(
            settings.amqp_url,
            settings.topology(),
            window=settings.publish_window,
            connect_timeout_s=settings.connect_timeout_s,
        ) as producer:
            report = await producer.submit_many(tasks, on_confirmed=bar.update)
    finally:
        bar.close()
    return report.submitted


def run_submit(settings: ProducerSettings, args: argparse.Namespace) -> int:
    try:
        parsed = parse_lines(_read_lines(args.path), max_bytes=settings.max_message_bytes)
    except OSError as exc:
        print(f"error: cannot read {args.path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    _report_rejects(parsed)
    if parsed.rejects and args.on_error == "reject":
        print(
            f"nothing submitted: {len(parsed.rejects)} bad line(s); fix them or use --on-error=skip",
            file=sys.stderr,
        )
        return 1
    submitted = asyncio.run(_submit(settings, parsed.tasks, progress=not args.no_progress))
    print(
        f"submitted {submitted} task(s); {len(parsed.rejects)} rejected line(s); "
        f"{parsed.duplicates} repeated task_id line(s) folded"
    )
    return 1 if parsed.rejects else 0


def run_demo(settings: ProducerSettings, args: argparse.Namespace) -> int:
    run_id = args.run_id or uuid.uuid4().hex[:8]
    tasks = list(demo_tasks(args.count, run_id=run_id, adapter=args.adapter))
    submitted = asyncio.run(_submit(settings, tasks, progress=not args.no_progress))
    print(f"submitted {submitted} demo task(s), run id {run_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in {"amqp_url": args.amqp_url, "prefix": args.prefix}.items() if v is not None}
    settings = ProducerSettings(**overrides)
    configure_logging(level=settings.log_level, log_format=settings.log_format)
    try:
        if args.command == "submit":
            return run_submit(settings, args)
        if args.command == "demo":
            return run_demo(settings, args)
    except ProducerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: tasks confirmed so far are enqueued; re-run to submit the rest", file=sys.stderr)
        return 130
    return 2
