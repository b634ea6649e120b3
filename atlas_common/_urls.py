"""Service URLs: checked before use, and shown in logs and error messages without their secrets.

A URL carries a password in its user part (``amqp://user:secret@host/``) or in a query parameter
(``postgresql://host/db?password=secret``, as libpq and asyncpg accept). Every package redacts and scrubs
with these functions, so a new place for a secret is handled once.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator
from typing import Final
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

MASK: Final = "***"
SECRET_QUERY_KEYS: Final = frozenset(
    {"password", "pass", "pwd", "passwd", "secret", "token", "api_key", "apikey", "sslpassword"}
)
"""Query parameter names (compared case-insensitively, after percent-decoding) whose value is a secret."""

UNPARSEABLE: Final = "<unparseable url>"
_MAX_PORT: Final = 65_535
_AMQP_SCHEMES: Final = frozenset({"amqp", "amqps"})
_POSTGRES_SCHEMES: Final = frozenset({"postgresql", "postgres"})
_NEXT_AMQP_URL: Final = re.compile(r"\s*,\s*(?=amqps?://)")


def split_urls(text: str) -> list[str]:
    """The URLs of a broker address list: ``amqp://a:5672/,amqp://b:5672/`` (each URL whole, with its own
    credentials, so nodes may differ in port or TLS). A single URL gives a list of one."""
    return [u for u in _NEXT_AMQP_URL.split(text.strip()) if u] or [text]


def redact_url(url: str) -> str:
    """``url`` with its user-part password and secret query values replaced by ``***``; the rest is kept.

    ``amqp://user:secret@host/?token=t`` -> ``amqp://user:***@host/?token=***``. The host part is kept
    as written (several hosts, a bad port), so the operator sees where the URL points. A URL whose
    password holds an unencoded ``/``, ``?`` or ``#`` cannot be split safely: it is not shown at all.
    A list of broker URLs is redacted URL by URL."""
    urls = split_urls(url)
    if len(urls) > 1:
        return ",".join(redact_url(u) for u in urls)
    try:
        parts = urlsplit(url)
    except ValueError:
        return UNPARSEABLE
    if _misplaced_at(parts):
        return UNPARSEABLE
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    netloc = f"{user}{colon and ':' + MASK}{at}{hostlist}"
    query = "&".join(
        f"{key}{eq}{MASK if _is_secret_key(key) else value}" for key, eq, value in _query_items(parts)
    )
    # Built by hand: urlunsplit drops the "//" of a URL with an empty host part (postgresql:///db).
    slashes = "//" if url[len(parts.scheme) + 1 :].startswith("//") else ""
    return (
        f"{parts.scheme}:{slashes}{netloc}{parts.path}"
        f"{'?' + query if query else ''}{'#' + parts.fragment if parts.fragment else ''}"
    )


def strip_url(url: str) -> str:
    """``scheme://host:port/path`` of ``url``: no user info, query or fragment (any may carry a secret)."""
    urls = split_urls(url)
    if len(urls) > 1:
        return ",".join(strip_url(u) for u in urls)
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<invalid url>"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def url_secrets(url: str) -> frozenset[str]:
    """The secrets of ``url`` as they may appear in text: each raw and percent-decoded."""
    urls = split_urls(url)
    if len(urls) > 1:
        return frozenset().union(*(url_secrets(u) for u in urls))
    try:
        parts = urlsplit(url)
    except ValueError:
        return frozenset()
    userinfo = parts.netloc.rpartition("@")[0]
    if _misplaced_at(parts):
        userinfo = url.partition("//")[2].rpartition("@")[0]
    raw = {userinfo.partition(":")[2]}
    raw |= {value for key, _, value in _query_items(parts) if _is_secret_key(key)}
    return frozenset(s for s in raw | {unquote(s) for s in raw} if s)


def scrub_text(text: str, secrets: Collection[str]) -> str:
    """``text`` with every secret replaced by ``***`` (longest first, so no part of a secret survives)."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, MASK)
    return text


def scrub_secrets(text: str, url: str) -> str:
    """``text`` (e.g. a driver's error message) without any secret of ``url``, raw or percent-decoded."""
    return scrub_text(text, url_secrets(url))


def check_amqp_url(url: str) -> str:
    """``url`` if aio-pika can connect with it, else ValueError saying why (the URL shown redacted). A
    comma-separated list of URLs (the nodes of a cluster) is checked URL by URL."""
    urls = split_urls(url)
    if len(urls) > 1:
        for each in urls:
            check_amqp_url(each)
        return url
    parts = _split(url, "AMQP")
    if parts.scheme not in _AMQP_SCHEMES:
        raise _invalid("AMQP", url, "it must start with amqp:// or amqps://")
    hostlist = parts.netloc.rpartition("@")[2]
    if "," in hostlist:
        raise _invalid(
            "AMQP", url, "it names more than one host (list whole URLs instead: amqp://a/,amqp://b/)"
        )
    _check_port(url, "AMQP", hostlist)
    if not parts.hostname:
        raise _invalid("AMQP", url, "it names no host")
    return url


def check_database_url(url: str) -> str:
    """``url`` if asyncpg can read it, else ValueError saying why (the URL shown redacted).

    Several ``host:port`` pairs are allowed (asyncpg tries them in turn), and so is no host at all
    (a Unix socket or ``?host=``)."""
    parts = _split(url, "database")
    if parts.scheme not in _POSTGRES_SCHEMES:
        raise _invalid("database", url, "it must start with postgresql:// or postgres://")
    hostlist = parts.netloc.rpartition("@")[2]
    for item in hostlist.split(",") if hostlist else ():
        _check_port(url, "database", item)
    for key, _, value in _query_items(parts):
        if unquote(key) == "port":
            for port in unquote(value).split(","):
                _check_port_number(url, "database", port)
    return url


def _split(url: str, what: str) -> SplitResult:
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"invalid {what} URL: it cannot be parsed ({exc})") from None
    if _misplaced_at(parts):
        raise ValueError(
            f"invalid {what} URL: an '@' follows the host part; percent-encode '/', '?', '#' and '@' "
            "in the user name and password (e.g. '/' as %2F)"
        )
    return parts


def _misplaced_at(parts: SplitResult) -> bool:
    """An '@' after the host part: most likely a password with an unencoded '/', '?' or '#', which
    urlsplit then reads as host, port or path, so no part of the URL can be shown safely."""
    return "@" not in parts.netloc and "@" in f"{parts.path}{parts.query}{parts.fragment}"


def _check_port(url: str, what: str, hostport: str) -> None:
    """The port of one ``host[:port]`` (``[v6]:port``: the colons inside brackets are the address's)."""
    if hostport.rfind(":") > hostport.rfind("]"):
        port = hostport.rpartition(":")[2]
        if port:
            _check_port_number(url, what, port)


def _check_port_number(url: str, what: str, port: str) -> None:
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= _MAX_PORT:
        raise _invalid(what, url, f"port {port!r} is not a number between 1 and {_MAX_PORT}")


def _invalid(what: str, url: str, detail: str) -> ValueError:
    return ValueError(f"invalid {what} URL {redact_url(url)!r}: {detail}")


def _query_items(parts: SplitResult) -> Iterator[tuple[str, str, str]]:
    return (item.partition("=") for item in parts.query.split("&") if item)


def _is_secret_key(key: str) -> bool:
    return unquote(key).lower() in SECRET_QUERY_KEYS
