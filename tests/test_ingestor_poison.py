"""Poison telemetry, as users reported it, forged straight into the ingestor's queue: values nested past
the encoders' limits, NUL characters, huge integers, another task's close, sessions that never open or lose
a step. Each test checks Postgres, the JSONL files, the dead letters and ``telemetry_problems``."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from atlas_common import REASON_HEADER, SOURCE_HEADER, Topology
from ingestor import Ingestor, IngestorSettings, _batches, _files, read_lines
from ingestor._batch import MergedBatch, key_of, merge_batch
from schemas import SessionClosed, TelemetryMessage, encode, encode_telemetry_batch
from schemas.limits import MAX_JSON_DEPTH
from tests._ingest_env import (
    db_counts,
    dead_letters,
    exported_counts,
    final_files,
    fresh_settings,
    open_files,
    ready_count,
    wait_for,
)
from tests._ingest_gen import GenSession, bodies, generate, publish

pytestmark = pytest.mark.integration

MakeDatabase = Callable[[], Awaitable[str]]
Item = tuple[str, bytes, str]


@contextlib.asynccontextmanager
async def _serving(settings: IngestorSettings) -> AsyncIterator[tuple[Ingestor, asyncio.Task[None]]]:
    """An in-process ingestor, stopped cleanly on leaving unless the test cancelled it (an unclean stop);
    whatever killed it is raised here."""
    stop = asyncio.Event()
    ingestor = Ingestor(settings)
    task = asyncio.create_task(ingestor.run(stop))
    try:
        yield ingestor, task
    finally:
        stop.set()
        if not task.cancelled():
            await asyncio.wait_for(task, timeout=60)


async def _until(
    task: asyncio.Task[None], check: Callable[[], Awaitable[bool]], what: str, within: float = 30
) -> None:
    """Wait for ``check``; fail at once with the ingestor's own exception if it died meanwhile."""

    async def alive_and(check: Callable[[], Awaitable[bool]] = check) -> bool:
        if task.done():
            task.result()
            raise AssertionError(f"the ingestor stopped by itself while waiting for {what}")
        return await check()

    await wait_for(alive_and, within=within, what=what)


def _handled(ingestor: Ingestor) -> int:
    """Records whose batch was acked: stored ones ("messages") plus refused ones (dead-lettered)."""
    return ingestor.stats["messages"] + ingestor.stats["dead_lettered"]


async def _fetch(database_url: str, query: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def _problems(database_url: str) -> dict[tuple[str, int, str], Any]:
    rows = await _fetch(database_url, "SELECT * FROM telemetry_problems")
    return {(r["adapter_session_id"], r["seq"], r["problem"]): r for r in rows}


async def _has(database_url: str, *keys: tuple[str, int, str]) -> bool:
    return set(keys) <= set(await _problems(database_url))


async def _session(database_url: str, asid: str) -> Any:
    rows = await _fetch(database_url, "SELECT * FROM sessions WHERE adapter_session_id = $1", asid)
    return rows[0] if rows else None


def _nest(levels: int) -> Any:
    """A JSON object ``levels`` objects deep: {"k": {"k": ... "leaf"}}."""
    value: Any = "leaf"
    for _ in range(levels):
        value = {"k": value}
    return value


def _record(msg: TelemetryMessage) -> dict[str, Any]:
    """A record's JSON object; a field nested past pydantic's serializer limit goes in as it is."""
    try:
        return msg.model_dump(mode="json")
    except ValueError:
        deep: dict[str, Any] = {n: getattr(msg, n) for n in ("output", "task_metadata") if hasattr(msg, n)}
        return {**msg.model_dump(mode="json", exclude=set(deep)), **deep}


def _envelopes(messages: list[TelemetryMessage], per: int) -> list[Item]:
    """Forged AMQP bodies: the records grouped by kind into envelopes of ``per``, encoded by the standard
    library (orjson refuses to encode some of what they hold)."""
    out: list[Item] = []
    for kind in ("session.opened", "step", "session.closed"):
        group = [_record(m) for m in messages if m.kind == kind]
        for start in range(0, len(group), per):
            envelope = {"schema_version": 1, "kind": kind, "records": group[start : start + per]}
            out.append((kind, json.dumps(envelope).encode(), f"forged-{kind}-{start}"))
    return out


def _now(msg: TelemetryMessage) -> TelemetryMessage:
    """``msg`` as if sent just now (the sweeps' grace periods count from these times)."""
    now = datetime.now(UTC)
    fields = ("emitted_at", "opened_at", "started_at", "finished_at", "closed_at")
    return msg.model_copy(update={f: now for f in fields if f in type(msg).model_fields})


def _check_deep_line(line: dict[str, Any], levels: int) -> None:
    """The line holds task_metadata (``levels`` deep) as the storable rule writes it: the subtree at the
    depth limit became its JSON text, and the line says so."""
    value, kept = line["session_metadata"]["task_metadata"], 0
    while isinstance(value, dict):
        value, kept = value["k"], kept + 1
    assert kept == MAX_JSON_DEPTH - 2  # the line object and session_metadata are the first two levels
    assert isinstance(value, str)
    assert json.loads(value) == _nest(levels - kept)
    assert line["session_metadata"]["line_limits"] == {"deep_values_as_text": True}


def _lines(directory: Path) -> dict[str, dict[str, Any]]:
    return {
        (rec := orjson.loads(line))["adapter_session_id"]: rec
        for path in final_files(directory)
        for line in read_lines(path)
    }


async def test_deep_values_never_crash_and_restart_recovers(
    make_database: MakeDatabase, amqp_url: str, tmp_path: Path, cleanup: list[Topology]
) -> None:
    """Values nested 253/256 deep among 20 sessions: no crash, each accounted for, and a restart recovers."""
    gen = generate(23, seed=41, retry_share=0)
    deep_open, deep_step, extra = gen.sessions[0], gen.sessions[1], gen.sessions.pop()
    assert {deep_open.adapter_session_id, deep_step.adapter_session_id} <= gen.exported()
    deep_open.opened = deep_open.opened.model_copy(update={"task_metadata": _nest(253)})
    bad = deep_step.steps[1] = deep_step.steps[1].model_copy(update={"output": _nest(256)})
    ordinary = gen.exported() - {deep_open.adapter_session_id, deep_step.adapter_session_id}
    messages = gen.in_order()
    settings = await fresh_settings(
        make_database,
        amqp_url,
        tmp_path / "jsonl",
        batch_max_messages=20,
        jsonl_max_age_s=120,  # the file stays open: the unclean stop below leaves it to a recoverer
        sweep_interval_s=1.0,
    )
    cleanup.append(settings.topology())
    await publish(amqp_url, settings.topology(), _envelopes(messages, per=10))
    url, total_steps = settings.database_url, sum(len(s.steps) for s in gen.sessions)
    bad_key = (bad.adapter_session_id, bad.seq, "rejected")
    missing_key = (bad.adapter_session_id, -1, "missing_steps")

    async with _serving(settings) as (first, task):

        async def handled() -> bool:
            assigned = await _fetch(url, "SELECT id FROM sessions WHERE export_file IS NOT NULL")
            problems = await _problems(url)
            return (
                _handled(first) == len(messages)  # every record handled and its batch acked
                and (await db_counts(url))[:2] == (len(gen.sessions), total_steps - 1)
                and len(assigned) == len(ordinary) + 1
                and {bad_key, missing_key} <= set(problems)
            )

        await _until(task, handled, "every record handled, the deep step refused and explained")
        assert await open_files(url) != []
        task.cancel()  # unclean: no drain, no roll; the open file is left to a recoverer
        await asyncio.wait([task])
    assert task.cancelled()
    assert await ready_count(amqp_url, settings.topology()) == 0  # nothing was left unacked
    problems = await _problems(url)
    assert set(problems) == {bad_key, missing_key}
    assert problems[bad_key]["reason"].startswith("output cannot be stored as JSON")
    assert "missing seq 2" in problems[missing_key]["reason"]
    stored = await _session(url, deep_open.adapter_session_id)
    assert json.loads(stored["metadata"])["task_metadata"] == _nest(253)

    second = settings.model_copy(update={"ingestor_id": "second-ingestor"})
    async with _serving(second) as (_, task):
        await _until(task, lambda: _no_open_files(url), "the first ingestor's file recovered")
        await publish(amqp_url, settings.topology(), bodies(extra.messages))

        async def served() -> bool:
            row = await _session(url, extra.adapter_session_id)
            return row is not None and (row["export_file"] is not None) == bool(_exported(extra))

        await _until(task, served, "a new session stored by the second ingestor")
    counts = exported_counts(settings.jsonl_dir)
    assert counts == dict.fromkeys(ordinary | {deep_open.adapter_session_id} | _exported(extra), 1)
    _check_deep_line(_lines(settings.jsonl_dir)[deep_open.adapter_session_id], 253)
    assert [p.name for p in settings.jsonl_dir.iterdir() if p.name.startswith(".")] == []
    dead = await dead_letters(amqp_url, settings.topology())
    assert [m.headers[REASON_HEADER] for m in dead] == [f"rejected: {problems[bad_key]['reason']}"]
    assert dead[0].headers[SOURCE_HEADER] == "ingestor"
    assert bad.adapter_session_id.encode() in dead[0].body


def _exported(s: GenSession) -> set[str]:
    ok = s.closed is not None and s.closed.status in ("succeeded", "failed")
    return {s.adapter_session_id} if ok else set()


async def _no_open_files(database_url: str) -> bool:
    return await open_files(database_url) == []


async def test_start_recovers_a_deep_stored_row(
    make_database: MakeDatabase, amqp_url: str, tmp_path: Path, cleanup: list[Topology]
) -> None:
    """A stored row nested 253 deep in a dead owner's open file is recovered at start, unblocked."""
    settings = await fresh_settings(make_database, amqp_url, tmp_path / "jsonl", recovery_interval_s=600)
    cleanup.append(settings.topology())
    url, asid = settings.database_url, "as-deep"
    name = "sessions-20261125T090000.000000Z-dead-ingestor-000001.jsonl"
    metadata = {
        "task_id": "task-deep",
        "attempt": 1,
        "execution_mode": "stepwise",
        "task_metadata": _nest(253),
        "adapter_session": {"adapter_session_id": asid},
    }
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO jsonl_files (name, ingestor_id, owner_token, state, sessions)"
            " VALUES ($1, 'dead-ingestor', 'dead-ingestor/0123abcd/1', 'open', 1)",
            name,
        )
        session_id = await conn.fetchval(
            "INSERT INTO sessions (adapter_session_id, task_id, task, status, metadata, final_answer,"
            " created_at, completed_at, adapter_usage, adapter_events, attempt, steps_expected, export_file,"
            " stored_at) VALUES ($1, 'task-deep', 'a deep task', 'succeeded', $2::jsonb, 'the answer', now(),"
            " now(), '{}'::jsonb, '[]'::jsonb, 1, 1, $3, now()) RETURNING id",
            asid,
            json.dumps(metadata),
            name,
        )
        await conn.execute(
            "INSERT INTO step_results (session_id, step_id, trace, output, attempts, metadata,"
            " adapter_session_id, adapter_usage, adapter_events) VALUES ($1, 1, 'the trace', 'out', 1,"
            " '{\"phase\": \"execute\", \"seq\": 1}'::jsonb, $2, '{}'::jsonb, '[]'::jsonb)",
            session_id,
            asid,
        )
    finally:
        await conn.close()
    settings.jsonl_dir.mkdir(parents=True)
    _files.tmp_path(settings.jsonl_dir, name).write_bytes(b'{"adapter_session_id": "as-de')  # cut off
    gen = generate(3, seed=42, retry_share=0)
    await publish(amqp_url, settings.topology(), bodies(gen.in_order()))
    async with _serving(settings) as (_, task):

        async def consuming() -> bool:
            return await ready_count(amqp_url, settings.topology(), consumers=True) == 1

        await _until(task, consuming, "the ingestor to start consuming")
        assert name not in await open_files(url)  # recovered by the start (the periodic one waits 600 s)
        assert (settings.jsonl_dir / name).exists()
        assert not _files.tmp_path(settings.jsonl_dir, name).exists()  # and the cut-off tmp is gone

        async def drained() -> bool:
            return (await db_counts(url))[0] == 1 + len(gen.sessions)

        await _until(task, drained, "the queued sessions stored after the start")
    line = orjson.loads(read_lines(settings.jsonl_dir / name)[0])
    assert len(read_lines(settings.jsonl_dir / name)) == 1
    assert (line["adapter_session_id"], line["final_answer"]) == (asid, "the answer")
    _check_deep_line(line, 253)
    assert exported_counts(settings.jsonl_dir) == dict.fromkeys({asid} | gen.exported(), 1)


@pytest.mark.parametrize("same_envelope", [False, True], ids=["forged-first", "forged-in-real-envelope"])
async def test_forged_close_of_another_task(
    make_database: MakeDatabase, amqp_url: str, tmp_path: Path, cleanup: list[Topology], same_envelope: bool
) -> None:
    """A close carrying another task's task_id is dead-lettered as inconsistent; the real one lands."""
    s = next(
        s for s in generate(6, seed=43, retry_share=0).sessions if s.closed and s.closed.status == "succeeded"
    )
    assert s.closed is not None
    forged = s.closed.model_copy(update={"task_id": "task-forged-0001", "final_answer": "FORGED"})
    settings = await fresh_settings(make_database, amqp_url, tmp_path / "jsonl", jsonl_max_age_s=0.5)
    cleanup.append(settings.topology())
    url, topology, asid = settings.database_url, settings.topology(), s.adapter_session_id
    key = (asid, forged.seq, "inconsistent")
    async with _serving(settings) as (ingestor, task):
        await publish(amqp_url, topology, bodies([s.opened, *s.steps[:-1]]))

        async def stored_so_far() -> bool:
            return (await db_counts(url))[:2] == (1, len(s.steps) - 1)

        await _until(task, stored_so_far, "the opened and all steps but the last")
        if same_envelope:  # the forged close travels in one envelope with the real one, ahead of it
            closes = [("session.closed", encode_telemetry_batch([forged, s.closed]), "closes")]
        else:
            await publish(amqp_url, topology, [("session.closed", encode(forged), "forged")])
            await _until(task, lambda: _has(url, key), "the forged close noted")
            closes = [("session.closed", encode(s.closed), "real-close")]
        await publish(amqp_url, topology, [*closes, ("step", encode(s.steps[-1]), "last-step")])

        async def handled() -> bool:  # the opened, the steps, both closes
            return _handled(ingestor) == len(s.steps) + 3

        await _until(task, handled, "every record handled")
    row = await _session(url, asid)
    assert row["status"] == "succeeded", row["status"]
    assert (row["final_answer"], row["task_id"]) == (s.closed.final_answer, s.task_id)
    assert (await db_counts(url))[:2] == (1, len(s.steps))
    assert exported_counts(settings.jsonl_dir) == {asid: 1}
    problem = (await _problems(url))[key]
    assert (problem["task_id"], problem["kind"]) == ("task-forged-0001", "session.closed")
    dead = await dead_letters(amqp_url, topology)
    assert len(dead) == 1, [m.headers[REASON_HEADER] for m in dead]
    assert orjson.loads(dead[0].body)["final_answer"] == "FORGED"
    assert str(dead[0].headers[REASON_HEADER]) == (
        f"inconsistent: task_id 'task-forged-0001' does not match its session's task_id '{s.task_id}'"
    )


async def test_session_that_never_opens_is_flagged(
    make_database: MakeDatabase, amqp_url: str, tmp_path: Path, cleanup: list[Topology]
) -> None:
    """Stubs whose opened never comes (a step, or a step and a close) are flagged never_opened."""
    closed, open_ = generate(2, seed=44, retry_share=0).sessions
    assert closed.closed is not None
    settings = await fresh_settings(
        make_database, amqp_url, tmp_path / "jsonl", incomplete_after_s=1.0, sweep_interval_s=0.5
    )
    cleanup.append(settings.topology())
    url = settings.database_url
    forged = [_now(closed.steps[0]), _now(closed.closed), _now(open_.steps[0])]
    await publish(amqp_url, settings.topology(), bodies(forged))
    async with _serving(settings) as (_, task):
        flagged = (open_.adapter_session_id, -1, "never_opened")
        await _until(task, lambda: _has(url, flagged), "the step-only stub flagged")  # the sweep ran
        await asyncio.sleep(2.0)  # two more sweeps
    problems = await _problems(url)
    for s in (open_, closed):
        row = await _session(url, s.adapter_session_id)
        assert row["attempt"] is None
        assert row["export_file"] is None
        assert row["status"] != "running", s.adapter_session_id
        assert (s.adapter_session_id, -1, "never_opened") in problems, (s.adapter_session_id, row["status"])
        reason = problems[(s.adapter_session_id, -1, "never_opened")]["reason"]
        assert reason == "no session.opened arrived within 1s of the session's first record"
    assert exported_counts(settings.jsonl_dir) == {}
    assert await dead_letters(amqp_url, settings.topology()) == []


async def test_seq_gap_is_flagged_and_late_step_refused(
    make_database: MakeDatabase, amqp_url: str, tmp_path: Path, cleanup: list[Topology]
) -> None:
    """A close of 3 steps with seq 3 missing is flagged missing_steps; a step after the close is refused."""
    s = next(s for s in generate(6, seed=45, retry_share=0).sessions if len(s.steps) >= 3 and s.closed)
    assert s.closed is not None
    close = _now(s.closed.model_copy(update={"steps": 3, "seq": 4, "status": "succeeded"}))
    late = _now(s.steps[2].model_copy(update={"seq": 5, "step_id": 99}))
    settings = await fresh_settings(
        make_database, amqp_url, tmp_path / "jsonl", incomplete_after_s=1.0, sweep_interval_s=0.5
    )
    cleanup.append(settings.topology())
    url, asid = settings.database_url, s.adapter_session_id
    async with _serving(settings) as (_, task):
        await publish(amqp_url, settings.topology(), bodies([_now(s.opened), *map(_now, s.steps[:2]), close]))

        async def closed() -> bool:
            row = await _session(url, asid)
            return row is not None and row["steps_expected"] == 3 and (await db_counts(url))[1] == 2

        await _until(task, closed, "the opened, steps 1-2 and the close")
        await publish(amqp_url, settings.topology(), [("step", encode(late), "late-step")])
        keys = {(asid, -1, "missing_steps"), (asid, 5, "inconsistent")}
        await _until(task, lambda: _has(url, *keys), "the gap flagged and the late step refused")
    problems = await _problems(url)
    assert set(problems) == keys
    assert problems[(asid, -1, "missing_steps")]["reason"] == (
        "its close announced 3 step(s); 2 stored; missing seq 3"
    )
    row = await _session(url, asid)
    assert (row["status"], row["export_file"]) == ("succeeded", None)
    assert (await db_counts(url))[1] == 2
    assert exported_counts(settings.jsonl_dir) == {}
    dead = await dead_letters(amqp_url, settings.topology())
    assert [str(m.headers[REASON_HEADER]) for m in dead] == [
        "inconsistent: step seq 5 is not before its session's close (seq 4)"
    ]
    assert orjson.loads(dead[0].body)["seq"] == 5


async def _one_envelope_of_steps(
    settings: IngestorSettings, amqp_url: str, messages: list[TelemetryMessage], *, sessions: int
) -> Ingestor:
    """Publish ``messages`` with every step in one envelope and serve until each record is handled and all
    the sessions and all steps but one (the culprit) are stored; returns the stopped ingestor."""
    steps = sum(m.kind == "step" for m in messages)
    items = _envelopes(messages, per=steps)
    assert sum(kind == "step" for kind, _, _ in items) == 1  # one envelope holds every step
    await publish(amqp_url, settings.topology(), items)
    async with _serving(settings) as (ingestor, task):

        async def handled() -> bool:
            counts = await db_counts(settings.database_url)
            return _handled(ingestor) == len(messages) and counts[:2] == (sessions, steps - 1)

        await _until(task, handled, "every record handled")
    return ingestor


async def test_culprits_in_a_big_envelope_fall_alone(
    make_database: MakeDatabase, amqp_url: str, tmp_path: Path, cleanup: list[Topology]
) -> None:
    """One envelope of 50+ ordinary steps, a NUL trace and a 10**30 output: only the culprit is refused."""
    gen = generate(16, seed=46, retry_share=0)
    nul_s, big_s = gen.sessions[0], gen.sessions[1]
    nul = nul_s.steps[0] = nul_s.steps[0].model_copy(update={"trace": "bad\x00trace"})
    big = big_s.steps[0] = big_s.steps[0].model_copy(update={"output": {"n": 10**30}})
    messages = gen.in_order()
    steps = [m for m in messages if m.kind == "step"]
    assert len(steps) - 2 >= 50
    settings = await fresh_settings(make_database, amqp_url, tmp_path / "jsonl", batch_max_messages=20)
    cleanup.append(settings.topology())
    url = settings.database_url
    nul_key = (nul.adapter_session_id, nul.seq, "rejected")
    ingestor = await _one_envelope_of_steps(settings, amqp_url, messages, sessions=len(gen.sessions))
    assert ingestor.stats["dead_lettered"] == 1
    problems = await _problems(url)
    assert problems[nul_key]["reason"] == "trace holds a NUL character, which PostgreSQL text cannot hold"
    assert {k for k in problems if k[2] != "missing_steps"} == {nul_key}
    dead = await dead_letters(amqp_url, settings.topology())
    assert [str(m.headers[REASON_HEADER]) for m in dead] == [f"rejected: {problems[nul_key]['reason']}"]
    alone = orjson.loads(dead[0].body)  # the record's own JSON, not the envelope
    assert "records" not in alone
    assert (alone["adapter_session_id"], alone["seq"]) == (nul.adapter_session_id, nul.seq)
    assert alone["trace"] == "bad\x00trace"
    # orjson reads 10**30 as the double 1e30: the step is stored (as that double), not refused.
    stored = await _fetch(
        url,
        "SELECT r.output FROM step_results r JOIN sessions s ON s.id = r.session_id"
        " WHERE s.adapter_session_id = $1 AND r.step_id = $2",
        big.adapter_session_id,
        big.step_id,
    )
    assert orjson.loads(stored[0]["output"]) == {"n": float(10**30)}
    counts = exported_counts(settings.jsonl_dir)
    assert counts == dict.fromkeys(gen.exported() - {nul.adapter_session_id}, 1)
    assert await ready_count(amqp_url, settings.topology()) == 0


async def test_a_record_postgres_refuses_is_bisected_out_alone(
    make_database: MakeDatabase, amqp_url: str, tmp_path: Path, cleanup: list[Topology]
) -> None:
    """A step PostgreSQL refuses (a check constraint) that the ingestor's own checks pass, in one envelope
    with 50+ others: the batch is split until that step is alone, it is dead-lettered with PostgreSQL's
    reason, and every other record is stored and exported."""
    gen = generate(16, seed=47, retry_share=0)
    culprit_session = gen.sessions[0]
    culprit = culprit_session.steps[0] = culprit_session.steps[0].model_copy(update={"trace": "REFUSE-ME"})
    messages = gen.in_order()
    steps = [m for m in messages if m.kind == "step"]
    assert len(steps) - 1 >= 50
    settings = await fresh_settings(make_database, amqp_url, tmp_path / "jsonl", batch_max_messages=20)
    cleanup.append(settings.topology())
    url = settings.database_url
    conn = await asyncpg.connect(url)
    try:  # storage refuses what the contract allows: found only when PostgreSQL says no
        await conn.execute(
            "ALTER TABLE step_results ADD CONSTRAINT no_marked_traces"
            " CHECK (position('REFUSE-ME' in trace) = 0)"
        )
    finally:
        await conn.close()
    key = (culprit.adapter_session_id, culprit.seq, "rejected")
    ingestor = await _one_envelope_of_steps(settings, amqp_url, messages, sessions=len(gen.sessions))
    assert ingestor.stats["dead_lettered"] == 1
    problems = await _problems(url)
    assert set(problems) == {key}
    reason = problems[key]["reason"]
    assert reason.startswith("postgres 23514: "), reason
    assert "no_marked_traces" in reason
    dead = await dead_letters(amqp_url, settings.topology())
    assert [str(m.headers[REASON_HEADER]) for m in dead] == [f"rejected: {reason}"]
    alone = orjson.loads(dead[0].body)  # the record's own JSON, not the envelope
    assert "records" not in alone
    assert (alone["adapter_session_id"], alone["seq"], alone["trace"]) == (
        culprit.adapter_session_id,
        culprit.seq,
        "REFUSE-ME",
    )
    counts = exported_counts(settings.jsonl_dir)
    assert counts == dict.fromkeys(gen.exported() - {culprit.adapter_session_id}, 1)
    assert await ready_count(amqp_url, settings.topology()) == 0


async def test_an_unexpected_error_dead_letters_only_its_delivery(
    make_database: MakeDatabase,
    amqp_url: str,
    tmp_path: Path,
    cleanup: list[Topology],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug set off by one delivery (an error the ingestor does not expect, injected into its merge step)
    fails its batch; the batch is retried delivery by delivery, that one is dead-lettered as it came with
    the error as its reason and noted, the others are stored and exported, and the ingestor keeps going."""
    gen = generate(12, seed=48, retry_share=0)
    culprit = gen.sessions[0].steps[-1]
    messages = gen.in_order()

    def merge_or_fail(records: Iterable[TelemetryMessage], *args: Any, **kwargs: Any) -> MergedBatch:
        records = list(records)
        if any(key_of(r) == key_of(culprit) for r in records):
            raise RuntimeError("a bug, set off by one record")
        return merge_batch(records, *args, **kwargs)

    monkeypatch.setattr(_batches, "merge_batch", merge_or_fail)
    settings = await fresh_settings(make_database, amqp_url, tmp_path / "jsonl", batch_max_messages=50)
    cleanup.append(settings.topology())
    url = settings.database_url
    items = [(m.kind, encode(m), f"{m.adapter_session_id}:{m.seq}") for m in messages]  # one record each
    await publish(amqp_url, settings.topology(), items)
    key = (culprit.adapter_session_id, culprit.seq, "rejected")
    async with _serving(settings) as (ingestor, task):

        async def handled() -> bool:
            return _handled(ingestor) == len(messages) and await _has(url, key)

        await _until(task, handled, "every delivery handled")
        assert ingestor.stats["dead_lettered"] == 1
        survivor = generate(1, seed=49, retry_share=0)  # the ingestor still serves what comes next
        await publish(amqp_url, settings.topology(), bodies(survivor.in_order()))

        async def served() -> bool:
            row = await _session(url, survivor.sessions[0].adapter_session_id)
            return row is not None and row["steps_expected"] is not None

        await _until(task, served, "a session published after the failure stored")
    expected_reason = "the ingestor could not store it: RuntimeError('a bug, set off by one record')"
    problems = await _problems(url)
    assert set(problems) - {(culprit.adapter_session_id, -1, "missing_steps")} == {key}  # flagged by a sweep
    assert (problems[key]["reason"], problems[key]["kind"]) == (expected_reason, "step")
    dead = await dead_letters(amqp_url, settings.topology())
    assert [str(m.headers[REASON_HEADER]) for m in dead] == [f"rejected: {expected_reason}"]
    assert dead[0].body == encode(culprit)  # the delivery as it came
    assert (await db_counts(url))[1] == sum(len(s.steps) for s in gen.sessions) - 1 + len(
        survivor.sessions[0].steps
    )
    exported = gen.exported() - {culprit.adapter_session_id}
    assert exported_counts(settings.jsonl_dir) == dict.fromkeys(exported | survivor.exported(), 1)
    assert await ready_count(amqp_url, settings.topology()) == 0


async def test_a_second_close_is_refused_and_a_repeated_one_absorbed(
    make_database: MakeDatabase, amqp_url: str, tmp_path: Path, cleanup: list[Topology]
) -> None:
    """A second session.closed of a session (another seq: its task_id is right, the session already
    closed) is dead-lettered alone as inconsistent and noted, whether the first close was stored before or
    travels in the same envelope; the stored session keeps its first close and is exported once. The same
    close again (what a worker republishes for a task that already succeeded) is absorbed: no dead letter."""
    stored_first, same_envelope = [
        s for s in generate(8, seed=50, retry_share=0).sessions if s.closed and s.closed.status == "succeeded"
    ][:2]
    settings = await fresh_settings(make_database, amqp_url, tmp_path / "jsonl", jsonl_max_age_s=0.5)
    cleanup.append(settings.topology())
    url, topology = settings.database_url, settings.topology()

    def second_close(s: GenSession) -> SessionClosed:
        assert s.closed is not None
        seq = s.closed.seq + 1  # a close announcing one more step than the first: another seq
        return s.closed.model_copy(
            update={"seq": seq, "steps": seq - 1, "status": "failed", "final_answer": "SECOND", "reason": "x"}
        )

    late, inline = second_close(stored_first), second_close(same_envelope)
    assert stored_first.closed is not None
    assert same_envelope.closed is not None
    async with _serving(settings) as (ingestor, task):
        await publish(amqp_url, topology, bodies(stored_first.messages))

        async def first_exported() -> bool:
            row = await _session(url, stored_first.adapter_session_id)
            return row is not None and row["export_file"] is not None

        await _until(task, first_exported, "the first session stored and exported")
        await publish(
            amqp_url,
            topology,
            [
                ("session.closed", encode(stored_first.closed), "republished-close"),
                ("session.closed", encode(late), "late-second-close"),
                *bodies([same_envelope.opened, *same_envelope.steps]),
                ("session.closed", encode_telemetry_batch([same_envelope.closed, inline]), "two-closes"),
            ],
        )
        keys = {(c.adapter_session_id, c.seq, "inconsistent") for c in (late, inline)}
        await _until(task, lambda: _has(url, *keys), "both second closes noted")

        async def handled() -> bool:
            return _handled(ingestor) == len(stored_first.messages) + 2 + len(same_envelope.messages) + 1

        await _until(task, handled, "every record handled")
    problems = await _problems(url)
    assert set(problems) == keys
    for s, second in ((stored_first, late), (same_envelope, inline)):
        assert s.closed is not None
        reason = f"a second close (seq {second.seq}) for a session closed at seq {s.closed.seq}"
        assert problems[(s.adapter_session_id, second.seq, "inconsistent")]["reason"] == reason
        row = await _session(url, s.adapter_session_id)
        assert (row["status"], row["final_answer"], row["steps_expected"]) == (
            "succeeded",
            s.closed.final_answer,
            s.closed.steps,
        )
    dead = await dead_letters(amqp_url, topology)
    assert sorted(orjson.loads(m.body)["adapter_session_id"] for m in dead) == sorted(
        [stored_first.adapter_session_id, same_envelope.adapter_session_id]
    )
    assert all(orjson.loads(m.body)["final_answer"] == "SECOND" for m in dead)
    assert all(str(m.headers[REASON_HEADER]).startswith("inconsistent: a second close (seq ") for m in dead)
    counts = exported_counts(settings.jsonl_dir)
    assert counts == {stored_first.adapter_session_id: 1, same_envelope.adapter_session_id: 1}
    assert await ready_count(amqp_url, topology) == 0


async def test_a_commit_whose_reply_was_lost_still_reaches_the_file(
    make_database: MakeDatabase, amqp_url: str, tmp_path: Path, cleanup: list[Topology]
) -> None:
    """A batch whose COMMIT went through but whose reply was lost assigned a session to the open file that
    its writer never appended (seen in CI: PgBouncer's KILL, 25 sessions missing from a final file). The
    roll sees the file row count more than the tmp holds and regenerates the file: the session is in it."""
    gen = generate(6, seed=48, retry_share=0)
    settings = await fresh_settings(make_database, amqp_url, tmp_path / "jsonl", jsonl_max_age_s=300.0)
    cleanup.append(settings.topology())
    url = settings.database_url
    await publish(amqp_url, settings.topology(), bodies(gen.in_order()))
    async with _serving(settings) as (_, task):
        await _until(task, lambda: _exported_in_db(url, len(gen.sessions)), "every session assigned")
        (open_name,) = await open_files(url)
        conn = await asyncpg.connect(url)
        try:  # what the lost-reply commit did: one more complete session assigned to the open file
            async with conn.transaction():
                copy_id = await conn.fetchval(
                    "INSERT INTO sessions (task, status, metadata, final_answer, created_at, completed_at,"
                    " adapter_session_id, adapter_usage, adapter_events, task_id, attempt, steps_expected,"
                    " export_file, stored_at)"
                    " SELECT task, status, metadata, final_answer, created_at, completed_at, 'lost-reply',"
                    " adapter_usage, adapter_events, 'task-lost-reply', attempt, steps_expected, $1, now()"
                    " FROM sessions WHERE export_file = $1 ORDER BY id LIMIT 1 RETURNING id",
                    open_name,
                )
                await conn.execute(
                    "INSERT INTO step_results (session_id, step_id, trace, output, evaluation, attempts,"
                    " metadata, adapter_session_id, adapter_usage, adapter_events)"
                    " SELECT $1, step_id, trace, output, evaluation, attempts, metadata, 'lost-reply',"
                    " adapter_usage, adapter_events FROM step_results"
                    " WHERE session_id = (SELECT min(id) FROM sessions WHERE export_file = $2 AND id <> $1)",
                    copy_id,
                    open_name,
                )
                await conn.execute(
                    "UPDATE jsonl_files SET sessions = sessions + 1 WHERE name = $1", open_name
                )
        finally:
            await conn.close()
    counts = exported_counts(settings.jsonl_dir)
    assert counts["lost-reply"] == 1
    assert sum(counts.values()) == len(gen.sessions) + 1
    assert all(n == 1 for n in counts.values())


async def _exported_in_db(url: str, expected: int) -> bool:
    conn = await asyncpg.connect(url)
    try:
        done: int = await conn.fetchval("SELECT count(*) FROM sessions WHERE export_file IS NOT NULL")
    finally:
        await conn.close()
    return done >= expected
