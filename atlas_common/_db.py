"""What every service treats as "PostgreSQL is not reachable right now" (retry later, blame no data)."""

from __future__ import annotations

from typing import Final

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
