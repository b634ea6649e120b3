"""Read a PostgreSQL URL for messages: where it points, never its password.

Checking, redacting and scrubbing are atlas_common's (the same rules as every service's)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

from atlas_common import check_database_url
from migrations._errors import DatabaseUnreachable

DEFAULT_PORT = 5432


@dataclass(frozen=True)
class Target:
    """Host(s), database and user of a URL: what an operator needs to find the server, safe to print."""

    hosts: str
    database: str
    user: str

    def __str__(self) -> str:
        return f'{self.hosts} (database "{self.database}", user "{self.user}")'


def parse_target(url: str) -> Target:
    """Where ``url`` points. Raises DatabaseUnreachable(reason="bad_url") for a URL asyncpg would reject."""
    try:
        check_database_url(url)
    except ValueError as exc:
        raise DatabaseUnreachable(
            "bad_url",
            f"{exc}. Set DATABASE_URL or --database-url to postgresql://USER:PASSWORD@HOST:PORT/DATABASE",
        ) from None
    parts = urlsplit(url)
    query = _query(parts)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    user = unquote(userinfo.partition(":")[0]) or query.get("user", "")
    hosts = [_host_port(item) for item in hostlist.split(",")] if hostlist else []
    if not hosts:
        hosts = [f"{query.get('host', 'localhost')}:{query.get('port', DEFAULT_PORT)}"]
    # Without a database name the server uses the user's name; without a user, libpq-style defaults apply.
    database = unquote(parts.path.lstrip("/")) or query.get("dbname", "") or user or "(default)"
    return Target(hosts=",".join(hosts), database=database, user=user or "(default)")


def _query(parts: SplitResult) -> dict[str, str]:
    pairs = (p.partition("=") for p in parts.query.split("&") if p)
    return {k: unquote(v) for k, _, v in pairs}


def _host_port(item: str) -> str:
    # "[::1]:5432" keeps its brackets; a missing port means the PostgreSQL default (ports are checked).
    host, sep, port = item.rpartition(":") if item.rfind(":") > item.rfind("]") else (item, "", "")
    return f"{unquote(host) or 'localhost'}:{port if sep and port else DEFAULT_PORT}"
