"""The batch transaction copies steps in (COPY has no ON CONFLICT): what is stored already is left out, so a
redelivered step never fails its batch, and jsonb values round-trip through the binary codecs."""

from __future__ import annotations

import asyncpg

from ingestor._batch import merge_batch
from ingestor._linecache import LineCache
from ingestor._store import _init_connection, fetch_line_map
from ingestor._write import FileTarget, Written, write_batch
from schemas import TelemetryMessage
from tests._ingest_gen import GenSession, generate

TARGET = FileTarget("copy.jsonl", "owner")


async def _write(conn: asyncpg.Connection, records: list[TelemetryMessage]) -> Written:
    async with conn.transaction():
        return await write_batch(conn, merge_batch(records), TARGET, "ingestor-copy-test")


def _succeeded(n: int) -> list[GenSession]:
    sessions = generate(n, seed=11, retry_share=0).sessions
    return [s for s in sessions if s.closed is not None and s.closed.status == "succeeded"]


async def test_steps_stored_by_an_earlier_batch_are_left_out_and_the_rest_copied(
    migrated_database: str,
) -> None:
    """A session's first step stored by one batch, then that step again (a redelivery) with the others and
    the close: the batch commits, writes only the new steps, and assigns the now complete session."""
    session = next(s for s in _succeeded(20) if len(s.steps) >= 3)
    assert session.closed is not None
    conn = await asyncpg.connect(migrated_database)
    try:
        await _init_connection(conn)
        first = await _write(conn, [session.opened, session.steps[0]])
        second = await _write(conn, [*session.steps, session.closed])
        stored = await conn.fetch(
            "SELECT step_id, metadata FROM step_results WHERE adapter_session_id = $1 ORDER BY step_id",
            session.adapter_session_id,
        )
    finally:
        await conn.close()
    (session_id,) = first.steps
    assert [r["step_id"] for r in first.steps[session_id]] == [session.steps[0].step_id]
    assert [r["step_id"] for r in second.steps[session_id]] == [s.step_id for s in session.steps[1:]]
    assert second.assigned == [session_id]
    assert [r["step_id"] for r in stored] == sorted(s.step_id for s in session.steps)
    assert [r["metadata"]["seq"] for r in stored] == [
        s.seq for s in sorted(session.steps, key=lambda s: s.step_id)
    ]


async def test_a_batch_written_again_writes_nothing_and_fails_nothing(migrated_database: str) -> None:
    """A whole batch redelivered after its commit (the ack was lost): the same records again copy no step,
    assign nothing twice, and leave the rows as they were."""
    sessions = _succeeded(30)
    records = [r for s in sessions for r in (s.opened, *s.steps, s.closed) if r is not None]
    conn = await asyncpg.connect(migrated_database)
    try:
        await _init_connection(conn)
        once = await _write(conn, records)
        before = await conn.fetch("SELECT * FROM step_results ORDER BY session_id, step_id")
        again = await _write(conn, records)
        after = await conn.fetch("SELECT * FROM step_results ORDER BY session_id, step_id")
    finally:
        await conn.close()
    assert sum(len(v) for v in once.steps.values()) == sum(len(s.steps) for s in sessions)
    assert len(once.assigned) == len(sessions)
    assert again.steps == {}
    assert again.assigned == []
    assert [dict(r) for r in after] == [dict(r) for r in before]


async def test_jsonb_values_round_trip_through_the_binary_codecs(migrated_database: str) -> None:
    """What the batch copies into jsonb columns reads back equal, non-ASCII text and nesting included,
    and a jsonb parameter still takes a Python value."""
    session = _succeeded(5)[0]
    step = session.steps[0].model_copy(
        update={"events": [{"name": "outil ✓ 工具", "args": {"n": [1, 2.5, None]}}]}
    )
    conn = await asyncpg.connect(migrated_database)
    try:
        await _init_connection(conn)
        await _write(conn, [session.opened, step])
        events = await conn.fetchval(
            "SELECT adapter_events FROM step_results WHERE adapter_session_id = $1",
            session.adapter_session_id,
        )
        echoed = await conn.fetchval("SELECT $1::jsonb", {"k": ["ü", 1]})
        as_json = await conn.fetchval("SELECT '{\"a\": [1]}'::json")
    finally:
        await conn.close()
    assert events == [{"name": "outil ✓ 工具", "args": {"n": [1, 2.5, None]}}]
    assert echoed == {"k": ["ü", 1]}
    assert as_json == {"a": [1]}


async def test_a_session_completed_by_steps_after_its_close_gets_its_line_from_memory(
    migrated_database: str,
) -> None:
    """A close committed before its session's steps (delivered first, or by a batch in flight beside the
    steps' batch): the batch whose steps complete the session assigns it with its row, so its line is built
    in memory, byte for byte the line Postgres gives, instead of being read back after the commit."""
    session = next(s for s in _succeeded(20) if len(s.steps) >= 2)
    assert session.closed is not None
    cache = LineCache(max_bytes=1 << 20)
    conn = await asyncpg.connect(migrated_database)
    try:
        await _init_connection(conn)
        closed_first = await _write(conn, [session.opened, session.closed])
        completed = await _write(conn, list(session.steps))
        (session_id,) = completed.assigned
        stored = (await fetch_line_map(conn, [session_id]))[session_id]
    finally:
        await conn.close()
    assert closed_first.assigned == []
    assert session_id in completed.rows
    assert await cache.committed(completed) == [(session_id, stored)]


async def test_a_session_completed_by_its_late_opened_gets_its_line_from_memory(
    migrated_database: str,
) -> None:
    """Steps and close committed before the session's opened (their batch ran first, beside the opened's):
    the batch whose opened completes the session gets its plan back with the assignment, so the line is
    built in memory, byte for byte the line Postgres gives."""
    session = next(s for s in _succeeded(20) if len(s.steps) >= 2 and s.closed and s.closed.plan)
    assert session.closed is not None
    cache = LineCache(max_bytes=1 << 20)
    conn = await asyncpg.connect(migrated_database)
    try:
        await _init_connection(conn)
        before_opened = await _write(conn, [*session.steps, session.closed])
        await cache.committed(before_opened)
        completed = await _write(conn, [session.opened])
        (session_id,) = completed.assigned
        stored = (await fetch_line_map(conn, [session_id]))[session_id]
    finally:
        await conn.close()
    assert before_opened.assigned == []
    assert await cache.committed(completed) == [(session_id, stored)]
    assert b'"plan":{' in stored
