"""Pure parts of the ingestor: batch merging, row merging, file naming, line building, roll decisions."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypedDict, cast

import asyncpg
import orjson
import pytest
from pydantic import ValidationError

from atlas_common._db import connect_options, pool_options
from ingestor import IngestorSettings, build_line, read_lines
from ingestor._batch import merge_batch, task_lock_key
from ingestor._consumer import collect
from ingestor._errors import DatabaseUnavailable, MessageRejected
from ingestor._files import (
    check_file_name,
    compress,
    make_file_name,
    name_of_tmp,
    recover_tmp_path,
    safe_path,
    should_roll,
    tmp_path,
)
from ingestor._linecache import LineCache
from ingestor._rows import StepRow, apply_change, fresh_row, output_text, step_row
from ingestor._store import classify
from ingestor._turns import in_turns
from ingestor._write import Written
from schemas import TelemetryMessage
from tests._ingest_gen import generate

T0 = datetime(2026, 11, 25, 11, 42, 33, 123456, tzinfo=UTC)


def test_merge_batch_dedupes_and_sorts() -> None:
    """Duplicates collapse (lowest seq per step wins), sessions and steps come out sorted for lock order."""
    gen = generate(5, seed=1, retry_share=0)
    messages = gen.in_order()
    shuffled = messages + messages[:7]
    random.Random(2).shuffle(shuffled)
    merged = merge_batch(shuffled)
    assert merged.duplicates == 7
    assert [c.adapter_session_id for c in merged.sessions] == sorted(
        s.adapter_session_id for s in gen.sessions
    )
    assert [(s.adapter_session_id, s.step_id) for s in merged.steps] == sorted(
        (s.adapter_session_id, s.step_id) for g in gen.sessions for s in g.steps
    )
    for change, source in zip(
        merged.sessions, sorted(gen.sessions, key=lambda s: s.adapter_session_id), strict=True
    ):
        assert change.opened == source.opened
        assert change.closed == source.closed
        assert change.first_seen == min(m.emitted_at for m in source.messages)
    later = gen.sessions[0].steps[1].model_copy(update={"seq": 99})
    again = merge_batch([later, gen.sessions[0].steps[1]])
    assert [s.seq for s in again.steps] == [gen.sessions[0].steps[1].seq]
    assert merge_batch([]).sessions == []
    assert merged.task_lock_keys == sorted({task_lock_key(s.task_id) for s in gen.sessions})


def test_merge_batch_settles_which_task_a_session_belongs_to() -> None:
    """Records of one session naming different tasks: the stored owner wins, else the opened's task, else
    the batch is ambiguous until asked to decide (majority, first seen on a tie); the others are refused."""
    session = generate(1, seed=3, retry_share=0).sessions[0]
    steps = session.steps
    forged = [s.model_copy(update={"task_id": "task-forged"}) for s in steps[:2]]

    with_opened = merge_batch([session.opened, *forged, *steps[2:]])
    assert not with_opened.ambiguous
    assert [c.task_id for c in with_opened.sessions] == [session.opened.task_id]
    assert {k[1] for k in with_opened.rejected} == {s.seq for s in forged}

    without = [*forged, *steps[2:]]
    assert merge_batch(without).ambiguous == {session.adapter_session_id}
    majority = "task-forged" if len(forged) > len(steps[2:]) else session.task_id
    decided = merge_batch(without, decide=True)
    assert not decided.ambiguous
    assert [c.task_id for c in decided.sessions] == [majority]
    tie = merge_batch([forged[0], steps[2]], decide=True)
    assert [c.task_id for c in tie.sessions] == ["task-forged"]

    known = merge_batch(without, {session.adapter_session_id: session.task_id})
    assert not known.ambiguous
    assert [c.task_id for c in known.sessions] == [session.task_id]
    assert {k[1] for k in known.rejected} == {s.seq for s in forged}
    stored_elsewhere = merge_batch(steps, {session.adapter_session_id: "task-stored"})
    assert {k[1] for k in stored_elsewhere.rejected} == {s.seq for s in steps}


def test_session_row_is_order_independent() -> None:
    """Applying a session's opened and closed in any batching and order gives the same row."""
    source = generate(1, seed=3, retry_share=0).sessions[0]
    assert source.closed is not None
    messages: list[TelemetryMessage] = [source.opened, *source.steps, source.closed]
    rows = set()
    for order in itertools.permutations(messages):
        for cut in range(1, len(order) + 1):
            row = None
            for part in (order[:cut], order[cut:]):
                for change in merge_batch(part).sessions:
                    row = apply_change(row, change)
            assert row is not None
            rows.add(
                orjson.dumps(
                    row, option=orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS, default=_as_dict
                )
            )
        if len(rows) > 1:
            break
    assert len(rows) == 1
    row = orjson.loads(rows.pop())
    assert row["status"] == source.closed.status
    assert row["task"] == source.opened.task
    assert row["metadata"]["adapter_session"]["usage"] == source.closed.totals.model_dump()


def test_fresh_row_is_the_general_merge_of_a_new_session() -> None:
    """fresh_row (the fast path for sessions new to the database) equals apply_change(None, change) for
    every split of every session's records, retries and limits included."""
    gen = generate(12, seed=11, retry_share=0.5)
    checked = 0
    for source in gen.sessions:
        messages = list(source.messages)
        for cut in range(len(messages) + 1):
            for part in (messages[:cut], messages[cut:]):
                for change in merge_batch(part).sessions:
                    assert fresh_row(change) == apply_change(None, change)
                    checked += 1
    limited = gen.sessions[0].opened.model_copy(update={"limits": {"task": {"chars": 9}}})
    change = merge_batch([limited]).sessions[0]
    assert fresh_row(change) == apply_change(None, change)
    assert fresh_row(change).metadata["limits"] == {"task": {"chars": 9}}
    assert checked > 100


def _as_dict(value: object) -> object:
    return {k: getattr(value, k) for k in value.__slots__}  # type: ignore[attr-defined]


def test_step_row_output_and_metadata() -> None:
    """Step output is text (JSON for non-strings, NULL for None) and metadata carries phase, seq, timings."""
    step = generate(1, seed=4, retry_share=0).sessions[0].steps[0]
    row = step_row(step)
    assert row["metadata"]["phase"] == "plan"
    assert row["metadata"]["seq"] == 1
    elapsed = step.finished_at - step.started_at
    assert row["metadata"]["duration_ms"] == round(elapsed.total_seconds() * 1000)
    assert row["adapter_usage"] == step.usage.model_dump(mode="json")
    assert output_text("x") == "x"
    assert output_text(None) is None
    assert output_text({"a": [1]}) == '{"a":[1]}'


def test_file_names_sort_and_stay_inside_dir(tmp_path: Path) -> None:
    """Generated names sort by time, carry the ingestor id, and unsafe names or ids are refused."""
    a = make_file_name("ing-1", 1, now=T0)
    b = make_file_name("ing-1", 2, now=T0 + timedelta(microseconds=1))
    assert a == "sessions-20261125T114233.123456Z-ing-1-000001.jsonl"
    assert sorted([b, a]) == [a, b]
    assert make_file_name("x", 3, now=T0, compression="zstd").endswith(".jsonl.zst")
    assert safe_path(tmp_path, a) == tmp_path / a
    for bad in ("../x", "a/b", "..", "x..y", "a\\b"):
        with pytest.raises(ValueError, match="not a valid"):
            make_file_name(bad, 1, now=T0)
    for bad in (
        "../etc/passwd",
        "sessions-x.jsonl/../../y",
        "/abs",
        "",
        "sessions-20261125T114233.123456Z-a-1.jsonl",
    ):
        with pytest.raises(ValueError, match="not a valid"):
            check_file_name(bad)
    assert name_of_tmp(tmp_path_of(tmp_path, a)) == a
    assert name_of_tmp(recover_tmp_path(tmp_path, a, "abc123").name) == a
    assert name_of_tmp(".something-else.tmp") is None
    with pytest.raises(ValidationError):
        IngestorSettings(ingestor_id="../evil")
    with pytest.raises(ValidationError):
        IngestorSettings(ingestor_id="a..b")


def tmp_path_of(directory: Path, name: str) -> str:
    return tmp_path(directory, name).name


def test_settings_defaults_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Prefetch defaults to a batch per batch in flight (at least two), env names are the documented ones,
    ids are unique per process."""
    monkeypatch.setenv("INGESTOR_JSONL_DIR", str(tmp_path))
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h/db")
    monkeypatch.setenv("INGESTOR_BATCH_MAX_MESSAGES", "300")
    settings = IngestorSettings()
    assert settings.jsonl_dir == tmp_path
    assert settings.database_url == "postgresql://u@h/db"
    assert settings.batches_in_flight == 5
    assert settings.prefetch_count == 1500
    assert IngestorSettings(batch_max_messages=300, batches_in_flight=1).prefetch_count == 600
    monkeypatch.setenv("INGESTOR_BATCHES_IN_FLIGHT", "4")
    assert IngestorSettings().prefetch_count == 1200
    assert IngestorSettings(prefetch=7).prefetch_count == 7
    assert settings.ingestor_id != IngestorSettings().ingestor_id
    assert (settings.batch_max_messages, IngestorSettings(batch_max_messages=1000).flush_interval_s) == (
        300,
        0.2,
    )


def test_old_unprefixed_names_still_work_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """JSONL_DIR (the name before the INGESTOR_ prefix) is still read, with a warning naming the new name;
    the new name wins when both are set."""
    monkeypatch.setenv("JSONL_DIR", str(tmp_path / "old"))
    monkeypatch.setenv("FLUSH_INTERVAL_S", "0.7")
    with pytest.warns(FutureWarning) as warned:
        settings = IngestorSettings()
    messages = sorted(str(w.message) for w in warned)
    assert messages == [
        "environment variable FLUSH_INTERVAL_S is deprecated: use INGESTOR_FLUSH_INTERVAL_S",
        "environment variable JSONL_DIR is deprecated: use INGESTOR_JSONL_DIR",
    ]
    assert (settings.jsonl_dir, settings.flush_interval_s) == (tmp_path / "old", 0.7)
    monkeypatch.setenv("INGESTOR_JSONL_DIR", str(tmp_path / "new"))
    monkeypatch.delenv("FLUSH_INTERVAL_S")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name set: the old one is ignored, and nothing warns
        assert IngestorSettings().jsonl_dir == tmp_path / "new"


class _RollLimits(TypedDict):
    max_bytes: int
    max_age_s: float


def test_roll_decisions() -> None:
    """A file rolls when it holds a session and is big enough or old enough, never when empty."""
    kw: _RollLimits = {"max_bytes": 1000, "max_age_s": 60.0}
    assert not should_roll(size=0, age_s=999, sessions=0, **kw)
    assert not should_roll(size=999, age_s=59, sessions=5, **kw)
    assert should_roll(size=1000, age_s=0, sessions=1, **kw)
    assert should_roll(size=1, age_s=60, sessions=1, **kw)


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_appended_members_read_back(tmp_path: Path, compression: str) -> None:
    """Each append is a self-contained gzip member / zstd frame, and the file reads back as all lines."""
    name = make_file_name("t", 1, now=T0, compression=compression)  # type: ignore[arg-type]
    path = tmp_path / name
    path.write_bytes(compress(b'{"a":1}\n{"a":2}\n', compression) + compress(b'{"a":3}\n', compression))  # type: ignore[arg-type]
    assert read_lines(path) == [b'{"a":1}', b'{"a":2}', b'{"a":3}']


def _step(step_id: int, phase: str) -> dict[str, object]:
    return {
        "step_id": step_id,
        "trace": f"t{step_id}",
        "output": None if step_id == 2 else f"o{step_id}",
        "attempts": 1,
        "metadata": {"phase": phase, "description": f"d{step_id}", "seq": step_id + 1},
        "adapter_session_id": "as-1",
        "adapter_usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2, "calls": 1},
        "adapter_events": [{"type": "tool_call"}],
    }


def _session_row() -> dict[str, Any]:
    return {
        "id": 42,
        "adapter_session_id": "as-1",
        "task": "t",
        "status": "succeeded",
        "final_answer": None,
        "metadata": {
            "task_id": "T",
            "execution_mode": "stepwise",
            "adapter_session": {"adapter_session_id": "as-1"},
        },
        "created_at": T0,
        "completed_at": T0 + timedelta(seconds=2),
        "adapter_usage": {"calls": 4},
        "adapter_events": None,
        "plan": {"steps": [{"id": 1}, {"id": 2}]},
    }


def test_line_from_rows() -> None:
    """A line has the Atlas session shape (every step row in step order, its phase, ISO times, adapter
    fields); stable."""
    session = _session_row()
    steps = [_step(3, "synthesize"), _step(2, "execute"), _step(0, "plan"), _step(1, "execute")]
    line = build_line(session, steps)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert build_line(session, list(reversed(steps))) == line
    record = orjson.loads(line)
    assert record["final_answer"] == ""
    assert record["adapter_events"] == []
    assert [s["step_id"] for s in record["steps"]] == [0, 1, 2, 3]
    assert [s["phase"] for s in record["steps"]] == ["plan", "execute", "execute", "synthesize"]
    assert record["steps"][2]["output"] == ""
    assert record["steps"][1]["usage"] == record["steps"][1]["adapter_usage"]
    meta = record["session_metadata"]
    assert (meta["session_id"], meta["status"], meta["task_id"]) == (42, "succeeded", "T")
    assert meta["created_at"] == "2026-11-25T11:42:33.123456+00:00"
    assert "phases" not in meta["adapter_session"]  # plan and synthesis are steps, as in step_results
    assert record["execution_mode"] == "stepwise"
    assert record["adapter_session_id"] == "as-1"
    assert record["adapter_usage"] == {"calls": 4}
    assert session["metadata"]["adapter_session"] == {"adapter_session_id": "as-1"}  # input untouched


def _steps(*ids: int) -> list[StepRow]:
    phases = {0: "plan", 3: "synthesize"}
    return [cast(StepRow, _step(i, phases.get(i, "execute"))) for i in ids]


async def test_line_cache_builds_a_line_only_from_a_whole_session() -> None:
    """Steps kept from earlier batches complete a line in memory, equal to the line built from all rows;
    a session with a step missing, or evicted past the memory bound, is left to Postgres (None)."""
    session = _session_row()
    whole = build_line(session, _steps(0, 1, 2, 3))
    cache = LineCache(max_bytes=1 << 20)
    assert await cache.committed(Written(steps={42: _steps(0, 1), 43: _steps(0)})) == []
    assert len(cache) == 2
    done = Written(assigned=[42], rows={42: session}, steps_expected={42: 4}, steps={42: _steps(2, 3)})
    assert await cache.committed(done) == [(42, whole)]
    assert len(cache) == 1  # 42's rows are released once its line is built

    partial = LineCache(max_bytes=1 << 20)
    await partial.committed(Written(steps={42: _steps(0, 1)}))
    gap = Written(assigned=[42], rows={42: session}, steps_expected={42: 4}, steps={42: _steps(3)})
    assert await partial.committed(gap) == [(42, None)]
    assert partial.size_bytes == 0

    tiny = LineCache(max_bytes=1)  # every step row is evicted after its batch
    await tiny.committed(Written(steps={42: _steps(0, 1)}))
    assert (len(tiny), tiny.size_bytes) == (0, 0)
    assert await tiny.committed(done) == [(42, None)]
    not_written_here = Written(assigned=[42], steps_expected={}, steps={42: _steps(0, 1, 2, 3)})
    assert await LineCache(max_bytes=1 << 20).committed(not_written_here) == [(42, None)]


async def test_line_cache_keeps_each_line_beside_its_session_across_many_turns() -> None:
    """A batch assigning more sessions than one turn builds (some whole in memory, some not): every
    session gets its own line, or None, in the order the batch assigned them."""
    assigned = list(range(100, 170))
    whole = {sid for sid in assigned if sid % 3}
    rows = {sid: {**_session_row(), "id": sid} for sid in whole}
    cache = LineCache(max_bytes=1 << 20)
    done = Written(
        assigned=assigned,
        rows=rows,
        steps_expected=dict.fromkeys(whole, 4),
        steps={sid: _steps(0, 1, 2, 3) for sid in assigned},
    )
    expected = [
        (sid, build_line(rows[sid], _steps(0, 1, 2, 3)) if sid in whole else None) for sid in assigned
    ]
    assert await cache.committed(done) == expected


async def test_in_turns_builds_everything_in_order_and_lets_others_run_between_slices() -> None:
    """in_turns gives what a list comprehension gives, and a ready coroutine runs between two slices."""
    log: list[str] = []

    def build(x: int) -> int:
        log.append("build")
        return x * x

    async def other() -> None:
        for _ in range(3):
            log.append("other")
            await asyncio.sleep(0)

    task = asyncio.create_task(other())
    assert await in_turns(list(range(10)), build, per_turn=4) == [x * x for x in range(10)]
    await task
    first_other = log.index("other")
    assert log[:first_other] == ["build"] * 4, log  # the first slice ran whole, then the other's turn
    assert log.count("build") == 10


def test_error_classification() -> None:
    """Data errors bisect (MessageRejected); connection, deadlock and schema errors hold the batch."""
    assert isinstance(classify(asyncpg.CharacterNotInRepertoireError("nul")), MessageRejected)
    assert isinstance(classify(asyncpg.UntranslatableCharacterError("nul")), MessageRejected)
    assert isinstance(classify(asyncpg.NotNullViolationError("x")), MessageRejected)
    for err in (
        asyncpg.ConnectionDoesNotExistError("x"),
        asyncpg.DeadlockDetectedError("x"),
        asyncpg.UndefinedTableError("x"),
        asyncpg.AdminShutdownError("x"),
        ConnectionRefusedError(),
        TimeoutError(),
        asyncpg.InterfaceError("closed"),
    ):
        assert isinstance(classify(err), DatabaseUnavailable), err


@dataclass(frozen=True)
class _Item:
    n: int
    weight: int
    received_at: float = field(default_factory=time.monotonic)


def _same(item: _Item) -> _Item:
    return item


async def test_collect_flushes_on_size_or_age() -> None:
    """A batch closes at batch_max_messages records or flush_interval_s after its first, whichever first."""
    sink: asyncio.Queue[_Item] = asyncio.Queue()
    for i in range(7):
        sink.put_nowait(_Item(i, 2 if i == 1 else 1))
    assert [x.n for x in await collect(sink, _same, max_messages=5, flush_interval_s=10, wait_s=1)] == [
        0,
        1,
        2,
        3,
    ]
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert [x.n for x in await collect(sink, _same, max_messages=5, flush_interval_s=0.1, wait_s=1)] == [
        4,
        5,
        6,
    ]
    assert 0.09 <= loop.time() - started < 1
    assert await collect(sink, _same, max_messages=5, flush_interval_s=0.1, wait_s=0.05) == []


async def test_a_batch_is_due_an_interval_after_its_first_delivery_arrived() -> None:
    """Deliveries that waited while the previous batch was written are flushed as soon as they are taken,
    not an interval after that (they would be stored one write plus one interval late); a batch whose first
    delivery just arrived still waits for more until it is an interval old."""
    sink: asyncio.Queue[_Item] = asyncio.Queue()
    waited = time.monotonic() - 0.3  # arrived 300 ms ago, during a write
    for i in range(2):
        sink.put_nowait(_Item(i, 1, received_at=waited))
    started = time.monotonic()
    assert [x.n for x in await collect(sink, _same, max_messages=5, flush_interval_s=0.2, wait_s=1)] == [0, 1]
    assert time.monotonic() - started < 0.05
    sink.put_nowait(_Item(2, 1))
    started = time.monotonic()
    assert [x.n for x in await collect(sink, _same, max_messages=5, flush_interval_s=0.2, wait_s=1)] == [2]
    assert 0.15 <= time.monotonic() - started < 1


async def test_collect_decodes_one_delivery_per_turn_of_the_loop() -> None:
    """A coroutine that is ready while a backlog is collected (a batch transaction with its next statement
    to send) runs between two decodes, not after the whole batch was decoded."""
    log: list[str] = []
    sink: asyncio.Queue[_Item] = asyncio.Queue()
    for i in range(4):
        sink.put_nowait(_Item(i, 1))

    def decode(item: _Item) -> _Item:
        log.append(f"decode {item.n}")
        return item

    async def transaction() -> None:
        for statement in range(3):
            log.append(f"statement {statement}")
            await asyncio.sleep(0)

    other = asyncio.create_task(transaction())
    batch = await collect(sink, decode, max_messages=4, flush_interval_s=10, wait_s=1)
    await other
    assert [x.n for x in batch] == [0, 1, 2, 3]
    decodes = [i for i, entry in enumerate(log) if entry.startswith("decode")]
    assert all(b - a > 1 for a, b in itertools.pairwise(decodes[:3])), log


def test_prefetch_follows_message_size() -> None:
    """Small messages get the full prefetch, large envelopes a count that bounds the bytes in flight."""
    from ingestor._consumer import prefetch_for

    assert prefetch_for(500, 16 * 1024 * 1024, 2000) == 2000
    assert prefetch_for(256 * 1024, 16 * 1024 * 1024, 2000) == 64
    assert prefetch_for(50 * 1024 * 1024, 16 * 1024 * 1024, 2000) == 8


def test_transaction_pooler_needs_a_direct_liveness_url() -> None:
    """INGESTOR_DB_POOLER=transaction without INGESTOR_LIVENESS_DATABASE_URL is refused; with it, only the
    owner lock's connection uses it."""
    pooled = "postgresql://atlas@pgbouncer:6432/atlas"
    with pytest.raises(ValidationError, match="INGESTOR_LIVENESS_DATABASE_URL"):
        IngestorSettings(database_url=pooled, db_pooler="transaction")
    settings = IngestorSettings(
        database_url=pooled, db_pooler="transaction", liveness_database_url="postgresql://atlas@db:5432/atlas"
    )
    assert (settings.database_url, settings.liveness_url) == (pooled, "postgresql://atlas@db:5432/atlas")
    assert IngestorSettings(database_url=pooled).liveness_url == pooled


def test_pool_options_behind_a_transaction_pooler() -> None:
    """Behind a transaction pooler asyncpg gets no statement cache and no reset query; direct keeps both."""
    assert pool_options("none") == connect_options("none") == {}
    assert connect_options("transaction") == {"statement_cache_size": 0}
    options = pool_options("transaction")
    assert options["statement_cache_size"] == 0
    assert callable(options["reset"])
    # a pool whose users leave no session state skips the reset query on a direct connection too
    assert callable(pool_options("none", reset=False)["reset"])
