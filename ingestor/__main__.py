"""``python -m ingestor`` / ``atlas-ingestor``: ``run`` (default), ``export``, ``prune``, ``follow`` (feed).

The ingestor applies no migration itself: at start it checks that the migrations it needs (up to
``007_accountability``) are applied and exits with status 2 telling you to run ``atlas-migrate`` otherwise, so
one deliberate step owns schema changes. Exit status: 0 after a clean shutdown (SIGTERM/SIGINT), 2 on a
configuration problem, 1 on a runtime failure.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import structlog

from atlas_common import configure_logging, load_settings, run
from ingestor._errors import ConfigError, IngestorError
from ingestor._export import export_sessions, parse_time
from ingestor._metrics import IngestorMetrics
from ingestor._prune import prune_sessions
from ingestor._service import Ingestor
from ingestor._settings import IngestorSettings

_log = structlog.get_logger("ingestor")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atlas-ingestor", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="consume telemetry into Postgres and rolling JSONL (the default)")
    export = sub.add_parser("export", help="write complete sessions from Postgres as JSONL")
    export.add_argument("--since", required=True, type=parse_time, help="ISO 8601; completed_at >= since")
    export.add_argument("--until", type=parse_time, default=None, help="ISO 8601; completed_at < until")
    export.add_argument("--out", required=True, type=Path, help="output file (.jsonl, .jsonl.gz, .jsonl.zst)")
    export.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    export.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    prune = sub.add_parser(
        "prune", help="delete exported sessions (and their steps) that completed before a time, in batches"
    )
    prune.add_argument("--before", required=True, type=parse_time, help="ISO 8601; completed_at < before")
    prune.add_argument("--batch", type=int, default=10_000, help="sessions per transaction (10,000)")
    prune.add_argument("--dry-run", action="store_true", help="count what would be deleted, delete nothing")
    prune.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    sub.add_parser("follow", help="follow complete sessions from the sessions stream (see atlas-feed)")
    return parser


async def _serve(settings: IngestorSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics = IngestorMetrics()
    if settings.metrics_port is not None:
        metrics.serve(settings.metrics_port, settings.metrics_host)
    await Ingestor(settings, metrics=metrics).run(stop)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["follow"]:  # the training feed has its own CLI: ``atlas-feed follow``, same arguments
        from feed.__main__ import main as feed_main

        return feed_main(argv)
    args = _parser().parse_args(argv)
    settings = load_settings(IngestorSettings)
    if settings is None:
        return 2
    configure_logging(level=settings.log_level, log_format=settings.log_format)
    try:
        if args.command == "export":
            asyncio.run(
                export_sessions(
                    settings,
                    since=args.since,
                    until=args.until,
                    out=args.out,
                    force=args.force,
                    progress=not args.no_progress,
                )
            )
        elif args.command == "prune":
            pruned = asyncio.run(
                prune_sessions(
                    settings,
                    before=args.before,
                    batch=args.batch,
                    dry_run=args.dry_run,
                    progress=not args.no_progress,
                )
            )
            print(pruned.summary(args.before, dry_run=args.dry_run))
        else:
            run(_serve(settings))
    except ConfigError as err:
        _log.error("ingestor.config_error", error=str(err))
        return 2
    except IngestorError as err:
        _log.error("ingestor.failed", error=str(err))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
