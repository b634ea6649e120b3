"""The training feed: cursors and the file follower without services, then the sessions stream against
the real broker, database and ingestor (replay by time, a follower killed and restarted)."""

from __future__ import annotations

import asyncio
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import orjson
import pytest

from bench._ports import stop_processes
from feed import FeedSettings, Position, follow_files, follow_sessions
from feed.__main__ import parse_start
from feed._cursor import StreamCursor, cursor_path
from feed._seek import Seen
from feed._seek import search as seek_search
from ingestor import IngestorSettings, read_lines
from ingestor._stream import stream_messages
from tests._ingest_env import (
    delete_topology,
    fresh_settings,
    running,
    wait_drained,
)
from tests._ingest_gen import Generated, bodies, generate, publish

# --- without services ----------------------------------------------------------------------------------


def test_stream_cursor_resumes_and_hides_duplicates_across_restarts(tmp_path: Path) -> None:
    """The cursor's log gives back the last offset and the recent ids after a restart, a torn last line
    (a kill mid-write) is ignored, and compaction keeps both."""
    path = tmp_path / "c.stream-cursor"
    cursor = StreamCursor(path, window=3)
    assert cursor.offset is None
    for n, asid in enumerate(["a", "b", "c", "d", "e", "f", "g"]):
        cursor.done(n // 2, n % 2, asid)  # two sessions per stream message
    cursor.close()
    assert len(path.read_bytes().splitlines()) <= 6  # compacted past twice the window
    with path.open("ab") as out:
        out.write(b"99\t0")  # torn: a kill in the middle of "99\t0\tx\n"
    again = StreamCursor(path, window=3)
    assert (again.offset, again.index) == (3, 0)
    assert again.passed(3, 0)
    assert not again.passed(3, 1)
    assert [again.seen(x) for x in "defg"] == [False, True, True, True]
    again.done(3, 1, "h")
    again.close()
    resumed = StreamCursor(path, window=3)
    assert (resumed.offset, resumed.index) == (3, 1)


def test_consumer_names_cannot_leave_the_cursor_dir(tmp_path: Path) -> None:
    """A consumer name is a file name inside the cursor directory, never a path."""
    assert cursor_path(tmp_path, "grpo-1", "x") == tmp_path / "grpo-1.x"
    for bad in ("../up", "a/b", "..", ".hidden", ""):
        with pytest.raises(ValueError, match="consumer name"):
            cursor_path(tmp_path, bad, "x")


def test_parse_start() -> None:
    """--from takes the stream's names, an offset, or an ISO time (naive means UTC later)."""
    assert parse_start("first") == "first"
    assert parse_start("42") == 42
    assert parse_start("42:3") == Position(42, 3)
    assert str(Position.parse("7:0")) == "7:0"
    assert parse_start("2026-11-30T01:02:03+00:00") == datetime(2026, 11, 30, 1, 2, 3, tzinfo=UTC)
    with pytest.raises(Exception, match="ISO 8601"):
        parse_start("yesterday")


def test_lines_are_packed_into_messages_and_an_oversized_one_becomes_a_pointer() -> None:
    """One message per batch up to the size limit, lines unchanged and in order; a line over the limit
    alone becomes a small pointer naming the session and its file."""
    lines = [orjson.dumps({"adapter_session_id": f"as-{i}", "pad": "x" * 300}) + b"\n" for i in range(10)]
    big = (
        orjson.dumps({"adapter_session_id": "as-big", "steps": ["x" * 5000], "session_metadata": {}}) + b"\n"
    )
    messages = stream_messages([*lines[:5], big, *lines[5:]], "f.jsonl", max_bytes=1000, now_ms=7)
    bodies = [m.body for m in messages]
    assert b"".join(bodies).count(b"\n") == 11
    assert all(len(b) <= 1000 for b in bodies)
    assert b"".join(bodies).startswith(b"".join(lines[:2]))
    pointer = next(orjson.loads(x) for b in bodies for x in b.splitlines() if b"as-big" in x)
    assert (pointer["omitted_bytes"], pointer["jsonl_file"]) == (len(big) - 1, "f.jsonl")
    assert sum(m.headers["atlas-sessions"] for m in messages) == 11  # type: ignore[misc]
    assert len(stream_messages(lines, "f.jsonl", max_bytes=1 << 20, now_ms=7)) == 1


def _final(directory: Path, name: str, ids: list[str]) -> None:
    (directory / name).write_bytes(b"".join(orjson.dumps({"adapter_session_id": i}) + b"\n" for i in ids))


async def _take(follow_dir: Path, settings: FeedSettings, n: int | None, *, live: bool = False) -> list[str]:
    got: list[str] = []
    async with follow_files(follow_dir, consumer="rm", settings=settings, live=live) as lines:
        async for line in lines:
            got.append(line.record()["adapter_session_id"])
            if n is not None and len(got) == n:
                break
    return got


async def test_file_follower_resumes_and_never_reads_temporaries(tmp_path: Path) -> None:
    """Final files only, each line once across a stop and a restart, and a file that becomes final later
    with an older name is still read."""
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    settings = FeedSettings(cursor_dir=tmp_path / "cursors", poll_interval_s=0.05)
    _final(jsonl, "sessions-20261130T010000.000000Z-a-000001.jsonl", ["a1", "a2", "a3"])
    _final(jsonl, "sessions-20261130T020000.000000Z-b-000001.jsonl", ["b1", "b2"])
    (jsonl / ".sessions-20261130T030000.000000Z-c-000001.jsonl.tmp").write_bytes(
        b'{"adapter_session_id":"tmp"}\n'
    )
    first = await _take(jsonl, settings, 2)
    assert first == ["a1", "a2"]
    _final(jsonl, "sessions-20261130T003000.000000Z-z-000001.jsonl", ["z1"])  # finalised late, older name
    rest = await _take(jsonl, settings, None)
    assert rest == ["a3", "z1", "b1", "b2"]
    assert await _take(jsonl, settings, None) == []

    async def later() -> None:
        await asyncio.sleep(0.3)
        _final(jsonl, "sessions-20261130T040000.000000Z-d-000001.jsonl", ["d1"])

    writer = asyncio.create_task(later())
    assert await asyncio.wait_for(_take(jsonl, settings, 1, live=True), 10) == ["d1"]
    await writer


async def test_an_error_in_the_loop_hands_the_session_out_again(tmp_path: Path) -> None:
    """A line whose processing raised is not counted as finished: the next follow starts with it."""
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    settings = FeedSettings(cursor_dir=tmp_path / "cursors")
    _final(jsonl, "sessions-20261130T010000.000000Z-a-000001.jsonl", ["a1", "a2", "a3"])

    async def trainer() -> None:
        async with follow_files(jsonl, consumer="rm", settings=settings, live=False) as lines:
            async for line in lines:
                if line.record()["adapter_session_id"] == "a2":
                    raise RuntimeError("the trainer failed on a2")

    with pytest.raises(RuntimeError):
        await trainer()
    assert await _take(jsonl, settings, None) == ["a2", "a3"]


class _FakeStream:
    """A probe over an in-memory stream (``last`` is the first message of the last chunk of ``chunk``);
    counts its calls, and answers nothing after ``fail_after`` of them (a slow broker)."""

    def __init__(
        self, offsets: list[int], stamps: list[int | None], chunk: int, *, fail_after: int = 1 << 30
    ) -> None:
        self.offsets, self.stamps, self.chunk, self.fail_after = offsets, stamps, chunk, fail_after
        self.calls = 0

    async def __call__(self, at: object) -> Seen | None:
        self.calls += 1
        if not self.offsets or self.calls > self.fail_after:
            return None
        if at == "first":
            n = 0
        elif at == "last":
            n = (len(self.offsets) - 1) // self.chunk * self.chunk
        else:
            n = next((i for i, o in enumerate(self.offsets) if o >= at), -1)  # type: ignore[operator]
            if n < 0:
                return None
        return Seen(self.offsets[n], self.stamps[n])

    def first_at_or_after(self, since: int) -> int | None:
        pairs = zip(self.offsets, self.stamps, strict=True)
        return next((o for o, t in pairs if t is not None and t >= since), None)


async def test_seek_finds_the_first_message_stamped_at_or_after_a_time() -> None:
    """The search returns the offset of the first message stamped at or after the time (offsets with gaps,
    chunks of several messages) in about log2(n) probes; never a later one when probes stop answering
    or a message has no stamp; ``first`` for an empty stream or one stamped after the time throughout."""
    rng = random.Random(7)
    for n in (1, 2, 3, 50, 1000):
        offsets = sorted(rng.sample(range(5 * n), n))
        stamps: list[int | None] = [*sorted(rng.randrange(10_000) for _ in range(n))]
        for since in (-1, 0, 5_000, 9_999, 10_000, *rng.sample(range(10_000), 5)):
            stream = _FakeStream(offsets, stamps, 7)
            exact = stream.first_at_or_after(since)
            start = await seek_search(stream, since)
            if exact == offsets[0]:
                assert start == "first"
            elif exact is None:
                assert start == offsets[(n - 1) // 7 * 7] + 1  # after the last chunk's first message
            else:
                assert isinstance(start, int)
                assert not [o for o in offsets if start <= o < exact]  # exact is the first message read
            assert stream.calls <= 3 + math.ceil(math.log2(5 * n + 1))
            early = await seek_search(_FakeStream(offsets, stamps, 7, fail_after=3), since)
            assert early == "first" or exact is None or int(early) <= exact  # type: ignore[arg-type]
    assert await seek_search(_FakeStream([], [], 7), 5) == "first"
    start = await seek_search(_FakeStream([0, 1, 2, 3, 4], [1, 2, None, 4, 5], 1), 4)
    assert start == "first" or int(start) <= 3  # type: ignore[arg-type]  # the unstamped one is not skipped


# --- against the real broker, database and ingestor --------------------------------------------------


async def _follow_all(feed: FeedSettings, *, start: object, idle_s: float = 3.0) -> list[bytes]:
    """Every session the follow hands out until none arrives for ``idle_s``."""
    got: list[bytes] = []
    stop = asyncio.Event()
    async with follow_sessions(feed, start=start, stop=stop) as sessions:  # type: ignore[arg-type]
        iterator = aiter(sessions)
        while True:
            try:
                session = await asyncio.wait_for(anext(iterator), idle_s)
            except TimeoutError:
                break
            got.append(session.line)
    return got


def _feed_settings(settings: IngestorSettings, tmp_path: Path) -> FeedSettings:
    return FeedSettings(amqp_url=settings.amqp_url, prefix=settings.prefix, cursor_dir=tmp_path / "cursors")


def _file_lines(directory: Path) -> dict[str, bytes]:
    return {
        orjson.loads(line)["adapter_session_id"]: line
        for path in sorted(directory.glob("sessions-*"))
        for line in read_lines(path)
    }


@pytest.mark.integration
@pytest.mark.timeout(180)
async def test_stream_replays_every_session_and_from_a_point_in_time(
    make_database, amqp_url: str, tmp_path: Path
) -> None:
    """Every session made final is in the stream once, byte-identical to its file line; a replay from a
    time between two loads returns exactly the second load's sessions."""
    settings = await fresh_settings(make_database, amqp_url, tmp_path / "jsonl")
    feed = _feed_settings(settings, tmp_path)
    gen_a, gen_b = generate(120, seed=31), generate(80, seed=32)
    try:
        async with running(settings):
            await publish(amqp_url, settings.topology(), bodies(gen_a.in_order()))
            await wait_drained(settings, gen_a)
            await asyncio.sleep(0.5)  # the last batch's lines reach the stream after its commit
            between = datetime.now(tz=UTC)
            await asyncio.sleep(0.2)
            await publish(amqp_url, settings.topology(), bodies(gen_b.in_order()))
            await wait_drained(settings, _merged(gen_a, gen_b))
        everything = await _follow_all(feed, start="first")
        replayed = await _follow_all(feed, start=between)
    finally:
        await delete_topology(amqp_url, settings.topology())
    ids = [orjson.loads(x)["adapter_session_id"] for x in everything]
    assert Counter(ids).most_common(1)[0][1] == 1
    assert set(ids) == gen_a.exported() | gen_b.exported()
    files = _file_lines(settings.jsonl_dir)
    assert dict(zip(ids, everything, strict=True)) == files
    assert {orjson.loads(x)["adapter_session_id"] for x in replayed} == gen_b.exported()


def _merged(a: Generated, b: Generated) -> Generated:
    merged = Generated()
    merged.sessions = [*a.sessions, *b.sessions]
    return merged


Followers = list[subprocess.Popen[bytes]]


@pytest.fixture
def followers() -> Iterator[Followers]:
    """The follower processes a test starts, stopped however the test ends (SIGTERM, then SIGKILL past a
    deadline), so a failed test leaves none behind."""
    procs: Followers = []
    try:
        yield procs
    finally:
        stop_processes(procs, timeout_s=10)
        for proc in procs:
            if proc.stdout is not None:
                proc.stdout.close()


def _follower(
    followers: Followers,
    settings: IngestorSettings,
    tmp_path: Path,
    *extra: str,
    start: str = "first",
    consumer: bool = True,
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "AMQP_URL": settings.amqp_url,
        "ATLAS_PREFIX": settings.prefix,
        "FEED_CURSOR_DIR": str(tmp_path / "cursors"),
        "LOG_LEVEL": "WARNING",
    }
    named = ["--consumer", "trainer"] if consumer else []
    cmd = [sys.executable, "-m", "feed", "follow", "--from", start, *named, *extra]
    followers.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
    return followers[-1]


async def _kill_mid_stream(follower: subprocess.Popen[bytes], after_lines: int) -> list[bytes]:
    """SIGKILL ``follower`` once it printed ``after_lines`` lines; every whole line it printed (a line
    cut by the kill is left out: that session was in hand, and comes again)."""
    assert follower.stdout is not None
    lines: list[bytes] = []
    deadline = time.monotonic() + 60
    while len(lines) < after_lines and time.monotonic() < deadline:
        lines.append(await asyncio.to_thread(follower.stdout.readline))
    follower.send_signal(signal.SIGKILL)
    rest, _ = await asyncio.to_thread(follower.communicate)
    return [x for x in [*lines, *rest.splitlines(keepends=True)] if x.endswith(b"\n")]


@pytest.mark.integration
@pytest.mark.timeout(180)
async def test_a_follower_killed_mid_stream_resumes_without_a_gap(
    make_database, amqp_url: str, tmp_path: Path, followers: Followers
) -> None:
    """`python -m feed follow --consumer` SIGKILLed while sessions flow, then started again: together
    the two runs print every session, with at most the one in hand at the kill printed twice."""
    settings = await fresh_settings(make_database, amqp_url, tmp_path / "jsonl")
    gen = generate(300, seed=33)
    try:
        async with running(settings):
            await publish(amqp_url, settings.topology(), bodies(gen.in_order()))
            await wait_drained(settings, gen)
            await asyncio.sleep(0.5)
            lines = await _kill_mid_stream(_follower(followers, settings, tmp_path), len(gen.exported()) // 3)
            second = _follower(followers, settings, tmp_path, "--idle-exit-s", "3")
            out, _ = await asyncio.to_thread(second.communicate, None, 60)
            assert second.returncode == 0
    finally:
        await delete_topology(amqp_url, settings.topology())
    before = [orjson.loads(x)["adapter_session_id"] for x in lines]
    after = [orjson.loads(x)["adapter_session_id"] for x in out.splitlines() if x.strip()]
    assert 0 < len(before) < len(gen.exported())
    assert set(before) | set(after) == gen.exported()
    assert len(set(before) & set(after)) <= 1
    assert len(after) == len(set(after))


@pytest.mark.integration
@pytest.mark.timeout(180)
async def test_a_follower_that_keeps_positions_resumes_exactly_once(
    make_database, amqp_url: str, tmp_path: Path, followers: Followers
) -> None:
    """A consumer that keeps each session's position with its output (``--positions``) and is SIGKILLed
    mid-stream resumes ``--from`` the last position it kept: every session once, none twice."""
    settings = await fresh_settings(make_database, amqp_url, tmp_path / "jsonl")
    gen = generate(300, seed=34)
    try:
        async with running(settings):
            await publish(amqp_url, settings.topology(), bodies(gen.in_order()))
            await wait_drained(settings, gen)
            await asyncio.sleep(0.5)
            first = _follower(followers, settings, tmp_path, "--positions", consumer=False)
            kept = await _kill_mid_stream(first, len(gen.exported()) // 3)
            last = kept[-1].split(b"\t", 1)[0].decode()
            second = _follower(
                followers, settings, tmp_path, "--positions", "--idle-exit-s", "3", start=last, consumer=False
            )
            out, _ = await asyncio.to_thread(second.communicate, None, 60)
            assert second.returncode == 0
    finally:
        await delete_topology(amqp_url, settings.topology())

    def ids(lines: list[bytes]) -> list[str]:
        return [orjson.loads(x.split(b"\t", 1)[1])["adapter_session_id"] for x in lines]

    before, after = ids(kept), ids(out.splitlines(keepends=True))
    assert 0 < len(before) < len(gen.exported())
    assert sorted(before + after) == sorted(gen.exported())


async def _publish_stream(amqp_url: str, feed: FeedSettings, groups: list[tuple[list[str], int]]) -> None:
    """Each group's sessions as one-line stream messages stamped ``published_ms`` + their index, in order."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        topology = feed.topology()
        await topology.declare_sessions_stream(channel, max_age_s=3600, max_bytes=1 << 30)
        for ids, published_ms in groups:
            for n, asid in enumerate(ids):
                line = orjson.dumps({"adapter_session_id": asid}) + b"\n"
                for message in stream_messages([line], "f.jsonl", max_bytes=1 << 20, now_ms=published_ms + n):
                    await channel.default_exchange.publish(message, topology.sessions_stream)
    finally:
        await connection.close()


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("skew_s", [-86_400, 3_600, 86_400])
async def test_replay_by_time_reads_the_ingestors_clock_not_the_brokers(
    amqp_url: str, tmp_path: Path, skew_s: int
) -> None:
    """A replay from a point in time returns the sessions the ingestor stamped at or after it, even when the
    broker's clock (which indexes the stream's chunks) is hours away from the ingestor's: the CI failure
    where a broker started before the machine's clock was set, and replaying from a time returned nothing."""
    feed = FeedSettings(amqp_url=amqp_url, prefix=f"t-feedclock-{os.getpid()}-{skew_s}", cursor_dir=tmp_path)
    now_ms = int(time.time() * 1000) + skew_s * 1000
    before = [f"as-a{n}" for n in range(40)]
    after = [f"as-b{n}" for n in range(25)]
    try:
        await _publish_stream(amqp_url, feed, [(before, now_ms), (after, now_ms + 60_000)])
        between = datetime.fromtimestamp((now_ms + 30_000) / 1000, tz=UTC)
        replayed = await _follow_all(feed, start=between)
        assert [orjson.loads(x)["adapter_session_id"] for x in replayed] == after
        everything = await _follow_all(feed, start="first")
        assert [orjson.loads(x)["adapter_session_id"] for x in everything] == before + after
    finally:
        await delete_topology(amqp_url, feed.topology())
