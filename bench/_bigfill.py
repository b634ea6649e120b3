"""Server-side fill of ``sessions`` / ``step_results`` / ``plans`` / ``task_ledger`` / ``jsonl_files`` for
:mod:`bench.bigtable`: ``INSERT ... SELECT FROM generate_series`` in chunks, nothing through the client.

Every value is a function of the session number ``i`` (so a fill is reproducible and a chunk never needs
another one), shaped like what the ingestor writes for a demo-adapter session:

- 5 to 7 steps (``5 + i % 3``): a ``plan`` step, ``execute`` steps and a ``synthesize`` step; ``output``
  ~200 bytes of text, ``trace`` ~40, ``metadata`` a step object (phase, seq, status, started_at as ISO
  text, duration_ms), ``adapter_usage`` the token counts, ``adapter_events`` a tool call on every other
  step: ~630 bytes a row;
- 1 in 20 sessions (``i % 20 = 0``) is an attempt cut off by a killed worker (``abandoned``, 2 steps, no
  close, never exported), retried by session ``i + 1`` (attempt 2 of the same task); 1 in 10
  (``i % 10 = 5``) ``failed``; the rest ``succeeded``. Every closed session is complete, has its plan
  row and is assigned to a final JSONL file (one file per 5 minutes of completions);
- ``adapter_session_id`` is random-looking hex (``md5``), like the workers' ``uuid4().hex``, so index
  inserts land all over the index as they do in production; task ids likewise;
- one ``task_ledger`` row per task (``succeeded``, or ``dead`` for a failed one; the stored close is 64
  bytes, shorter than a real one: no query measured reads it); session metadata and plans are smaller than
  the ingestor's too (the disk a 50 M fill takes is mostly ``step_results``'s already).

Times: a chunk maps ``i`` to ``created_at = t0 + (i - id0) * dt``; sessions last 6 s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

import asyncpg

PERIOD: Final = 60
"""The fill's pattern repeats every 60 sessions (lcm of 20, 10 and 3): chunks are multiples of it."""

ABANDONED_STEPS: Final = 2


def steps_of(i: int) -> int:
    """Step rows of session ``i`` (the SQL below says the same)."""
    return ABANDONED_STEPS if i % 20 == 0 else 5 + i % 3


STEPS_PER_PERIOD: Final = sum(steps_of(i) for i in range(1, PERIOD + 1))


def sessions_for_steps(steps: int) -> int:
    """Sessions (a multiple of :data:`PERIOD`) that hold at least ``steps`` step rows."""
    periods = -(-steps // STEPS_PER_PERIOD)
    return periods * PERIOD


# One row per session number: what every statement below derives its rows from.
# $1, $2: first and last session number; $3: epoch seconds of session $4's created_at; $5: seconds apart.
_ATTRS: Final = """
SELECT i,
       md5('as' || i) AS asid,
       'task-' || left(md5('task' || (i - (i % 20 = 1)::int)), 24) AS task_id,
       CASE WHEN i % 20 = 0 THEN 'abandoned' WHEN i % 10 = 5 THEN 'failed' ELSE 'succeeded' END AS status,
       CASE WHEN i % 20 = 0 THEN 2 ELSE 5 + i % 3 END AS steps,
       CASE WHEN i % 20 = 1 THEN 2 ELSE 1 END AS attempt,
       to_timestamp($3::float8 + (i - $4::int) * $5::float8) AS created_at,
       CASE WHEN i % 20 = 0 THEN to_timestamp($3::float8 + (i + 1 - $4::int) * $5::float8)
            ELSE to_timestamp($3::float8 + (i - $4::int) * $5::float8) + interval '6 s' END AS completed_at
FROM generate_series($1::int, $2::int) AS i
"""

_EVENTS: Final = (
    """'[{"type": "tool_call", "tool": "search", "arguments": {"query": "compare two approaches"}}]'::jsonb"""
)

FILL_SESSIONS: Final = f"""
INSERT INTO sessions (id, task, status, metadata, final_answer, created_at, completed_at, adapter_session_id,
                      adapter_usage, adapter_events, task_id, attempt, steps_expected, export_file, stored_at)
SELECT g.i,
       'Compare two approaches to agent telemetry and recommend one (case ' || g.i || ').',
       g.status,
       jsonb_build_object(
           'task_id', g.task_id, 'execution_mode', 'stepwise', 'adapter', 'demo', 'attempt', g.attempt,
           'task_metadata', jsonb_build_object('source', 'bench'),
           'adapter_session', jsonb_build_object('adapter_session_id', g.asid, 'adapter', 'demo'),
           'reason', CASE g.status WHEN 'abandoned' THEN 'superseded by attempt 2'
                                   WHEN 'failed' THEN 'the adapter reported a failure' END,
           'close_metadata', u.close_metadata),
       CASE g.status WHEN 'succeeded' THEN 'Answer to case ' || g.i || ': ' || repeat(md5('a' || g.i), 2)
                     WHEN 'failed' THEN '' END,
       g.created_at, g.completed_at, g.asid,
       u.usage, CASE WHEN g.status <> 'abandoned' THEN {_EVENTS} END,
       g.task_id, g.attempt, CASE WHEN g.status <> 'abandoned' THEN g.steps END,
       CASE WHEN g.status <> 'abandoned' THEN f.name END,
       CASE WHEN g.status <> 'abandoned' THEN g.completed_at + interval '200 ms' END
FROM ({_ATTRS}) AS g
CROSS JOIN LATERAL (
    SELECT CASE WHEN g.status <> 'abandoned' THEN jsonb_build_object(
               'prompt_tokens', 400 + g.i % 300, 'completion_tokens', 120 + g.i % 50,
               'total_tokens', 520 + g.i % 300 + g.i % 50, 'calls', g.steps) END AS usage,
           CASE WHEN g.status <> 'abandoned' THEN '{{"turns": 5, "notes": 3}}'::jsonb END AS close_metadata
) AS u
CROSS JOIN LATERAL (
    SELECT 'sessions-' || to_char(to_timestamp(b * 300), 'YYYYMMDD"T"HH24MISS')
           || '.000000Z-bench-ingestor-1-' || lpad((b % 1000000)::text, 6, '0') || '.jsonl' AS name
    FROM (SELECT floor(extract(epoch FROM g.completed_at) / 300)::bigint AS b) AS bucket
) AS f
"""  # noqa: S608 -- built from constants only

FILL_STEPS: Final = f"""
INSERT INTO step_results (session_id, step_id, trace, output, attempts, metadata, adapter_session_id,
                          adapter_usage, adapter_events)
SELECT g.i, k,
       'Task: case ' || g.i || ', step ' || k || '. ' || left(md5('t' || g.i), 16),
       'Step ' || k || ' via search: found ' || (g.i + k) % 997 || ' items. '
           || repeat(md5(g.i || ':' || k), 5),
       1,
       jsonb_build_object(
           'phase', CASE WHEN k = 0 THEN 'plan'
                         WHEN k = g.steps - 1 AND g.status <> 'abandoned' THEN 'synthesize'
                         ELSE 'execute' END,
           'seq', k + 1, 'status', 'ok',
           'started_at', to_char(g.created_at + k * interval '800 ms', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'),
           'duration_ms', 800),
       g.asid,
       jsonb_build_object('prompt_tokens', 60 + 10 * k, 'completion_tokens', 20, 'total_tokens', 80 + 10 * k,
                          'calls', 1),
       CASE WHEN k % 2 = 1
            THEN '[{{"type": "tool_call", "tool": "search"}}]'::jsonb
            ELSE '[]'::jsonb END
FROM ({_ATTRS}) AS g
CROSS JOIN LATERAL generate_series(0, g.steps - 1) AS k
"""  # noqa: S608 -- built from constants only

FILL_PLANS: Final = f"""
INSERT INTO plans (session_id, plan)
SELECT g.i, jsonb_build_object('steps', (
           SELECT jsonb_agg(jsonb_build_object('id', n, 'description', 'Research part ' || n,
                                               'depends_on', CASE WHEN n > 1 THEN jsonb_build_array(n - 1)
                                                                  ELSE '[]'::jsonb END))
           FROM generate_series(1, least(g.steps - 2, 3)) AS n))
FROM ({_ATTRS}) AS g
WHERE g.status <> 'abandoned'
"""  # noqa: S608 -- built from constants only

FILL_LEDGER: Final = f"""
INSERT INTO task_ledger (task_id, state, attempts, adapter_session_id, close_message, worker_id, claim_token,
                         created_at, updated_at)
SELECT g.task_id, CASE WHEN g.status = 'failed' THEN 'dead' ELSE 'succeeded' END, g.attempt, g.asid,
       CASE WHEN g.status = 'succeeded' THEN convert_to(repeat(md5('c' || g.i), 2), 'UTF8') END,
       'worker-bench-1', md5('claim' || g.i), g.created_at - (g.attempt - 1) * interval '8 s',
       g.completed_at + interval '30 ms'
FROM ({_ATTRS}) AS g
WHERE g.status <> 'abandoned'
"""  # noqa: S608 -- built from constants only

FILL_FILES: Final = """
INSERT INTO jsonl_files AS f (name, ingestor_id, owner_token, state, sessions, created_at, finalized_at)
SELECT export_file, 'bench-ingestor-1', 'bench-owner', 'final', count(*), min(stored_at),
       max(stored_at) + interval '300 s'
FROM sessions WHERE id BETWEEN $1 AND $2 AND export_file IS NOT NULL
GROUP BY export_file
ON CONFLICT (name) DO UPDATE SET sessions = f.sessions + EXCLUDED.sessions,
                                 finalized_at = greatest(f.finalized_at, EXCLUDED.finalized_at)
"""


@dataclass(frozen=True, slots=True)
class Span:
    """Sessions ``first..last`` with ``created_at = t0 + (i - first_of_axis) * dt`` seconds."""

    first: int
    last: int
    t0: float
    id0: int
    dt: float


@dataclass(frozen=True, slots=True)
class Filled:
    sessions: int
    steps: int
    seconds: float


async def fill_chunk(conn: asyncpg.Connection, span: Span) -> Filled:
    """One chunk, one transaction: its sessions, steps, plans, ledger rows and file rows."""
    started = time.monotonic()
    args = (span.first, span.last, span.t0, span.id0, span.dt)
    async with conn.transaction():
        sessions = await conn.execute(FILL_SESSIONS, *args)
        steps = await conn.execute(FILL_STEPS, *args)
        await conn.execute(FILL_PLANS, *args)
        await conn.execute(FILL_LEDGER, *args)
        await conn.execute(FILL_FILES, span.first, span.last)
    return Filled(int(sessions.split()[-1]), int(steps.split()[-1]), time.monotonic() - started)
