"""Every query the console runs: bounded (keyset pages, limits), parameterised, read-only.

The connections decode ``json`` / ``jsonb`` to Python values (:func:`init_connection`), as the
ingestor's do: the JSONL line of a session is built by the ingestor's own function on them.

Pure pieces (the list filter and its SQL) are apart from the database calls so they are tested without
one. Lists page by keyset on ``sessions.id`` (newest first; on ``(created_at, id)`` when narrowed to a
time range), never by ``OFFSET``: a page deep in a million sessions costs what the first one does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

import asyncpg
import orjson

MAX_STEPS_SHOWN: Final = 300
"""Steps one session page shows (a session with more says how many are left out)."""
SHOWN_TEXT_CHARS: Final = 20_000
"""Characters of one text (task, trace, output, answer) a page reads and shows: PostgreSQL cuts it
(``left``), so a session of long traces costs a bounded page; the whole text is in the JSONL line."""
MAX_ATTEMPTS_SHOWN: Final = 50
MAX_PROBLEMS_SHOWN: Final = 50
RATE_WINDOW_S: Final = 600
RATE_BUCKET_S: Final = 10
NEWEST_FILES: Final = 8
STATUSES: Final = ("running", "succeeded", "failed", "abandoned")


async def init_connection(conn: asyncpg.Connection) -> None:
    """``json`` / ``jsonb`` columns arrive as Python values (what ``ingestor.fetch_line_map`` expects)."""
    for name in ("jsonb", "json"):
        await conn.set_type_codec(
            name, encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads, schema="pg_catalog"
        )


@dataclass(frozen=True, slots=True)
class SessionFilter:
    """What the sessions list is narrowed to; every field optional. ``q`` is a task id or an adapter
    session id, matched exactly (both are indexed)."""

    q: str | None = None
    adapter: str | None = None
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    attempt: int | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> SessionFilter:
        """From a page's query string; a value that does not parse is ignored (it is shown back as
        given, and the list is simply not narrowed by it)."""
        return cls(
            q=_text(query.get("q")),
            adapter=_text(query.get("adapter")),
            status=_text(query.get("status")),
            since=_time(query.get("since")),
            until=_time(query.get("until")),
            attempt=_int(query.get("attempt")),
        )

    def where(self, first_param: int = 1) -> tuple[str, list[Any]]:
        """``(sql, params)``: the ``WHERE`` conditions (``TRUE`` when none), numbered from
        ``first_param``."""
        conditions: list[str] = []
        params: list[Any] = []

        def add(sql: str, *values: Any) -> None:
            numbers = [f"${first_param + len(params) + i}" for i in range(len(values))]
            conditions.append(sql.format(*numbers))
            params.extend(values)

        if self.q is not None:
            add("(task_id = {0} OR adapter_session_id = {0})", self.q)
        if self.adapter is not None:
            add("metadata->>'adapter' = {0}", self.adapter)
        if self.status is not None:
            add("status = {0}", self.status)
        if self.since is not None:
            add("created_at >= {0}", self.since)
        if self.until is not None:
            add("created_at < {0}", self.until)
        if self.attempt is not None:
            add("attempt = {0}", self.attempt)
        return (" AND ".join(conditions) or "TRUE"), params

    def query_string(self) -> dict[str, str]:
        """The filter as query parameters (for the next / previous page links)."""
        pairs = {
            "q": self.q,
            "adapter": self.adapter,
            "status": self.status,
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "attempt": str(self.attempt) if self.attempt is not None else None,
        }
        return {k: v for k, v in pairs.items() if v is not None}


def _text(value: str | None) -> str | None:
    value = (value or "").strip()
    return value[:500] or None


def _int(value: str | None) -> int | None:
    text = (value or "").strip()
    if not text.isdigit() or len(text) > 9:
        return None
    return int(text)


def _time(value: str | None) -> datetime | None:
    """ISO 8601, as a ``datetime-local`` input sends it; UTC when it names no offset."""
    text = (value or "").strip()
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=datetime.now().astimezone().tzinfo)


Direction = Literal["older", "newer"]

_LIST_COLUMNS: Final = """
    s.id, s.task_id, s.task, s.status, s.attempt, s.metadata->>'adapter' AS adapter, s.created_at,
    s.completed_at, s.stored_at, s.export_file, s.adapter_usage->>'total_tokens' AS tokens,
    (SELECT count(*) FROM step_results r WHERE r.session_id = s.id) AS steps"""


def list_sql(where: str, n_params: int, direction: Direction | None, *, by_time: bool = False) -> str:
    """The page query: ``$1`` is the limit, then the filter's parameters, then the keyset id (when
    paging). Newest first; a ``newer`` page is read oldest-first and reversed by the caller.

    ``by_time`` (the filter has a time range): newest first by ``(created_at, id)``, the keyset being the
    boundary session's ``(created_at, id)``. Ordered by id, PostgreSQL would walk the primary key from the
    newest session and filter on ``created_at`` (it expects the range's rows spread over all ids, but
    they sit together): a day a fortnight back read half a million rows for one page. By ``created_at``
    it walks the range in ``sessions_created_at_idx`` and stops at the page's end, wherever the range is.
    """
    # Only fixed fragments are joined here; every value is a numbered parameter.
    k = f"${n_params + 2}"
    key, bound = "s.id", k
    if by_time:
        key, bound = "(s.created_at, s.id)", f"((SELECT created_at FROM sessions WHERE id = {k}), {k})"  # noqa: S608
    keyset = ""
    order = "DESC"
    if direction == "older":
        keyset = f" AND {key} < {bound}"
    elif direction == "newer":
        keyset = f" AND {key} > {bound}"
        order = "ASC"
    order_by = f"s.created_at {order}, s.id {order}" if by_time else f"s.id {order}"
    return f"SELECT {_LIST_COLUMNS} FROM sessions s WHERE {where}{keyset} ORDER BY {order_by} LIMIT $1"  # noqa: S608


@dataclass(frozen=True, slots=True)
class SessionPage:
    rows: Sequence[Mapping[str, Any]]
    has_older: bool
    has_newer: bool

    @property
    def oldest_id(self) -> int | None:
        return int(self.rows[-1]["id"]) if self.rows else None

    @property
    def newest_id(self) -> int | None:
        return int(self.rows[0]["id"]) if self.rows else None


async def list_sessions(
    conn: asyncpg.Connection,
    flt: SessionFilter,
    *,
    page_size: int,
    before: int | None = None,
    after: int | None = None,
) -> SessionPage:
    """One page, newest first: the newest overall, those older than ``before``, or newer than ``after``."""
    where, params = flt.where(first_param=2)
    direction: Direction | None = "older" if before is not None else "newer" if after is not None else None
    sql = list_sql(where, len(params), direction, by_time=flt.since is not None or flt.until is not None)
    args: list[Any] = [page_size + 1, *params]
    if direction is not None:
        args.append(before if direction == "older" else after)
    rows = [dict(r) for r in await conn.fetch(sql, *args)]
    more = len(rows) > page_size
    rows = rows[:page_size]
    if direction == "newer":
        rows.reverse()
        return SessionPage(rows, has_older=True, has_newer=more)
    return SessionPage(rows, has_older=more, has_newer=direction == "older")


@dataclass(frozen=True, slots=True)
class SessionDetail:
    session: Mapping[str, Any]
    steps: Sequence[Mapping[str, Any]]
    steps_total: int
    plan: Any
    attempts: Sequence[Mapping[str, Any]]
    ledger: Mapping[str, Any] | None
    problems: Sequence[Mapping[str, Any]] = field(default_factory=list)


_SESSION: Final = """
SELECT id, left(task, $2) AS task, length(task) AS task_chars, status, metadata,
       left(final_answer, $2) AS final_answer, length(final_answer) AS final_answer_chars, created_at,
       completed_at, stored_at, adapter_session_id, adapter_usage, adapter_events, task_id, attempt,
       steps_expected, export_file
FROM sessions WHERE id = $1"""
_STEPS: Final = """
SELECT step_id, left(trace, $3) AS trace, length(trace) AS trace_chars, left(output, $3) AS output,
       length(output) AS output_chars, attempts, metadata, adapter_usage, adapter_events
FROM step_results WHERE session_id = $1 ORDER BY step_id LIMIT $2"""
_STEP_COUNT: Final = "SELECT count(*) FROM step_results WHERE session_id = $1"
_PLAN: Final = "SELECT plan FROM plans WHERE session_id = $1"
_ATTEMPTS: Final = """
SELECT id, attempt, status, created_at, completed_at FROM sessions
WHERE task_id = $1 ORDER BY attempt NULLS FIRST, id LIMIT $2"""
_LEDGER: Final = "SELECT state, attempts, updated_at, last_error FROM task_ledger WHERE task_id = $1"
_PROBLEMS: Final = """
SELECT problem, reason, seq, kind, occurrences, last_seen FROM telemetry_problems
WHERE adapter_session_id = $1 OR task_id = $2 ORDER BY last_seen DESC LIMIT $3"""


async def session_detail(conn: asyncpg.Connection, session_id: int) -> SessionDetail | None:
    row = await conn.fetchrow(_SESSION, session_id, SHOWN_TEXT_CHARS)
    if row is None:
        return None
    session = dict(row)
    steps = [dict(r) for r in await conn.fetch(_STEPS, session_id, MAX_STEPS_SHOWN, SHOWN_TEXT_CHARS)]
    total = len(steps) if len(steps) < MAX_STEPS_SHOWN else int(await conn.fetchval(_STEP_COUNT, session_id))
    plan = await conn.fetchval(_PLAN, session_id)
    task_id = session.get("task_id")
    attempts: list[Mapping[str, Any]] = []
    ledger = None
    if task_id is not None:
        attempts = [dict(r) for r in await conn.fetch(_ATTEMPTS, task_id, MAX_ATTEMPTS_SHOWN)]
        found = await conn.fetchrow(_LEDGER, task_id)
        ledger = dict(found) if found is not None else None
    problems = [
        dict(r)
        for r in await conn.fetch(
            _PROBLEMS, session.get("adapter_session_id") or "", task_id, MAX_PROBLEMS_SHOWN
        )
    ]
    return SessionDetail(session, steps, total, plan, attempts, ledger, problems)


_SUCCEEDED_BUCKETS: Final = """
SELECT floor(extract(epoch FROM updated_at) / $1)::bigint AS bucket, count(*) AS n FROM task_ledger
WHERE state = 'succeeded' AND updated_at > now() - make_interval(secs => $2) GROUP BY 1"""
_STORED_BUCKETS: Final = """
SELECT floor(extract(epoch FROM stored_at) / $1)::bigint AS bucket, count(*) AS n FROM sessions
WHERE stored_at IS NOT NULL AND stored_at > now() - make_interval(secs => $2) GROUP BY 1"""
_NOW: Final = "SELECT floor(extract(epoch FROM now()) / $1)::bigint"


@dataclass(frozen=True, slots=True)
class Rates:
    """Per ``bucket_s`` over the last ``window_s``, oldest first: tasks succeeded (the ledger) and
    sessions stored (complete in PostgreSQL with their JSONL line assigned), as per-second rates."""

    bucket_s: int
    succeeded: list[float]
    stored: list[float]

    @property
    def last_succeeded(self) -> float:
        return self.succeeded[-2] if len(self.succeeded) > 1 else 0.0

    @property
    def last_stored(self) -> float:
        return self.stored[-2] if len(self.stored) > 1 else 0.0


def bucket_rates(counts: Mapping[int, int], now_bucket: int, n: int, bucket_s: int) -> list[float]:
    """Counts by bucket number into ``n`` per-second rates ending at ``now_bucket`` (a missing bucket
    is zero)."""
    return [counts.get(b, 0) / bucket_s for b in range(now_bucket - n + 1, now_bucket + 1)]


async def rates(
    conn: asyncpg.Connection, *, window_s: int = RATE_WINDOW_S, bucket_s: int = RATE_BUCKET_S
) -> Rates:
    now_bucket = int(await conn.fetchval(_NOW, bucket_s))
    n = window_s // bucket_s
    out: list[list[float]] = []
    for sql in (_SUCCEEDED_BUCKETS, _STORED_BUCKETS):
        counts = {int(r["bucket"]): int(r["n"]) for r in await conn.fetch(sql, bucket_s, float(window_s))}
        out.append(bucket_rates(counts, now_bucket, n, bucket_s))
    return Rates(bucket_s, out[0], out[1])


_FILES: Final = """
SELECT name, state, sessions, created_at, finalized_at FROM jsonl_files
ORDER BY created_at DESC, name DESC LIMIT $1"""


async def newest_files(conn: asyncpg.Connection, limit: int = NEWEST_FILES) -> list[Mapping[str, Any]]:
    return [dict(r) for r in await conn.fetch(_FILES, limit)]


async def adapters(conn: asyncpg.Connection) -> Sequence[str]:
    """Adapter names for the filter's choices: from the newest sessions only (bounded)."""
    rows = await conn.fetch(
        "SELECT DISTINCT metadata->>'adapter' AS a FROM (SELECT metadata FROM sessions ORDER BY id DESC "
        "LIMIT 2000) s WHERE metadata->>'adapter' IS NOT NULL ORDER BY 1"
    )
    return [str(r["a"]) for r in rows]


def parse_id(value: str | None) -> int | None:
    """A keyset id from a query string (``before`` / ``after``); anything else is no id."""
    text = (value or "").strip()
    return int(text) if text.isdigit() and len(text) <= 10 else None
