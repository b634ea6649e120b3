"""HTTP plumbing shared by the HTTP adapters: one lazily created aiohttp pool, JSON POSTs with retries.

* Every POST has a per-request timeout. 5xx, 429, timeouts and connection errors are retried up to
  ``max_retries`` times with exponential backoff (``backoff_s * 2**(n-1)``, capped at 30 s, jittered:
  :class:`atlas_common.Backoff`);
  a ``Retry-After`` header (seconds or an HTTP date) replaces the backoff, capped at
  ``max_retry_after_s``. Other non-2xx statuses (4xx, and 3xx: redirects are not followed, so auth
  headers never travel to another host) raise at once. Every failure is an :class:`AdapterHTTPError`
  carrying the status (``None`` for timeouts/connection errors) and the number of attempts.
* Header values may carry credentials: they are never logged, never put in an exception or a repr, and
  any secret value that a server echoes back in an error body is replaced by ``***``. URLs in messages
  and logs are shown without user info, query string or fragment.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import orjson
import structlog

from atlas_common import Backoff, scrub_text, strip_url
from worker.sessions import AdapterConfigError, WorkerError

log = structlog.get_logger("worker.adapters")

SNIPPET_CHARS: Final = 500
"""How much of an error response body goes into an exception message."""
MAX_BACKOFF_S: Final = 30.0
_MIN_SECRET_CHARS: Final = 4
_HEADER_NAME: Final = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class AdapterHTTPError(WorkerError):
    """An HTTP adapter request failed: a non-retryable status, or retries exhausted, or a bad response.

    ``status`` is the last HTTP status (``None`` after a timeout or connection error), ``attempts`` how
    many requests were made, ``url`` the redacted URL. The message never contains header values.
    """

    def __init__(self, message: str, *, url: str, status: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.attempts = attempts


def check_url(url: str, what: str) -> str:
    """``url`` if it is an absolute http(s) URL with a host, else :class:`AdapterConfigError`."""
    if not isinstance(url, str) or not url.strip():
        raise AdapterConfigError(f"{what} must be a non-empty http(s) URL")
    url = url.strip()
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        raise AdapterConfigError(f"{what} {strip_url(url)!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AdapterConfigError(f"{what} {strip_url(url)!r} must be an absolute http:// or https:// URL")
    return url


def check_headers(headers: Mapping[str, str] | None, what: str) -> dict[str, str]:
    """A validated copy of ``headers``; errors name the header, never its value."""
    checked: dict[str, str] = {}
    for name, value in (headers or {}).items():
        check_header_name(name, what)
        if not isinstance(value, str):
            raise AdapterConfigError(f"{what}: the value of header {name!r} must be a str")
        if any(ch in value for ch in "\r\n\0"):
            raise AdapterConfigError(f"{what}: the value of header {name!r} contains a line break or NUL")
        checked[name] = value
    return checked


def check_header_name(name: Any, what: str) -> None:
    if not isinstance(name, str) or not _HEADER_NAME.match(name):
        raise AdapterConfigError(f"{what}: {name!r} is not a valid HTTP header name")


def secret_values(values: Iterable[str]) -> frozenset[str]:
    """The strings to scrub from error text: each value, and the token of a ``"Scheme token"`` value."""
    secrets: set[str] = set()
    for value in values:
        secrets.add(value.strip())
        parts = value.split()
        if len(parts) > 1:
            secrets.add(parts[-1])
    return frozenset(s for s in secrets if len(s) >= _MIN_SECRET_CHARS)


def snippet(body: bytes, secrets: Collection[str]) -> str:
    """The start of a response body for an error message (decoded leniently, secrets scrubbed)."""
    text = body[: SNIPPET_CHARS * 4].decode("utf-8", errors="replace").strip()
    text = scrub_text(text, secrets)
    if len(text) > SNIPPET_CHARS:
        text = text[: SNIPPET_CHARS - 1] + "…"
    return text or "(empty body)"


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or an HTTP date); ``None`` if unusable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to retry. ``max_retries`` is the number of *extra* attempts."""

    max_retries: int = 3
    backoff_s: float = 0.2
    max_retry_after_s: float = 30.0

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_retries, bool)
            or not isinstance(self.max_retries, int)
            or self.max_retries < 0
        ):
            raise AdapterConfigError("max_retries must be a non-negative integer")
        if self.backoff_s < 0:
            raise AdapterConfigError("retry_backoff_s must not be negative")
        if self.max_retry_after_s < 0:
            raise AdapterConfigError("max_retry_after_s must not be negative")

    def backoff(self) -> Backoff:
        """The delays of one request's retries (a new one per request)."""
        return Backoff(initial_s=min(self.backoff_s, MAX_BACKOFF_S), max_s=MAX_BACKOFF_S)

    def delay(self, backoff: Backoff, retry_after: float | None) -> float:
        """Seconds to sleep after a failed attempt: the server's ``Retry-After`` when it sent one (capped at
        ``max_retry_after_s``), else the next backoff. The backoff advances either way, so a server that
        stops sending Retry-After does not bring the wait back to its start."""
        backed_off = backoff.next()
        return backed_off if retry_after is None else min(retry_after, self.max_retry_after_s)


def check_timeout(timeout_s: float) -> float:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not timeout_s > 0:
        raise AdapterConfigError("timeout_s must be a positive number")
    return float(timeout_s)


@dataclass(frozen=True, slots=True)
class HTTPReply:
    """A 2xx response, fully read."""

    status: int
    content_type: str
    body: bytes
    attempts: int

    @property
    def is_json(self) -> bool:
        ctype = self.content_type.lower()
        return ctype == "application/json" or ctype.endswith("+json")

    def decoded(self) -> Any:
        """The JSON value for a JSON content type (text if it does not parse), else the body as text."""
        if self.is_json and self.body.strip():
            try:
                return orjson.loads(self.body)
            except orjson.JSONDecodeError:
                pass
        return self.body.decode("utf-8", errors="replace")


_RETRYABLE_ERRORS: Final = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)


def _retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


class JSONPoster:
    """POSTs JSON through one aiohttp ``ClientSession`` (connection pool), created on first use.

    The pool belongs to the event loop that created it; used from another loop (a new ``asyncio.run``),
    a new pool is made. :meth:`aclose` closes the pool; a later POST opens a new one.
    """

    def __init__(self, policy: RetryPolicy, *, timeout_s: float) -> None:
        self.policy = policy
        self.timeout_s = check_timeout(timeout_s)
        self._client: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client.closed or self._loop is not loop:
            self._client = aiohttp.ClientSession()
            self._loop = loop
        return self._client

    async def aclose(self) -> None:
        """Close the connection pool (if one is open on the running loop)."""
        client, self._client = self._client, None
        if client is not None and not client.closed and self._loop is asyncio.get_running_loop():
            await client.close()

    async def post(
        self,
        url: str,
        body: Any,
        *,
        headers: Mapping[str, str],
        secrets: Collection[str],
        what: str,
    ) -> HTTPReply:
        """POST ``body`` (JSON-able) to ``url``: the 2xx reply, or :class:`AdapterHTTPError` (module doc)."""
        data = orjson.dumps(body)
        all_headers = {"Content-Type": "application/json", "Accept": "application/json", **headers}
        safe_url = strip_url(url)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        attempts = self.policy.max_retries + 1
        backoff = self.policy.backoff()
        for attempt in range(1, attempts + 1):
            status: int | None = None
            retry_after: float | None = None
            try:
                async with self._session().post(
                    url, data=data, headers=all_headers, timeout=timeout, allow_redirects=False
                ) as response:
                    status = response.status
                    content = await response.read()
                    content_type = response.content_type
                    retry_after_header = response.headers.get("Retry-After")
            except TimeoutError:
                status = None
                problem = f"timed out after {self.timeout_s:g}s"
            except _RETRYABLE_ERRORS as exc:
                status = None
                problem = f"connection error: {scrub_text(f'{type(exc).__name__}: {exc}', secrets)}"
            except aiohttp.ClientError as exc:  # a bad URL, an unreadable response: retrying cannot help
                detail = scrub_text(f"{type(exc).__name__}: {exc}", secrets)
                raise AdapterHTTPError(
                    f"{what}: POST {safe_url} failed: {detail}", url=safe_url, attempts=attempt
                ) from None
            else:
                if 200 <= status < 300:
                    return HTTPReply(status=status, content_type=content_type, body=content, attempts=attempt)
                problem = f"HTTP {status}: {snippet(content, secrets)}"
                if not _retryable_status(status):
                    raise AdapterHTTPError(
                        f"{what}: POST {safe_url} returned {problem}",
                        url=safe_url,
                        status=status,
                        attempts=attempt,
                    )
                retry_after = parse_retry_after(retry_after_header)
            if attempt == attempts:
                break
            delay = self.policy.delay(backoff, retry_after)
            log.warning(
                "http.retrying",
                what=what,
                url=safe_url,
                attempt=attempt,
                attempts=attempts,
                problem=problem,
                retry_in_s=round(delay, 2),
            )
            await asyncio.sleep(delay)
        plural = "s" if attempts != 1 else ""
        raise AdapterHTTPError(
            f"{what}: POST {safe_url} failed after {attempts} attempt{plural}: {problem}",
            url=safe_url,
            status=status,
            attempts=attempts,
        )
