"""What every service treats as "PostgreSQL is not reachable right now" (retry later, blame no data), and
the driver options for a service whose URL goes through a connection pooler."""

from __future__ import annotations

from typing import Any, Final, Literal

import asyncpg

DB_TRANSIENT_ERRORS: Final = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    # The driver's own state errors after a connection died under it, e.g. "cannot switch to state 15;
    # another operation is in progress" from a commit or a pool release while the server restarts.
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
"""Connection-level failures: the server went away, restarted, or the driver lost track of a connection."""

DB_ERRORS: Final = (*DB_TRANSIENT_ERRORS, asyncpg.PostgresError)
"""Anything a database call may raise, a refused command included (no such table, permission denied, a
wrong password): for a one-shot tool that reports the failure instead of retrying it."""

DbPooler = Literal["none", "transaction"]
"""What sits between a service and PostgreSQL: ``none`` (a direct or session-pooled connection) or
``transaction`` (PgBouncer ``pool_mode = transaction`` or the like: each transaction may run on another server
connection, so nothing may rely on session state between transactions)."""


def connect_options(pooler: DbPooler) -> dict[str, Any]:
    """``asyncpg.connect`` options for ``pooler``.

    Behind a transaction pooler asyncpg's named prepared statements would be prepared on one server
    connection and executed on another ("prepared statement ... does not exist"); ``statement_cache_size=0``
    makes it use the unnamed statement and re-Parse it in the same Sync as its Bind/Execute (asyncpg's own
    advice for PgBouncer, and what asyncpg >= 0.29 does when the cache is off). It costs a second Parse per
    statement, which is why a direct connection keeps the cache."""
    return {"statement_cache_size": 0} if pooler == "transaction" else {}


async def _keep_session(conn: asyncpg.Connection) -> None:
    """No reset query: see :func:`pool_options`."""


def pool_options(pooler: DbPooler, *, reset: bool = True) -> dict[str, Any]:
    """``asyncpg.create_pool`` options for ``pooler``: :func:`connect_options`, and behind a transaction
    pooler no reset query on release. asyncpg's reset (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL``) would run on whichever server connection the pooler picks, not the one this client used:
    it cleans nothing of ours and costs a round trip per release (the pooler cleans server connections
    itself). An open transaction is still rolled back by asyncpg before the reset hook runs.

    ``reset=False`` drops the reset query on a direct connection too, for a pool whose users never leave
    session state behind (no session advisory lock, cursor, LISTEN or SET outside a transaction): there it
    is only a round trip on every release, on the path of every call that returns."""
    options = connect_options(pooler)
    if pooler == "transaction" or not reset:
        options["reset"] = _keep_session
    return options
