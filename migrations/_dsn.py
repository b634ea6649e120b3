"""Read a PostgreSQL URL for messages: where it points and a printable form, never its password."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

from migrations._errors import DatabaseUnreachable

DEFAULT_PORT = 5432
_SCHEMES = frozenset({"postgresql", "postgres"})
_MASK = "***"


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
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise _bad_url(url, "it must start with postgresql://")
    query = _query(parts)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    user = unquote(userinfo.partition(":")[0]) or query.get("user", "")
    hosts = [_host_port(url, item) for item in hostlist.split(",")] if hostlist else []
    if not hosts:
        hosts = [f"{query.get('host', 'localhost')}:{query.get('port', DEFAULT_PORT)}"]
    # Without a database name the server uses the user's name; without a user, libpq-style defaults apply.
    database = unquote(parts.path.lstrip("/")) or query.get("dbname", "") or user or "(default)"
    return Target(hosts=",".join(hosts), database=database, user=user or "(default)")


def mask_url(url: str) -> str:
    """``url`` with any password (in the user part or a ``password=`` parameter) replaced by ``***``."""
    parts = urlsplit(url)
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    netloc = f"{user}{colon and ':' + _MASK}{at}{hostlist}"
    pairs = [p.partition("=") for p in parts.query.split("&")] if parts.query else []
    query = "&".join(f"{k}{eq}{_MASK if k.lower() == 'password' else v}" for k, eq, v in pairs)
    # Built by hand: SplitResult.geturl() drops the "//" of a URL with an empty host part.
    return (
        f"{parts.scheme}://{netloc}{parts.path}"
        f"{'?' + query if query else ''}{'#' + parts.fragment if parts.fragment else ''}"
    )


def scrub(text: str, url: str) -> str:
    """``text`` (e.g. a driver message) with every occurrence of ``url``'s password replaced by ``***``."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    secrets = {userinfo.partition(":")[2], _query(parts).get("password", "")}
    for secret in sorted(secrets | {unquote(s) for s in secrets}, key=len, reverse=True):
        if secret:
            text = text.replace(secret, _MASK)
    return text


def _query(parts: SplitResult) -> dict[str, str]:
    pairs = (p.partition("=") for p in parts.query.split("&") if p)
    return {k: unquote(v) for k, _, v in pairs}


def _host_port(url: str, item: str) -> str:
    # "[::1]:5432" keeps its brackets; a missing port means the PostgreSQL default.
    host, sep, port = item.rpartition(":") if item.rfind(":") > item.rfind("]") else (item, "", "")
    host = unquote(host) or "localhost"
    if not sep:
        return f"{host}:{DEFAULT_PORT}"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise _bad_url(url, f"port {port!r} is not a number between 1 and 65535")
    return f"{host}:{port}"


def _bad_url(url: str, detail: str) -> DatabaseUnreachable:
    return DatabaseUnreachable(
        "bad_url",
        f"invalid database URL {mask_url(url)!r}: {detail}. "
        "Set DATABASE_URL or --database-url to postgresql://USER:PASSWORD@HOST:PORT/DATABASE",
    )
