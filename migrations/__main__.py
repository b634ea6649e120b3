"""``python -m migrations`` / ``atlas-migrate``: apply pending migrations, or show them with ``--status``.

Exit codes: 0 done, 1 a migration problem (bad file, edited file, failed SQL, lock timeout),
2 the database cannot be reached or the URL is invalid.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import structlog

from atlas_common import load_settings
from migrations._errors import DatabaseUnreachable, MigrationError
from migrations._runner import apply_migrations, migration_status
from migrations._settings import DEFAULT_DATABASE_URL, MigrateSettings


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    given = {} if args.database_url is None else {"database_url": args.database_url}
    settings = load_settings(lambda: MigrateSettings(**given))
    if settings is None:
        return 2
    if not structlog.is_configured():
        # A service embedding the runner configures its own logging; the command keeps stdout for results.
        structlog.configure(
            wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        )
    try:
        lines = asyncio.run(_status(settings) if args.status else _apply(settings))
    except DatabaseUnreachable as err:
        sys.stderr.write(f"atlas-migrate: {err}\n")
        return 2
    except MigrationError as err:
        sys.stderr.write(f"atlas-migrate: {err}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atlas-migrate", description="Apply atlas-pipeline's SQL migrations."
    )
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help=f"PostgreSQL URL (default: $DATABASE_URL, else {DEFAULT_DATABASE_URL})",
    )
    parser.add_argument(
        "--status", action="store_true", help="list applied and pending migrations; change nothing"
    )
    return parser


async def _apply(settings: MigrateSettings) -> list[str]:
    applied = await apply_migrations(settings.database_url)
    if not applied:
        return ["migrations: up to date"]
    return [f"applied {m.name}" for m in applied] + [f"migrations: {len(applied)} applied, 0 pending"]


async def _status(settings: MigrateSettings) -> list[str]:
    status = await migration_status(settings.database_url)
    return (
        [f"applied {m.name}" for m in status.applied]
        + [f"pending {m.name}" for m in status.pending]
        + [f"migrations: {len(status.applied)} applied, {len(status.pending)} pending"]
    )


if __name__ == "__main__":
    raise SystemExit(main())
