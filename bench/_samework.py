"""The same work as atlas end to end, as a Celery or Dramatiq user would write it in a task body.

The mission is to be faster than Celery and Dramatiq *doing the same work*; the task-leg baselines run a
no-op. Here a task body does what atlas does for a task, the straightforward way: validate the task, run
its demo adapter session in the process (the same ``Student`` and ``DemoAdapter`` as the atlas worker: a
plan, 2-4 execute steps, a synthesis), then one PostgreSQL transaction that stores the session (its
``sessions`` row, its ``step_results`` rows, its plan: the tables and columns atlas writes, on a database
migrated like atlas's, ``stored_at = now()``), then its JSONL line (``ingestor.build_line``, the line atlas
writes) appended to the process's own file. The framework acks after the body returns, so a task is acked
after its session is committed, as in atlas.

What atlas does besides, this does not (so the baseline is the cheaper one): no task ledger (a task
redelivered after a crash runs and is stored again), no telemetry (nothing goes through the broker but the
task), no fsync of the JSONL (atlas fsyncs each batch before its ack), one file per process, never rolled.

Each worker thread (a Celery prefork process has one, a Dramatiq process several) keeps one event loop
(uvloop when installed, as the atlas worker does), one asyncpg connection and one open file, made on its
first task; :func:`close_thread_state` closes them. Configured by ``BENCH_SAMEWORK_DATABASE_URL`` and
``BENCH_SAMEWORK_JSONL_DIR``.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

import asyncpg
import orjson

from atlas_common import loop_factory
from ingestor import build_line
from schemas import TaskMessage
from worker import Student
from worker.adapters import DemoAdapter

DATABASE_URL_ENV: Final = "BENCH_SAMEWORK_DATABASE_URL"
JSONL_DIR_ENV: Final = "BENCH_SAMEWORK_JSONL_DIR"
FILE_PREFIX: Final = "samework-"
CELERY_TASK_NAME: Final = "bench.session"
DRAMATIQ_ACTOR_NAME: Final = "session"

_INSERT_SESSION: Final = """
INSERT INTO sessions (adapter_session_id, task_id, task, status, metadata, final_answer, created_at,
                      completed_at, adapter_usage, adapter_events, attempt, steps_expected, stored_at)
VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9::jsonb, $10::jsonb, 1, $11, now())
RETURNING id
"""
_INSERT_STEP: Final = """
INSERT INTO step_results (session_id, step_id, trace, output, attempts, metadata, adapter_session_id,
                          adapter_usage, adapter_events)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8::jsonb, $9::jsonb)
"""
_INSERT_PLAN: Final = "INSERT INTO plans (session_id, plan) VALUES ($1, $2::jsonb)"


@dataclass(slots=True)
class _ThreadState:
    loop: asyncio.AbstractEventLoop
    conn: asyncpg.Connection
    jsonl: IO[bytes]
    student: Student


_local = threading.local()


def _new_loop() -> asyncio.AbstractEventLoop:
    """The atlas services' loop (uvloop when installed), else the standard one."""
    return (loop_factory() or asyncio.new_event_loop)()


def _thread_state() -> _ThreadState:
    state: _ThreadState | None = getattr(_local, "state", None)
    if state is None:
        loop = _new_loop()
        conn = loop.run_until_complete(asyncpg.connect(os.environ[DATABASE_URL_ENV]))
        name = f"{FILE_PREFIX}{os.getpid()}-{threading.get_ident()}.jsonl"
        jsonl = (Path(os.environ[JSONL_DIR_ENV]) / name).open("ab")
        state = _local.state = _ThreadState(loop, conn, jsonl, Student(DemoAdapter()))
    return state


def close_thread_state() -> None:
    """Close this thread's connection and file (safe when it ran no task, and twice)."""
    state: _ThreadState | None = getattr(_local, "state", None)
    _local.state = None
    if state is not None:
        state.jsonl.close()
        state.loop.run_until_complete(state.conn.close())
        state.loop.close()


def run_and_store(payload: dict[str, Any]) -> None:
    """The task body: the session run, stored in PostgreSQL (committed), its line appended."""
    state = _thread_state()
    state.loop.run_until_complete(_run_and_store(state, TaskMessage.model_validate(payload)))


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


async def _run_and_store(state: _ThreadState, task: TaskMessage) -> None:
    created_at = datetime.now(UTC)
    result = await state.student.run(task.task, task.execution_mode, task_id=task.task_id)
    completed_at = datetime.now(UTC)
    adapter_session = result.metadata["adapter_session"]
    usage, events = adapter_session["usage"], adapter_session["events"]
    metadata = {
        "task_metadata": task.metadata,
        "execution_mode": task.execution_mode,
        "attempt": 1,
        "adapter_session": adapter_session,
        "plan_fallback": result.metadata["plan_fallback"],
    }
    steps = [
        {
            "step_id": s.step_id,
            "trace": s.trace,
            "output": s.output if s.output is None or isinstance(s.output, str) else _json(s.output),
            "attempts": s.attempts,
            "metadata": {
                "phase": s.phase,
                "description": s.description,
                "seq": s.seq,
                "started_at": s.started_at.isoformat(),
                "finished_at": s.finished_at.isoformat(),
                "status": s.status,
                "error": s.error,
            },
            "adapter_session_id": s.adapter_session_id,
            "adapter_usage": s.usage.model_dump(),
            "adapter_events": s.events,
        }
        for s in result.steps
    ]
    conn = state.conn
    async with conn.transaction():
        session_id: int = await conn.fetchval(
            _INSERT_SESSION,
            result.adapter_session_id,
            task.task_id,
            task.task,
            result.status,
            _json(metadata),
            result.final_answer,
            created_at,
            completed_at,
            _json(usage),
            _json(events),
            len(steps),
        )
        await conn.executemany(
            _INSERT_STEP,
            [
                (
                    session_id,
                    s["step_id"],
                    s["trace"],
                    s["output"],
                    s["attempts"],
                    _json(s["metadata"]),
                    s["adapter_session_id"],
                    _json(s["adapter_usage"]),
                    _json(s["adapter_events"]),
                )
                for s in steps
            ],
        )
        await conn.execute(_INSERT_PLAN, session_id, _json(result.plan))
    session = {
        "id": session_id,
        "adapter_session_id": result.adapter_session_id,
        "task": task.task,
        "status": result.status,
        "metadata": metadata,
        "final_answer": result.final_answer,
        "created_at": created_at,
        "completed_at": completed_at,
        "adapter_usage": usage,
        "adapter_events": events,
        "plan": result.plan,
    }
    state.jsonl.write(build_line(session, steps))
    state.jsonl.flush()
