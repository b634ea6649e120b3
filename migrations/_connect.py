"""Open one asyncpg connection, turning every "cannot connect" failure into DatabaseUnreachable."""

from __future__ import annotations

import socket

import asyncpg

from atlas_common import scrub_secrets
from migrations._dsn import Target, parse_target
from migrations._errors import DatabaseUnreachable, UnreachableReason

_FIX_URL = "fix DATABASE_URL or --database-url"

# First match wins, so subclasses come before their bases (TimeoutError and gaierror are OSErrors).
_FAILURES: tuple[tuple[type[BaseException], UnreachableReason, str, str], ...] = (
    (socket.gaierror, "unknown_host", "host name not found", f"check the host name, or {_FIX_URL}"),
    (
        ConnectionRefusedError,
        "refused",
        "connection refused",
        f"start PostgreSQL or {_FIX_URL} to point at a running server",
    ),
    (TimeoutError, "timeout", "no answer in time", f"check the host, port and firewall, or {_FIX_URL}"),
    (
        asyncpg.InvalidCatalogNameError,
        "no_database",
        "the database does not exist",
        f"create it (createdb) or {_FIX_URL} to name an existing database",
    ),
    (
        asyncpg.InvalidAuthorizationSpecificationError,
        "auth",
        "authentication failed",
        "check the user name and password in DATABASE_URL or --database-url",
    ),
    (
        asyncpg.CannotConnectNowError,
        "unavailable",
        "the server is not accepting connections yet",
        "retry once it has finished starting",
    ),
    (
        asyncpg.TooManyConnectionsError,
        "unavailable",
        "the server has too many connections",
        "retry later or raise max_connections",
    ),
    (asyncpg.ClientConfigurationError, "bad_url", "the connection settings are invalid", _FIX_URL),
    (OSError, "network", "network error", f"check the host and port, or {_FIX_URL}"),
    (asyncpg.PostgresConnectionError, "network", "connection failed", f"check the server, or {_FIX_URL}"),
)
_CAUGHT = tuple(exc_type for exc_type, *_ in _FAILURES)


async def connect(url: str, *, timeout_s: float, statement_cache_size: int = 100) -> asyncpg.Connection:
    """A connection to ``url``; DatabaseUnreachable names host, port and database, never the password."""
    target = parse_target(url)
    try:
        return await asyncpg.connect(url, timeout=timeout_s, statement_cache_size=statement_cache_size)
    except _CAUGHT as err:
        raise _unreachable(err, url, target) from err


# Errors that mean the connection died under a running migration (server restart, network cut).
CONNECTION_LOST = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)


def connection_lost(err: BaseException, url: str) -> DatabaseUnreachable:
    """The DatabaseUnreachable for a connection that failed after it was opened."""
    return DatabaseUnreachable(
        "lost", f"lost the connection to PostgreSQL at {parse_target(url)}{_detail(err, url)}; run again"
    )


def _unreachable(err: BaseException, url: str, target: Target) -> DatabaseUnreachable:
    reason, what, hint = next((r, w, h) for t, r, w, h in _FAILURES if isinstance(err, t))
    return DatabaseUnreachable(
        reason, f"cannot connect to PostgreSQL at {target}: {what}{_detail(err, url)}; {hint}"
    )


def _detail(err: BaseException, url: str) -> str:
    # Driver messages carry no password today; scrub anyway, this text goes to logs and terminals.
    text = scrub_secrets(str(err), url).strip()
    return f" ({text})" if text else ""
