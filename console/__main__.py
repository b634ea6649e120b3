"""``python -m console`` / ``atlas-console``: serve the web console until SIGINT / SIGTERM.

    atlas-console [--host 127.0.0.1] [--port 8070] [--requeue-enabled]

Exit status 0 on a signal, 2 on bad settings or a port that cannot be bound.
"""

from __future__ import annotations

import argparse
import sys

from atlas_common import configure_logging, load_settings, run
from console._serve import serve
from console._settings import ConsoleSettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atlas-console", description=__doc__.splitlines()[0])
    parser.add_argument("--host", help="address to listen on (default $CONSOLE_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default $CONSOLE_PORT or 8070; 0 picks one)")
    parser.add_argument(
        "--requeue-enabled", action="store_true", default=None, help="allow requeueing dead letters"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {"host": args.host, "port": args.port, "requeue_enabled": args.requeue_enabled}
    settings = load_settings(lambda: ConsoleSettings(**{k: v for k, v in overrides.items() if v is not None}))
    if settings is None:
        return 2
    configure_logging(level=settings.log_level, log_format=settings.log_format)
    try:
        run(serve(settings))
    except OSError as exc:
        print(
            f"error: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", file=sys.stderr
        )
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
