"""``python -m producer``: submit tasks (JSONL or demo), show the pipeline's status, handle dead letters."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import structlog
from pydantic import TypeAdapter, ValidationError
from tqdm import tqdm

from atlas_common import BrokerUnavailable, configure_logging, load_settings
from producer._amqp import quiet_broker_logs
from producer._audit import audit_text, run_audit
from producer._deadletters import Selection, list_dead_letters, requeue_dead_letters
from producer._demo import demo_tasks
from producer._errors import ProducerError
from producer._format import listing_text, requeue_text, status_text
from producer._lines import OversizedLine, ParsedLines, parse_lines, read_lines
from producer._producer import Producer
from producer._settings import ProducerSettings
from producer._status import collect_status
from schemas import Identifier, TaskMessage
from schemas.limits import MAX_TASK_BYTES

log = structlog.get_logger("producer")
_MAX_REJECTS_SHOWN = 50
_ADAPTER_NAME: TypeAdapter[str] = TypeAdapter(Identifier)

SUBMIT_HELP = f"""\
Submit one task per line (JSON objects with at least "task"; blank lines are skipped).

Bad lines: every line is validated BEFORE anything is sent. With --on-error=reject (the default) one bad
line rejects the whole file: nothing is sent and every bad line is listed with its line number. With
--on-error=skip the valid lines are sent and the bad ones are listed at the end (exit status 1).
Nothing is ever dropped silently.

Size: a task may be at most {MAX_TASK_BYTES // 1024} KiB encoded (schemas.limits.MAX_TASK_BYTES, what
every worker accepts). A longer line is rejected by its number without ever being read into memory whole.

Idempotency: task_id is the idempotency key. A line without "task_id" gets one derived from its content,
so re-running the same file names the same tasks. The worker enforces it: its task ledger in PostgreSQL
(table task_ledger) records each task_id that succeeded, and a task whose id already succeeded is acked
without running again. Lines repeating an earlier line's task_id in one file are sent once.
"""


STATUS_HELP = """\
Show what the pipeline holds now. RabbitMQ: ready messages and consumers of every queue of the topology
(a queue not declared yet shows as absent). Ingestion lag: the age of the oldest telemetry waiting in the
ingestor queue, read from the head of the queue without consuming it (basic.get without ack on a
throwaway channel, then the channel is closed so the message goes back). PostgreSQL: sessions by status,
the task ledger by state, the newest finalized JSONL file.

Exit status: 0 when RabbitMQ answered (whatever PostgreSQL said: what is missing is shown), 2 when
RabbitMQ cannot be reached.
"""

AUDIT_HELP = """\
Reconcile the task ledger, the sessions and steps in PostgreSQL, the telemetry dead letters and (with
--jsonl-dir) the finalised JSONL files: every task the ledger calls succeeded must have its session stored
(status succeeded, every step) and in exactly one line of a final JSONL file. Each one that is not is
listed as in flight (younger than --grace-s), explained (the pipeline recorded why: a record the ingestor
refused, a session flagged incomplete, a dead letter naming it) or unexplained.

Dead letters are read without consuming them. Exit status: 0 when nothing is unexplained, 1 otherwise,
2 when PostgreSQL cannot be reached.
"""

DEAD_HELP = """\
Dead letters are the original message plus headers saying why (x-atlas-reason), who sent it there
(x-atlas-source), where it was going (x-atlas-original-routing-key) and when (x-atlas-dead-at); tasks the
broker dead-lettered after too many deliveries carry x-first-death-reason / x-death instead.

list reads with basic.get without ack and hands every message back: nothing is consumed.
requeue publishes a copy of each chosen dead letter with publisher confirms (tasks to the tasks exchange,
routing key 'task', without the x-atlas-* headers so they get a full set of attempts again; telemetry to
the telemetry exchange with its original routing key) and acks the dead letter only after the confirm.
The others stay in the dead-letter queue.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m producer",
        description="Enqueue atlas-pipeline tasks; inspect the pipeline and its dead letters.",
    )
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
    demo.add_argument("--count", type=_positive_int, default=1000, help="how many tasks (default 1000)")
    demo.add_argument(
        "--run-id", default=None, help="ids are demo-<run-id>-<n>; reuse to resubmit the same tasks"
    )
    demo.add_argument(
        "--adapter",
        type=_adapter_name,
        default=None,
        help="adapter name the tasks ask for (worker's default if unset)",
    )
    demo.add_argument("--no-progress", action="store_true")

    status = sub.add_parser(
        "status",
        help="queue depths, sessions, task ledger, ingestion lag, newest JSONL file",
        description=STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status.add_argument("--database-url", help="PostgreSQL URL (default: $DATABASE_URL)")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    audit = sub.add_parser(
        "audit",
        help="is every succeeded task stored and exported exactly once? (lists those that are not)",
        description=AUDIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    audit.add_argument("--database-url", help="PostgreSQL URL (default: $DATABASE_URL)")
    audit.add_argument(
        "--jsonl-dir", type=Path, help="read the finalised JSONL files too: each session in exactly one line"
    )
    audit.add_argument(
        "--grace-s", type=float, default=600.0, help="younger successes are in flight (default 600)"
    )
    audit.add_argument("--since", type=_iso_time, help="only tasks that succeeded since (ISO 8601)")
    audit.add_argument("--dead-letter-limit", type=int, default=10_000, help="telemetry dead letters to read")
    audit.add_argument("--limit", type=_positive_int, default=50, help="findings to show (default 50)")
    audit.add_argument("--json", action="store_true", help="machine-readable output, every finding")

    dead = sub.add_parser(
        "dead",
        help="list or requeue dead letters",
        description=DEAD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dead_sub = dead.add_subparsers(dest="dead_command", required=True)
    dead_list = dead_sub.add_parser("list", help="show dead letters; they all stay in their queue")
    dead_list.add_argument(
        "--queue",
        choices=("tasks", "telemetry"),
        default="tasks",
        help="which dead-letter queue (default tasks)",
    )
    dead_list.add_argument("--limit", type=_positive_int, default=50, help="show at most N (default 50)")
    dead_list.add_argument("--json", action="store_true", help="machine-readable output")
    requeue = dead_sub.add_parser("requeue", help="move chosen dead letters back into the pipeline")
    which = requeue.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every dead letter of the queue")
    which.add_argument(
        "--id", dest="ids", nargs="+", action="extend", metavar="MESSAGE_ID", help="these message ids"
    )
    which.add_argument("--reason-contains", metavar="TEXT", help="reason contains TEXT (any case)")
    requeue.add_argument(
        "--queue",
        choices=("tasks", "telemetry"),
        default="tasks",
        help="which dead-letter queue (default tasks)",
    )
    requeue.add_argument("--dry-run", action="store_true", help="show what would move; move nothing")
    requeue.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _adapter_name(text: str) -> str:
    """An adapter name as a task carries it (schemas' Identifier), checked before any task is built."""
    try:
        return _ADAPTER_NAME.validate_python(text)
    except ValidationError:
        raise argparse.ArgumentTypeError(
            f"{text[:200]!r} is not an adapter name (1-200 characters: letters, digits and _.:@/-, "
            "starting with a letter or digit)"
        ) from None


def _read_lines(path: str) -> Iterator[bytes | OversizedLine]:
    """The lines of ``path`` (``-``: standard input), each held up to the task size limit only."""
    if path == "-":
        yield from read_lines(sys.stdin.buffer, max_bytes=MAX_TASK_BYTES)
        return
    with Path(path).open("rb") as stream:
        yield from read_lines(stream, max_bytes=MAX_TASK_BYTES)


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
        parsed = parse_lines(_read_lines(args.path), max_bytes=MAX_TASK_BYTES)
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


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def run_status(settings: ProducerSettings, args: argparse.Namespace) -> int:
    status = asyncio.run(
        collect_status(
            settings.amqp_url,
            settings.topology(),
            settings.database_url,
            connect_timeout_s=settings.connect_timeout_s,
        )
    )
    if args.json:
        _print_json(status.to_json())
    else:
        print(status_text(status))
    return 0


def run_audit_command(settings: ProducerSettings, args: argparse.Namespace) -> int:
    report = asyncio.run(
        run_audit(
            settings.database_url,
            amqp_url=settings.amqp_url,
            topology=settings.topology(),
            jsonl_dir=args.jsonl_dir,
            grace_s=args.grace_s,
            since=args.since,
            dead_letter_limit=args.dead_letter_limit,
            connect_timeout_s=settings.connect_timeout_s,
        )
    )
    if args.json:
        _print_json(report.to_json())
    else:
        print(audit_text(report, limit=args.limit))
    return 1 if report.unexplained else 0


def _iso_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def run_dead(settings: ProducerSettings, args: argparse.Namespace) -> int:
    if args.dead_command == "list":
        listing = asyncio.run(
            list_dead_letters(
                settings.amqp_url,
                settings.topology(),
                args.queue,
                limit=args.limit,
                connect_timeout_s=settings.connect_timeout_s,
            )
        )
        if args.json:
            _print_json(
                {
                    "queue": listing.queue,
                    "present": listing.present,
                    "depth": listing.depth,
                    "dead_letters": [info.to_json() for info in listing.letters],
                }
            )
        else:
            print(listing_text(listing))
        return 0
    selection = Selection(all=args.all, ids=frozenset(args.ids or ()), reason_contains=args.reason_contains)
    report = asyncio.run(
        requeue_dead_letters(
            settings.amqp_url,
            settings.topology(),
            selection,
            args.queue,
            dry_run=args.dry_run,
            connect_timeout_s=settings.connect_timeout_s,
        )
    )
    if args.json:
        _print_json(report.to_json())
    else:
        print(requeue_text(report))
    return 1 if report.failed or report.not_found_ids else 0


def _settings(args: argparse.Namespace) -> ProducerSettings | None:
    """The settings from the environment and flags, or None after printing one line per problem."""
    given = {
        "amqp_url": args.amqp_url,
        "prefix": args.prefix,
        "database_url": getattr(args, "database_url", None),
    }
    return load_settings(lambda: ProducerSettings(**{k: v for k, v in given.items() if v is not None}))


_COMMANDS: dict[str, Callable[[ProducerSettings, argparse.Namespace], int]] = {
    "submit": run_submit,
    "demo": run_demo,
    "status": run_status,
    "audit": run_audit_command,
    "dead": run_dead,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = _settings(args)
    if settings is None:
        return 2
    configure_logging(level=settings.log_level, log_format=settings.log_format)
    if args.command in {"status", "dead", "audit"}:
        quiet_broker_logs()
    try:
        return _COMMANDS[args.command](settings, args)
    except (ProducerError, BrokerUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: tasks confirmed so far are enqueued; re-run to submit the rest", file=sys.stderr)
        return 130
