"""``atlas-ingestor prune --before TIME``: retention for ``sessions`` / ``step_results`` / ``plans``.

Deletes, in batches of ``--batch`` sessions, each batch its own short transaction, every session that

- the pipeline wrote (``task_id`` set: rows an Atlas deployment wrote itself are never touched),
- completed before ``--before``,
- and is either exported (``succeeded`` or ``failed``, assigned to a JSONL file that is final: its line is
  on disk, and recovery never rebuilds a final file from Postgres) or ``abandoned`` (never exported: an
  attempt cut off by a killed worker, or one that stood down after a takeover),
- and whose task's ledger row, where it names this session, succeeded before ``--before`` too.

Its ``step_results`` and ``plans`` rows go with it (``ON DELETE CASCADE``). Running sessions and closed
ones not in a final file (steps missing, flagged, in flight) are never touched. Rows an ingestor batch
holds at that moment are skipped (``SKIP LOCKED``), left for the next prune.

The task ledger is left whole: a task's idempotency is its ledger row, and the close that a redelivered,
already succeeded task re-publishes is stored there (``task_ledger.close_message``), not read from
``sessions``. Before deleting anything a prune records its ``--before`` in ``retention``: ``producer audit``
and ``status`` count a succeeded task whose ledger row is older than that and whose session is gone as
pruned, not lost (the ledger condition above keeps that exact). ``--before`` must lie at least
``INGESTOR_ACCOUNTING_LOOKBACK_S`` in the past, so the ingestor's own accountability figure never looks
at a pruned task.

PostgreSQL reuses the space of deleted rows after (auto)vacuum; the files do not shrink. The JSONL files
are the long-term archive.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import structlog
from tqdm import tqdm

from ingestor import _sql
from ingestor._errors import ConfigError
from ingestor._settings import IngestorSettings
from ingestor._store import DB_ERRORS, classify, connect

_log = structlog.get_logger("ingestor.prune")

MAX_BATCH: Final = 100_000
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

# $1 before, ($2, $3) the keyset (completed_at, id) of the last session seen, $4 the batch size. Walks
# sessions_completed_at_idx from the oldest; each batch starts after the previous one. The file and the
# ledger row are looked up per session (scalar subqueries, by primary key and task_ledger_session_idx):
# written as EXISTS / NOT EXISTS, the planner sometimes joined instead, hashing every final file and every
# ledger row newer than --before (most of the ledger) for each batch (bench/bigtable.py: 2.3 s a batch at
# 10 M step rows).
_ELIGIBLE: Final = """
SELECT s.id, s.completed_at,
       (SELECT count(*) FROM step_results AS r WHERE r.session_id = s.id) AS steps
FROM sessions AS s
WHERE s.completed_at < $1 AND (s.completed_at, s.id) > ($2, $3)
  AND s.task_id IS NOT NULL
  AND (s.status = 'abandoned'
       OR (s.status IN ('succeeded', 'failed')
           AND (SELECT f.state FROM jsonl_files AS f WHERE f.name = s.export_file) = 'final'))
  AND coalesce((SELECT max(l.updated_at) FROM task_ledger AS l
                WHERE l.adapter_session_id = s.adapter_session_id), '-infinity') < $1
ORDER BY s.completed_at, s.id
LIMIT $4
"""

SELECT_BATCH: Final = _ELIGIBLE
"""What a dry run counts."""

DELETE_BATCH: Final = f"""
WITH doomed AS ({_ELIGIBLE} FOR UPDATE OF s SKIP LOCKED),
gone AS (DELETE FROM sessions AS s USING doomed AS d WHERE s.id = d.id RETURNING s.id)
SELECT d.id, d.completed_at, d.steps FROM doomed AS d JOIN gone AS g ON g.id = d.id
ORDER BY d.completed_at, d.id
"""  # noqa: S608 -- built from constants only

RECORD_HORIZON: Final = """
INSERT INTO retention AS r (pruned_before) VALUES ($1)
ON CONFLICT (singleton) DO UPDATE
    SET pruned_before = greatest(r.pruned_before, EXCLUDED.pruned_before), updated_at = now()
"""


@dataclass(slots=True)
class Pruned:
    """What a prune deleted (or, dry, would delete)."""

    sessions: int = 0
    steps: int = 0
    batches: int = 0
    seconds: float = 0.0
    newest: datetime | None = None
    """The latest ``completed_at`` among them."""

    def summary(self, before: datetime, *, dry_run: bool) -> str:
        verb = "would delete" if dry_run else "deleted"
        text = (
            f"prune: {verb} {self.sessions:,} sessions and {self.steps:,} step rows that completed before "
            f"{before.isoformat()}, in {self.batches:,} batches, {self.seconds:.1f}s"
        )
        if self.sessions and self.seconds > 0:
            text += f" ({self.sessions / self.seconds:,.0f} sessions/s)"
        return text


def check_before(before: datetime, settings: IngestorSettings, now: datetime | None = None) -> None:
    """ConfigError unless ``before`` lies at least ``accounting_lookback_s`` in the past."""
    latest = (now or datetime.now(UTC)) - timedelta(seconds=settings.accounting_lookback_s)
    if before > latest:
        raise ConfigError(
            f"--before {before.isoformat()} is too recent: it must be at most {latest.isoformat()} "
            f"(now minus INGESTOR_ACCOUNTING_LOOKBACK_S = {settings.accounting_lookback_s:g}s)"
        )


async def prune_sessions(
    settings: IngestorSettings,
    *,
    before: datetime,
    batch: int = 10_000,
    dry_run: bool = False,
    progress: bool = True,
    now: datetime | None = None,
) -> Pruned:
    """Delete (``dry_run``: count) what may go, ``batch`` sessions per transaction."""
    if not 1 <= batch <= MAX_BATCH:
        raise ConfigError(f"--batch must be between 1 and {MAX_BATCH:,}, not {batch}")
    check_before(before, settings, now)
    result = Pruned()
    try:
        conn = await connect(settings)
    except DB_ERRORS as err:
        raise classify(err, settings.database_url) from err
    bar = tqdm(
        desc="prune (dry run)" if dry_run else "prune",
        unit=" sessions",
        file=sys.stderr,
        disable=not progress,
    )
    started = time.monotonic()
    try:
        if not dry_run:
            await conn.execute(RECORD_HORIZON, before)
        after: tuple[datetime, int] = (_EPOCH, 0)
        while True:
            async with conn.transaction():
                await conn.execute(_sql.JIT_OFF)
                rows: list[Any] = await conn.fetch(
                    SELECT_BATCH if dry_run else DELETE_BATCH, before, after[0], after[1], batch
                )
            if not rows:
                break
            steps = sum(int(r["steps"]) for r in rows)
            result.sessions += len(rows)
            result.steps += steps
            result.batches += 1
            result.newest = rows[-1]["completed_at"]
            after = (rows[-1]["completed_at"], rows[-1]["id"])
            bar.update(len(rows))
            bar.set_postfix_str(f"{result.steps:,} steps, up to {result.newest.isoformat()}", refresh=False)
    except DB_ERRORS as err:
        raise classify(err, settings.database_url) from err
    finally:
        result.seconds = time.monotonic() - started
        bar.close()
        await conn.close(timeout=5)
    _log.info(
        "prune.done",
        before=before.isoformat(),
        dry_run=dry_run,
        sessions=result.sessions,
        steps=result.steps,
        batches=result.batches,
        seconds=round(result.seconds, 1),
    )
    return result
