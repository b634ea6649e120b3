"""Every statement the ingestor runs: parameterised, set-based (arrays + unnest), never a row per trip.

jsonb values travel as JSON text in ``text[]`` parameters and are cast in SQL (a Python list inside an
array parameter would otherwise read as a second array dimension).

Lock order inside a batch transaction: task advisory locks (sorted keys), then session rows (sorted by
adapter_session_id), then the open ``jsonl_files`` row. Finalizers take only the ``jsonl_files`` row, so
no cycle exists; a deadlock with the periodic sweeps is retried like any transient error.
"""

from __future__ import annotations

from typing import Final

TASK_LOCK_NAMESPACE: Final = 4281420  # 0x41544C, the int4 namespace of the per-task transaction locks

# The keys arrive sorted and unnest keeps array order, so locks are taken in one global order.
LOCK_TASKS: Final = """
SELECT count(pg_advisory_xact_lock(4281420, k)) FROM unnest($1::int4[]) AS k
"""

# The batch transaction's first statement: its task locks, and JIT off for the transaction (SET LOCAL, so
# nothing outlives it behind a transaction pooler). The batch statements are short; JIT compiled the
# write-back of closes (its cost estimate crosses jit_above_cost) for 35 ms a batch, 3x its run time.
BEGIN_BATCH: Final = """
SELECT set_config('jit', 'off', true), count(pg_advisory_xact_lock(4281420, k)) FROM unnest($1::int4[]) AS k
"""

# The first statement of the sweeps' and the metric's transactions (SET LOCAL, like BEGIN_BATCH): they are
# short, but their cost estimates grow with the tables (a partial index's row estimate, steps counted per
# session) and crossed jit_above_cost at 10 M step rows, where compiling took 200-500 ms a statement for a
# query that ran in under 1 ms (bench/bigtable.py).
JIT_OFF: Final = "SELECT set_config('jit', 'off', true)"

# A new session gets its full row, with its JSONL assignment when the batch holds all of it (``export_file``
# is NULL otherwise). An existing one is only locked: ON CONFLICT locks the row even where its WHERE is false,
# and only a stub's created_at moving to an earlier record writes a new row version (RETURNING leaves out
# the rows it only locked: EXISTING_SESSIONS reads those).
UPSERT_SESSIONS: Final = """
INSERT INTO sessions AS s (adapter_session_id, task_id, task, status, metadata, final_answer, created_at,
                           completed_at, adapter_usage, adapter_events, attempt, steps_expected, export_file,
                           stored_at)
SELECT u.asid, u.task_id, u.task, u.status, u.metadata::jsonb, u.final_answer, u.created_at,
       u.completed_at, u.adapter_usage::jsonb, u.adapter_events::jsonb, u.attempt, u.steps_expected,
       u.export_file, CASE WHEN u.export_file IS NOT NULL THEN now() END
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::timestamptz[],
            $8::timestamptz[], $9::text[], $10::text[], $11::int4[], $12::int4[], $13::text[])
     AS u(asid, task_id, task, status, metadata, final_answer, created_at, completed_at, adapter_usage,
          adapter_events, attempt, steps_expected, export_file)
ORDER BY u.asid
ON CONFLICT (adapter_session_id) DO UPDATE
   SET created_at = EXCLUDED.created_at
   WHERE s.attempt IS NULL AND EXCLUDED.created_at < s.created_at
RETURNING s.id, s.adapter_session_id, (s.xmax = 0) AS inserted, (s.export_file IS NOT NULL) AS assigned
"""

# The sessions the batch names that existed before it (locked by the upsert): what the consistency checks
# need, the whole row where the batch's opened or close is not applied yet (``needs``: the merge input), and
# the step ids already stored where the batch brings steps (those are left out of the COPY of the steps).
EXISTING_SESSIONS: Final = """
WITH e AS (
    SELECT s.*, (u.opened AND s.attempt IS NULL) OR (u.closed AND s.steps_expected IS NULL) AS needs,
           CASE WHEN u.stepped THEN array(SELECT r.step_id FROM step_results AS r WHERE r.session_id = s.id)
           END AS stored_steps
    FROM unnest($1::text[], $2::bool[], $3::bool[], $4::bool[]) AS u(asid, opened, closed, stepped)
    JOIN sessions AS s ON s.adapter_session_id = u.asid
)
SELECT id, adapter_session_id, task_id, steps_expected, (export_file IS NOT NULL) AS assigned, needs,
       stored_steps,
       CASE WHEN needs THEN task END AS task, CASE WHEN needs THEN status END AS status,
       CASE WHEN needs THEN metadata END AS metadata, CASE WHEN needs THEN final_answer END AS final_answer,
       CASE WHEN needs THEN created_at END AS created_at,
       CASE WHEN needs THEN completed_at END AS completed_at,
       CASE WHEN needs THEN adapter_usage END AS adapter_usage,
       CASE WHEN needs THEN adapter_events END AS adapter_events, attempt
FROM e
"""

SESSION_OWNERS: Final = """
SELECT adapter_session_id, task_id FROM sessions WHERE adapter_session_id = ANY($1::text[])
"""

# The merged rows written back; the statement that completes a session (its close, after every step: the
# steps are inserted before it) also assigns it to the file, with the rule of ASSIGN. A session completed
# without its close in the batch (by its opened: the close was stored before it) comes back with the plan
# stored with that close, for its line ($13: the batch holds the close, so the plan is in memory).
UPDATE_SESSIONS: Final = """
WITH u AS MATERIALIZED (
    SELECT v.*,
           v.attempt IS NOT NULL AND v.steps_expected IS NOT NULL AND v.status IN ('succeeded', 'failed')
           AND (SELECT count(*) FROM step_results AS r WHERE r.session_id = v.id) = v.steps_expected
           AS complete
    FROM unnest($1::int4[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
                $7::timestamptz[], $8::text[], $9::text[], $10::int4[], $11::int4[], $13::bool[])
         AS v(id, task, status, metadata, final_answer, created_at, completed_at, adapter_usage,
              adapter_events, attempt, steps_expected, closed_here)
)
UPDATE sessions AS s
SET task = u.task, status = u.status, metadata = u.metadata::jsonb, final_answer = u.final_answer,
    created_at = u.created_at, completed_at = u.completed_at, adapter_usage = u.adapter_usage::jsonb,
    adapter_events = u.adapter_events::jsonb, attempt = u.attempt, steps_expected = u.steps_expected,
    export_file = CASE WHEN s.export_file IS NULL AND u.complete THEN $12 ELSE s.export_file END,
    stored_at = CASE WHEN s.export_file IS NULL AND u.complete THEN now() ELSE s.stored_at END
FROM u
WHERE s.id = u.id
RETURNING s.id, (s.export_file IS NOT NULL) AS assigned,
          CASE WHEN u.complete AND NOT u.closed_here
               THEN (SELECT p.plan FROM plans AS p WHERE p.session_id = s.id) END AS plan
"""

INSERT_PLANS: Final = """
INSERT INTO plans (session_id, plan)
SELECT u.session_id, u.plan::jsonb FROM unnest($1::int4[], $2::text[]) AS u(session_id, plan)
ON CONFLICT (session_id) DO NOTHING
"""

# The steps go in by COPY (binary), not INSERT ... unnest: a third of the client CPU (no array encoding) and
# less server time per row. COPY has no ON CONFLICT, so the batch leaves out before it what is stored already
# (EXISTING_SESSIONS' stored_steps, read under the session row locks that keep any other writer out: a new
# session has no steps, and merge_batch keeps one step per (session, step_id)).
STEP_TABLE: Final = "step_results"
STEP_COLUMNS: Final = (
    "session_id",
    "step_id",
    "trace",
    "output",
    "attempts",
    "metadata",
    "adapter_session_id",
    "adapter_usage",
    "adapter_events",
)

# A running session (no close yet) of task T is abandoned when T has a session with a higher
# (attempt, created_at); completed_at is that newest session's created_at and the reason names its attempt,
# so the result depends only on the set of sessions of T, never on arrival order.
ABANDON: Final = """
WITH latest AS (
    SELECT DISTINCT ON (task_id) task_id, attempt, created_at
    FROM sessions
    WHERE task_id = ANY($1::text[]) AND attempt IS NOT NULL
    ORDER BY task_id, attempt DESC, created_at DESC
)
UPDATE sessions AS s
SET status = 'abandoned',
    completed_at = l.created_at,
    metadata = coalesce(s.metadata, '{}'::jsonb)
               || jsonb_build_object('reason', 'superseded by attempt ' || l.attempt)
FROM latest AS l
WHERE s.task_id = l.task_id
  AND s.steps_expected IS NULL
  AND s.attempt IS NOT NULL
  AND (s.attempt, s.created_at) < (l.attempt, l.created_at)
  AND (s.status <> 'abandoned'
       OR s.completed_at IS DISTINCT FROM l.created_at
       OR s.metadata ->> 'reason' IS DISTINCT FROM 'superseded by attempt ' || l.attempt)
RETURNING s.adapter_session_id, l.attempt
"""

# Tasks the periodic sweep re-checks: a running session with a newer attempt of its task.
SUPERSEDED_TASKS: Final = """
SELECT DISTINCT s.task_id FROM sessions AS s
WHERE s.status = 'running' AND s.steps_expected IS NULL AND s.attempt IS NOT NULL AND s.task_id IS NOT NULL
  AND EXISTS (SELECT 1 FROM sessions AS o
              WHERE o.task_id = s.task_id AND o.attempt IS NOT NULL
                AND (o.attempt, o.created_at) > (s.attempt, s.created_at))
LIMIT $1
"""

# Complete = opened seen (attempt set), closed succeeded|failed, and every step the close announced is
# present: nothing about the row changes after that, so its line is final. Runs under the session row locks
# of the batch, so the assignment happens exactly once, in the transaction that completes the session.
# Each assigned session comes back with what its line reads (LINE_SESSIONS' columns): a batch whose steps
# complete a session closed before them (a close delivered, or committed by a batch in flight beside this one,
# first) builds its line from memory instead of reading it back.
ASSIGN: Final = """
UPDATE sessions AS s SET export_file = $2, stored_at = now()
WHERE s.id = ANY($1::int4[])
  AND s.export_file IS NULL
  AND s.status IN ('succeeded', 'failed')
  AND s.steps_expected IS NOT NULL AND s.attempt IS NOT NULL
  AND (SELECT count(*) FROM step_results AS r WHERE r.session_id = s.id) = s.steps_expected
RETURNING s.id, s.adapter_session_id, s.task, s.status, s.metadata, s.final_answer, s.created_at,
          s.completed_at, s.adapter_usage, s.adapter_events, s.steps_expected,
          (SELECT p.plan FROM plans AS p WHERE p.session_id = s.id) AS plan
"""

UNASSIGNED_COMPLETE: Final = """
SELECT s.id, s.task_id FROM sessions AS s
WHERE s.export_file IS NULL AND s.steps_expected IS NOT NULL AND s.status IN ('succeeded', 'failed')
  AND s.task_id IS NOT NULL AND s.attempt IS NOT NULL
  AND (SELECT count(*) FROM step_results AS r WHERE r.session_id = s.id) = s.steps_expected
ORDER BY s.id
LIMIT $1
"""

# The open file's row: created by the first batch that assigns to it, counted by every later one; no row
# back means a recoverer finalized it (or another process owns it): the batch rolls back (FileSuperseded).
FILE_ASSIGNED: Final = """
INSERT INTO jsonl_files AS f (name, ingestor_id, owner_token, state, sessions)
VALUES ($1, $2, $3, 'open', $4)
ON CONFLICT (name) DO UPDATE SET sessions = f.sessions + EXCLUDED.sessions
   WHERE f.state = 'open' AND f.owner_token = EXCLUDED.owner_token
RETURNING sessions
"""

FILE_LOCK: Final = "SELECT state, sessions FROM jsonl_files WHERE name = $1 FOR UPDATE"

FILE_FINAL: Final = "UPDATE jsonl_files SET state = 'final', finalized_at = now() WHERE name = $1"

FILE_STATES: Final = "SELECT name, state FROM jsonl_files WHERE name = ANY($1::text[])"

OPEN_FILES: Final = """
SELECT name, owner_token FROM jsonl_files WHERE state = 'open' AND owner_token <> $1 ORDER BY name
"""

TRY_LOCK: Final = "SELECT pg_try_advisory_lock($1::int8)"
"""The owner lock, session-level: only on the liveness connection."""
TRY_XACT_LOCK: Final = "SELECT pg_try_advisory_xact_lock($1::int8)"
"""A recoverer's test of an owner lock: conflicts with the session lock, ends with its transaction (so it
works through a transaction pooler and is never left behind by a failed unlock)."""

FILE_SESSION_IDS: Final = "SELECT id FROM sessions WHERE export_file = $1 ORDER BY id"

LINE_SESSIONS: Final = """
SELECT s.id, s.adapter_session_id, s.task, s.status, s.metadata, s.final_answer, s.created_at,
       s.completed_at, s.adapter_usage, s.adapter_events, p.plan
FROM sessions AS s LEFT JOIN plans AS p ON p.session_id = s.id
WHERE s.id = ANY($1::int4[])
ORDER BY s.id
"""

LINE_STEPS: Final = """
SELECT session_id, step_id, trace, output, attempts, metadata, adapter_session_id, adapter_usage,
       adapter_events
FROM step_results WHERE session_id = ANY($1::int4[])
ORDER BY session_id, step_id
"""

# Export: closed sessions by completion time, keyset-paginated on (completed_at, id), each with whether it
# is complete (every step its close announced is stored; the caller writes those). The page is taken first
# and the steps are counted for its rows only: with the count in the WHERE clause the planner, which cannot
# estimate it, sorted every closed session from the page's start to the range's end and counted the steps
# of each, for every page (bench/bigtable.py: 834 ms a page over a day of 80,000 sessions).
EXPORT_PAGE: Final = """
WITH page AS MATERIALIZED (
    SELECT s.id, s.completed_at, s.steps_expected FROM sessions AS s
    WHERE s.completed_at >= $1 AND ($2::timestamptz IS NULL OR s.completed_at < $2)
      AND (s.completed_at, s.id) > ($3, $4)
      AND s.status IN ('succeeded', 'failed') AND s.steps_expected IS NOT NULL AND s.attempt IS NOT NULL
    ORDER BY s.completed_at, s.id
    LIMIT $5
)
SELECT p.id, p.completed_at,
       (SELECT count(*) FROM step_results AS r WHERE r.session_id = p.id) = p.steps_expected AS complete
FROM page AS p
ORDER BY p.completed_at, p.id
"""

# Problems are counted again when the same record is refused again (a redelivery), never duplicated.
RECORD_PROBLEMS: Final = """
INSERT INTO telemetry_problems AS p (adapter_session_id, task_id, seq, kind, problem, reason)
SELECT * FROM unnest($1::text[], $2::text[], $3::int4[], $4::text[], $5::text[], $6::text[])
ON CONFLICT (adapter_session_id, seq, problem) DO UPDATE
    SET reason = EXCLUDED.reason, occurrences = p.occurrences + 1, last_seen = now()
"""

# Stubs (a step or a close came, the opened never did) older than the grace: flagged; one still running
# stops being left running (a late opened and close still complete the session as usual).
FLAG_NEVER_OPENED: Final = """
WITH stale AS (
    SELECT s.id, s.adapter_session_id, s.task_id, s.status FROM sessions AS s
    WHERE s.attempt IS NULL AND s.task_id IS NOT NULL AND s.created_at < now() - $1::interval
      AND NOT EXISTS (SELECT 1 FROM telemetry_problems AS p
                      WHERE p.adapter_session_id = s.adapter_session_id AND p.seq = -1
                        AND p.problem = 'never_opened')
    ORDER BY s.id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), flagged AS (
    INSERT INTO telemetry_problems (adapter_session_id, task_id, problem, reason)
    SELECT adapter_session_id, task_id, 'never_opened', $3 FROM stale
    ON CONFLICT (adapter_session_id, seq, problem) DO NOTHING
), stopped AS (
    UPDATE sessions AS s
    SET status = 'abandoned', completed_at = now(),
        metadata = coalesce(s.metadata, '{}'::jsonb) || jsonb_build_object('reason', $3::text)
    FROM stale WHERE s.id = stale.id AND stale.status = 'running'
)
SELECT adapter_session_id, task_id FROM stale
"""

# Closed sessions still missing steps after the grace: never exported; flagged with what is missing.
INCOMPLETE_SESSIONS: Final = """
SELECT s.id, s.adapter_session_id, s.task_id, s.steps_expected,
       array(SELECT (r.metadata ->> 'seq')::int FROM step_results AS r WHERE r.session_id = s.id) AS seqs
FROM sessions AS s
WHERE s.export_file IS NULL AND s.steps_expected IS NOT NULL AND s.status IN ('succeeded', 'failed')
  AND s.attempt IS NOT NULL AND s.task_id IS NOT NULL AND s.completed_at < now() - $1::interval
  AND NOT EXISTS (SELECT 1 FROM telemetry_problems AS p
                  WHERE p.adapter_session_id = s.adapter_session_id AND p.seq = -1
                    AND p.problem = 'missing_steps')
ORDER BY s.id
LIMIT $2
"""

# Tasks the ledger calls succeeded (within the look-back) whose session is not stored and in a final
# JSONL file after the grace: the accountability figure (``producer audit`` lists them with reasons).
UNACCOUNTED_COUNT: Final = """
SELECT count(*) FROM task_ledger AS l
LEFT JOIN sessions AS s ON s.adapter_session_id = l.adapter_session_id
LEFT JOIN jsonl_files AS f ON f.name = s.export_file
WHERE l.state = 'succeeded' AND l.updated_at < now() - $1::interval AND l.updated_at > now() - $2::interval
  AND (s.id IS NULL OR s.status <> 'succeeded' OR f.state IS DISTINCT FROM 'final')
"""

SCHEMA_CHECK: Final = """
SELECT count(*) FROM information_schema.columns
WHERE table_schema = current_schema()
  AND ((table_name = 'sessions'
        AND column_name IN ('adapter_session_id', 'task_id', 'export_file', 'stored_at'))
       OR (table_name = 'jsonl_files' AND column_name = 'owner_token')
       OR (table_name = 'plans' AND column_name = 'plan')
       OR (table_name = 'telemetry_problems' AND column_name = 'reason'))
"""
SCHEMA_CHECK_EXPECTED: Final = 7
