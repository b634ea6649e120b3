"""``python -m feed`` / ``atlas-feed``: print complete sessions as JSONL on stdout.

    atlas-feed follow --from first|last|next|<offset>|<offset>:<index>|<ISO 8601 time> [--consumer NAME]
                      [--count N]
                      [--idle-exit-s S] [--positions]
    atlas-feed files [--dir var/jsonl] [--consumer NAME] [--once] [--count N]

``follow`` reads the sessions stream (live, in order, duplicates hidden); ``files`` the finalised JSONL
files. With ``--consumer`` the place is saved (``FEED_CURSOR_DIR``, default ``var/feed``) and the next run
with that name resumes after the last session printed; ``--from`` only applies to a consumer with no
cursor yet. Progress (sessions, rate) goes to stderr every few seconds. Exit status 0, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

from atlas_common import configure_logging, load_settings
from feed._files import follow_files
from feed._follow import Position, Start, follow_sessions
from feed._settings import FeedSettings

_PROGRESS_S = 5.0


def parse_start(text: str) -> Start:
    """``first``, ``last``, ``next``, a non-negative offset, ``<offset>:<index>`` (right after that
    session), or an ISO 8601 time (UTC when no zone)."""
    if text in ("first", "last", "next"):
        return text  # type: ignore[return-value]
    if text.isdigit():
        return int(text)
    if text.count(":") == 1 and text.replace(":", "").isdigit():
        return Position.parse(text)
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use first, last, next, an offset or an ISO 8601 time"
        ) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atlas-feed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    follow = sub.add_parser("follow", help="complete sessions from the sessions stream")
    follow.add_argument("--from", dest="start", type=parse_start, default="next", help="where to start")
    follow.add_argument(
        "--positions", action="store_true", help="prefix each line with its <offset>:<index> and a tab"
    )
    files = sub.add_parser("files", help="complete sessions from the finalised JSONL files")
    files.add_argument("--dir", type=Path, default=Path("var/jsonl"), help="the ingestors' jsonl_dir")
    files.add_argument("--once", action="store_true", help="stop once every final file is read")
    for each in (follow, files):
        each.add_argument("--consumer", help="a name to save the place under, and resume from")
        each.add_argument("--count", type=int, default=None, help="stop after this many sessions")
        each.add_argument("--idle-exit-s", type=float, default=None, help="stop after this long with none")
    return parser


async def _print_all(lines: AsyncIterator[bytes], count: int | None, idle_s: float | None) -> int:
    out = sys.stdout.buffer
    printed, started, last_report = 0, time.monotonic(), time.monotonic()
    iterator = aiter(lines)
    while count is None or printed < count:
        try:
            line = await asyncio.wait_for(anext(iterator), idle_s) if idle_s else await anext(iterator)
        except (StopAsyncIteration, TimeoutError):
            break
        out.write(line + b"\n")
        out.flush()
        printed += 1
        if time.monotonic() - last_report >= _PROGRESS_S:
            last_report = time.monotonic()
            rate = printed / (last_report - started)
            print(f"feed: {printed:,} sessions ({rate:,.0f}/s)", file=sys.stderr, flush=True)
    return printed


async def _run(args: argparse.Namespace, settings: FeedSettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.command == "follow":
        async with follow_sessions(settings, start=args.start, consumer=args.consumer, stop=stop) as sessions:
            lines = (
                f"{s.position}\t".encode() + s.line if args.positions else s.line async for s in sessions
            )
            printed = await _print_all(lines, args.count, args.idle_exit_s)
    else:
        follow = follow_files(
            args.dir, consumer=args.consumer, settings=settings, live=not args.once, stop=stop
        )
        async with follow as file_lines:
            printed = await _print_all((x.line async for x in file_lines), args.count, args.idle_exit_s)
    print(f"feed: {printed:,} sessions", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = load_settings(FeedSettings)
    if settings is None:
        return 2
    configure_logging(level=settings.log_level, log_format=settings.log_format)
    try:
        return asyncio.run(_run(args, settings))
    except ValueError as err:  # a consumer name that cannot be a file name
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
