"""``python -m producer audit``: is every task the ledger calls succeeded stored and exported, exactly once?

The pipeline's promise: every task whose ``task_ledger`` state is ``succeeded`` has its session (status
``succeeded``, every step) in ``sessions`` / ``step_results`` and is assigned to a JSONL file that is
final; with ``--jsonl-dir`` the finalised files are read too, and the session must be in exactly one line.
The audit reconciles the four and sorts every succeeded task into one of:

- **exported**: the promise holds;
- **pruned**: exported, then deleted by ``ingestor prune`` (no session left, and the ledger row is older
  than the newest ``--before`` a prune recorded in ``retention``): its line is in the JSONL archive;
- **in flight**: younger than the grace period (``--grace-s``; JSONL files become final within
  ``JSONL_MAX_AGE_S``), so not a finding yet;
- **explained**: not (yet) exported, and the pipeline recorded why: rows in ``telemetry_problems`` (records
  the ingestor refused, a session flagged incomplete) or a telemetry dead letter naming the session or task;
- **unexplained**: not exported and nothing says why. This must be zero; the exit status is 1 otherwise.

Dead letters are read without consuming them (``basic.get`` without ack, all handed back), up to
``--dead-letter-limit`` of them.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

import asyncpg
import orjson

from atlas_common import DB_ERRORS, Topology, redact_url
from producer._deadletters import read_dead_letters
from producer._errors import ProducerError

Verdict = Literal["exported", "in_flight", "explained", "unexplained"]
_SHOWN_PER_SESSION: Final = 3

_SUCCEEDED: Final = """
SELECT l.task_id, l.adapter_session_id, l.updated_at AS succeeded_at,
       s.id AS session_id, s.status, s.steps_expected, s.export_file, s.attempt,
       f.state AS file_state,
       CASE WHEN s.export_file IS NULL AND s.id IS NOT NULL
            THEN (SELECT count(*) FROM step_results AS r WHERE r.session_id = s.id) END AS stored_steps,
       (s.id IS NULL AND l.updated_at < $2::timestamptz) IS TRUE AS pruned
FROM task_ledger AS l
LEFT JOIN sessions AS s ON s.adapter_session_id = l.adapter_session_id
LEFT JOIN jsonl_files AS f ON f.name = s.export_file
WHERE l.state = 'succeeded' AND ($1::timestamptz IS NULL OR l.updated_at >= $1)
ORDER BY l.updated_at, l.task_id
"""
_PROBLEMS: Final = """
SELECT adapter_session_id, task_id, seq, problem, reason, occurrences FROM telemetry_problems
WHERE adapter_session_id = ANY($1::text[]) OR task_id = ANY($2::text[])
ORDER BY last_seen DESC
"""
_FINAL_FILES: Final = "SELECT name FROM jsonl_files WHERE state = 'final' ORDER BY name"
_UNACCOUNTED: Final = """
SELECT count(*) FROM task_ledger AS l
LEFT JOIN sessions AS s ON s.adapter_session_id = l.adapter_session_id
LEFT JOIN jsonl_files AS f ON f.name = s.export_file
WHERE l.state = 'succeeded' AND l.updated_at < now() - $1::interval
  AND (s.id IS NULL OR s.status <> 'succeeded' OR f.state IS DISTINCT FROM 'final')
  AND (s.id IS NULL AND l.updated_at < $2::timestamptz) IS NOT TRUE
"""
_HAS_RETENTION: Final = "SELECT to_regclass('retention') IS NOT NULL"
_PRUNED_BEFORE: Final = "SELECT max(pruned_before) FROM retention"


async def pruned_before(conn: asyncpg.Connection) -> datetime | None:
    """The newest ``--before`` of ``ingestor prune`` (``retention``, migration 009): a succeeded task whose
    ledger row is older and whose session is gone was pruned after export. None: never pruned (or 009 is
    not applied yet)."""
    if not await conn.fetchval(_HAS_RETENTION):
        return None
    found: datetime | None = await conn.fetchval(_PRUNED_BEFORE)
    return found


async def count_unaccounted(conn: asyncpg.Connection, grace_s: float) -> int:
    """Succeeded tasks not stored and in a final JSONL file ``grace_s`` after they succeeded (the figure
    ``status`` shows; ``run_audit`` lists and explains them); pruned ones are not counted."""
    return int(await conn.fetchval(_UNACCOUNTED, timedelta(seconds=grace_s), await pruned_before(conn)))


class AuditError(ProducerError):
    """The audit cannot run (PostgreSQL unreachable, tables missing)."""


@dataclass(frozen=True, slots=True)
class Finding:
    """A succeeded task that is not (yet) exported, and what is known about why."""

    task_id: str
    adapter_session_id: str | None
    succeeded_at: datetime
    verdict: Verdict
    state: str
    """What the tables say (e.g. ``no session stored``, ``2 of 5 steps stored``)."""
    reasons: list[str] = field(default_factory=list)
    """What the pipeline recorded about it (problem rows, dead letters)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "adapter_session_id": self.adapter_session_id,
            "succeeded_at": self.succeeded_at.isoformat(),
            "verdict": self.verdict,
            "state": self.state,
            "reasons": self.reasons,
        }


@dataclass(slots=True)
class AuditReport:
    checked: int = 0
    exported: int = 0
    pruned: int = 0
    """Exported, then deleted by ``ingestor prune`` (no session left, ledger row older than its horizon)."""
    findings: list[Finding] = field(default_factory=list)
    jsonl_checked: bool = False
    dead_letters_read: int = 0

    def count(self, verdict: Verdict) -> int:
        if verdict == "exported":
            return self.exported
        return sum(1 for f in self.findings if f.verdict == verdict)

    @property
    def unexplained(self) -> int:
        return self.count("unexplained")

    def to_json(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "exported": self.exported,
            "pruned": self.pruned,
            "in_flight": self.count("in_flight"),
            "explained": self.count("explained"),
            "unexplained": self.unexplained,
            "jsonl_checked": self.jsonl_checked,
            "dead_letters_read": self.dead_letters_read,
            "findings": [f.to_json() for f in self.findings],
        }


@dataclass(frozen=True, slots=True)
class _Row:
    task_id: str
    adapter_session_id: str | None
    succeeded_at: datetime
    status: str | None
    steps_expected: int | None
    stored_steps: int | None
    export_file: str | None
    file_state: str | None
    attempt: int | None
    session_id: int | None
    pruned: bool


def _state(row: _Row, lines: Counter[str] | None) -> str | None:  # noqa: PLR0911 -- one return per finding
    """What is wrong with this task's data, or None when it is stored and exported exactly once."""
    if row.session_id is None:
        return "no session stored"
    if row.attempt is None:
        return "session stored without its session.opened"
    if row.status != "succeeded":
        return f"session status is {row.status!r}, not 'succeeded'"
    if row.export_file is None:
        if row.steps_expected is None:
            return "session has no close stored"
        return f"{row.stored_steps} of {row.steps_expected} steps stored; not assigned to a JSONL file"
    if row.file_state != "final":
        return f"assigned to {row.export_file}, which is not final yet"
    if lines is not None:
        found = lines.get(row.adapter_session_id or "", 0)
        if found != 1:
            return f"in {found} finalised JSONL lines, not exactly one"
    return None


def _rows(records: Iterable[Any]) -> Iterator[_Row]:
    for record in records:
        yield _Row(**dict(record))  # the query selects exactly the fields of _Row


def count_lines(jsonl_dir: Path, names: Iterable[str]) -> Counter[str]:
    """``adapter_session_id`` -> number of lines across the finalised files ``names`` in ``jsonl_dir``."""
    from ingestor import read_lines

    counts: Counter[str] = Counter()
    for name in names:
        path = jsonl_dir / name
        if path.resolve().parent != jsonl_dir.resolve() or not path.is_file():
            continue
        for line in read_lines(path):
            with contextlib.suppress(orjson.JSONDecodeError):
                record = orjson.loads(line)
                if isinstance(record, dict):
                    counts[str(record.get("adapter_session_id"))] += 1
    return counts


def _dead_letter_reasons(letters: Iterable[tuple[str | None, bytes]]) -> dict[str, list[str]]:
    """Session and task ids named by telemetry dead letters -> their reasons."""
    found: dict[str, list[str]] = {}
    for reason, body in letters:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            continue
        items = data.get("records") if isinstance(data, dict) else None
        for item in items if isinstance(items, list) else [data]:
            if not isinstance(item, dict):
                continue
            for key in ("adapter_session_id", "task_id"):
                value = item.get(key)
                if isinstance(value, str):
                    found.setdefault(value, []).append(f"dead letter: {reason or 'no reason given'}")
    return found


async def run_audit(
    database_url: str,
    *,
    amqp_url: str | None = None,
    topology: Topology | None = None,
    jsonl_dir: Path | None = None,
    grace_s: float = 600.0,
    since: datetime | None = None,
    dead_letter_limit: int = 10_000,
    now: datetime | None = None,
    connect_timeout_s: float = 10.0,
) -> AuditReport:
    """Reconcile ledger, tables, dead letters and (with ``jsonl_dir``) the JSONL files."""
    try:
        conn = await asyncpg.connect(database_url, timeout=connect_timeout_s)
    except DB_ERRORS as exc:
        raise AuditError(f"cannot reach PostgreSQL at {redact_url(database_url)}: {exc}") from exc
    report = AuditReport()
    try:
        lines: Counter[str] | None = None
        if jsonl_dir is not None:
            names = [r["name"] for r in await conn.fetch(_FINAL_FILES)]
            lines = count_lines(jsonl_dir, names)
            report.jsonl_checked = True
        pending = await _walk_succeeded(conn, since, lines, report)
        problems = await _problems(conn, pending)
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError) as exc:
        raise AuditError(f"the database is not migrated ({exc}): run `python -m migrations`") from exc
    except DB_ERRORS as exc:
        raise AuditError(f"PostgreSQL query failed: {exc}") from exc
    finally:
        with contextlib.suppress(*DB_ERRORS):
            await conn.close()
    dead: dict[str, list[str]] = {}
    if pending and amqp_url is not None and topology is not None and dead_letter_limit > 0:
        letters = await read_dead_letters(amqp_url, topology, "telemetry", limit=dead_letter_limit)
        report.dead_letters_read = len(letters)
        dead = _dead_letter_reasons((info.reason_text(), body) for info, body in letters)
    cutoff = (now or datetime.now(UTC)) - timedelta(seconds=grace_s)
    for row, state in pending:
        reasons = problems.get(row.adapter_session_id or "", []) + problems.get(row.task_id, [])
        reasons += dead.get(row.adapter_session_id or "", []) + dead.get(row.task_id, [])
        if row.succeeded_at > cutoff:
            verdict: Verdict = "in_flight"
        else:
            verdict = "explained" if reasons else "unexplained"
        report.findings.append(
            Finding(row.task_id, row.adapter_session_id, row.succeeded_at, verdict, state, reasons)
        )
    return report


async def _walk_succeeded(
    conn: asyncpg.Connection, since: datetime | None, lines: Counter[str] | None, report: AuditReport
) -> list[tuple[_Row, str]]:
    """Count every succeeded task into ``report``; returns the ones not (yet) exported, with their state."""
    pending: list[tuple[_Row, str]] = []
    horizon = await pruned_before(conn)
    async with conn.transaction(readonly=True):
        async for record in conn.cursor(_SUCCEEDED, since, horizon, prefetch=2000):
            row = next(_rows([record]))
            report.checked += 1
            if row.pruned:
                report.pruned += 1
                continue
            state = _state(row, lines)
            if state is None:
                report.exported += 1
            else:
                pending.append((row, state))
    return pending


async def _problems(conn: asyncpg.Connection, pending: list[tuple[_Row, str]]) -> dict[str, list[str]]:
    if not pending:
        return {}
    sessions = [row.adapter_session_id for row, _ in pending if row.adapter_session_id]
    tasks = [row.task_id for row, _ in pending]
    found: dict[str, list[str]] = {}
    for r in await conn.fetch(_PROBLEMS, sessions, tasks):
        where = "session" if r["seq"] < 0 else f"record seq {r['seq']}"
        text = f"{r['problem']} ({where}, seen {r['occurrences']}x): {r['reason']}"
        for key in (r["adapter_session_id"], r["task_id"]):
            if key and len(found.setdefault(key, [])) < _SHOWN_PER_SESSION:
                found[key].append(text)
    return found


def audit_text(report: AuditReport, *, limit: int = 50) -> str:
    lines = [
        f"succeeded tasks checked: {report.checked}",
        f"  stored and exported:   {report.exported}"
        + (" (each in exactly one finalised JSONL line)" if report.jsonl_checked else ""),
        f"  pruned after export:   {report.pruned} (sessions deleted by `ingestor prune`)",
        f"  in flight (in grace):  {report.count('in_flight')}",
        f"  explained:             {report.count('explained')}",
        f"  unexplained:           {report.unexplained}",
    ]
    if not report.jsonl_checked:
        lines.append("(JSONL files not read: pass --jsonl-dir to check lines too)")
    shown = [f for f in report.findings if f.verdict != "in_flight"][:limit]
    for finding in shown:
        lines.append(
            f"- {finding.task_id} [{finding.verdict}] session {finding.adapter_session_id}: {finding.state}"
        )
        lines.extend(f"    {reason}" for reason in finding.reasons)
    hidden = len([f for f in report.findings if f.verdict != "in_flight"]) - len(shown)
    if hidden > 0:
        lines.append(f"... and {hidden} more (use --json for all)")
    return "\n".join(lines)
