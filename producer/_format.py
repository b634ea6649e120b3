"""Human-readable text for ``status`` and ``dead`` (the ``--json`` output is the objects' ``to_json``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from producer._deadletters import DeadLetterInfo, DeadLetterListing, RequeueReport
from producer._status import IngestionLag, PipelineStatus


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]], *, right: frozenset[int]) -> list[str]:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return [line(header), *(line(row) for row in rows)]


def _counts(counts: dict[str, int] | None) -> str:
    if counts is None:
        return "unavailable"
    if not counts:
        return "none"
    return ", ".join(f"{key} {n}" for key, n in counts.items())


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.isoformat(timespec="seconds")


def _seconds(value: float) -> str:
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def lag_text(lag: IngestionLag) -> str:
    match lag.state:
        case "empty":
            return "0 (queue empty)"
        case "ok" if lag.seconds is not None:
            return (
                f"{_seconds(lag.seconds)} (oldest unacked telemetry emitted {_when(lag.oldest_emitted_at)})"
            )
        case "absent":
            return "unknown (the ingestor queue does not exist yet)"
        case _:
            return f"unknown ({lag.detail or lag.state})"


def status_text(status: PipelineStatus) -> str:
    out = [f"RabbitMQ {status.broker_url} (prefix {status.prefix})", ""]
    rows = [
        (q.name, q.role, str(q.ready), str(q.consumers)) if q.present else (q.name, q.role, "absent", "-")
        for q in status.queues
    ]
    out += _table(("queue", "role", "ready", "consumers"), rows, right=frozenset({2, 3}))
    out += ["", f"ingestion lag: {lag_text(status.ingestion_lag)}", ""]
    db = status.database
    out.append(f"PostgreSQL {db.url}")
    if not db.reachable:
        out.append(f"  unavailable: {db.error}")
        return "\n".join(out)
    out.append(f"  sessions by status (rows with a task_id): {_counts(db.sessions_by_status)}")
    out.append(f"  task ledger by state: {_counts(db.ledger_by_state)}")
    if db.unaccounted is not None:
        minutes = f"{db.unaccounted_grace_s / 60:g} min"
        hint = " (python -m producer audit lists them)" if db.unaccounted else ""
        out.append(f"  succeeded but not stored and exported after {minutes}: {db.unaccounted}{hint}")
    newest = db.newest_jsonl_file
    if newest is not None:
        out.append(
            f"  newest finalized JSONL file: {newest.name} "
            f"({newest.sessions} sessions, finalized {_when(newest.finalized_at)})"
        )
    elif "table jsonl_files" not in db.missing:
        out.append("  newest finalized JSONL file: none yet")
    if db.missing:
        out.append(f"  missing: {'; '.join(db.missing)}")
    return "\n".join(out)


def _letter_lines(n: int, info: DeadLetterInfo) -> list[str]:
    lines = [f"[{n}] {info.message_id or '<no message_id>'}  ({info.body_size} bytes)"]
    lines.append(f"    reason:      {info.reason_text() or '-'}")
    lines.append(
        f"    source:      {info.source or '-'}   routing key: {info.original_routing_key or '-'}"
        f"   dead at: {info.dead_at or '-'}" + ("" if info.retries is None else f"   retries: {info.retries}")
    )
    lines.extend(
        f"    x-death:     {death.reason or '?'} in {death.queue or '?'} (count {death.count}, "
        f"at {death.time or '?'}, from {death.exchange or '?'} {','.join(death.routing_keys)})"
        for death in info.deaths
    )
    lines.append(f"    body:        {info.body_preview!r}")
    return lines


def listing_text(listing: DeadLetterListing) -> str:
    if not listing.present:
        return f"{listing.queue}: the queue does not exist (nothing was ever dead-lettered with this prefix)"
    head = f"{listing.queue}: {listing.depth} dead letter(s)"
    if listing.depth > len(listing.letters):
        head += f", showing the first {len(listing.letters)}"
    out = [head]
    for n, info in enumerate(listing.letters, start=1):
        out += _letter_lines(n, info)
    return "\n".join(out)


def requeue_text(report: RequeueReport) -> str:
    verb = "would requeue" if report.dry_run else "requeued"
    left = "would be left" if report.dry_run else "left"
    out = [f"{report.queue}: {verb} {report.requeued}, {left} {report.left} (examined {report.examined})"]
    if report.failed:
        out.append(f"failed to requeue {report.failed} (still in the dead-letter queue):")
        out += [f"  {error}" for error in report.errors]
    if report.not_found_ids:
        out.append(f"not found: {', '.join(report.not_found_ids)}")
    return "\n".join(out)
