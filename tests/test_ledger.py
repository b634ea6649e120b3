"""The task ledger's claim rules, heartbeats, deadlines and supervision, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from tests._proxy import TcpProxy
from worker.runtime import LedgerUnavailable
from worker.runtime._ledger import TaskLedger
from worker.runtime._ledger_group import ClaimOp, Group, SettleOp, SucceedOp, apply_group, new_token

pytestmark = pytest.mark.integration


@pytest.fixture
async def ledger_url(migrated_database: str) -> str:
    return migrated_database


async def _ledger(url: str, worker_id: str, **options: float) -> TaskLedger:
    values = {"heartbeat_s": 0.2, "stale_after_s": 1.0, "op_timeout_s": 5.0}
    values.update(options)
    ledger = TaskLedger(url, worker_id=worker_id, **values)  # type: ignore[arg-type]
    await ledger.open()
    return ledger


@pytest.fixture
async def two_ledgers(ledger_url: str) -> AsyncIterator[tuple[TaskLedger, TaskLedger]]:
    a = await _ledger(ledger_url, "worker-a")
    b = await _ledger(ledger_url, "worker-b")
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def _row(url: str, task_id: str) -> asyncpg.Record:
    conn = await asyncpg.connect(url)
    try:
        row: asyncpg.Record = await conn.fetchrow("SELECT * FROM task_ledger WHERE task_id = $1", task_id)
        return row
    finally:
        await conn.close()


async def test_a_repeated_claim_with_the_same_token_is_recognised_as_our_own(
    two_ledgers: tuple[TaskLedger, TaskLedger],
) -> None:
    """A claim asked again with its token (its first commit reply was lost) runs: it is never a duplicate."""
    a, _ = two_ledgers
    token = new_token()
    first = await a.claim("t1", token)
    again = await a.claim("t1", token)
    assert (first.outcome, first.attempt) == ("run", 1)
    assert (again.outcome, again.attempt) == ("run", 1)


async def test_a_fresh_duplicate_of_a_live_run_is_busy_and_cannot_take_over(
    two_ledgers: tuple[TaskLedger, TaskLedger], ledger_url: str
) -> None:
    """While the holder heartbeats, another claim is refused as busy, however long it waits."""
    a, b = two_ledgers
    mine = await a.claim("t1")
    await asyncio.sleep(1.5)  # longer than stale_after_s: only the heartbeat keeps it alive
    other = await b.claim("t1")
    assert other.outcome == "busy"
    assert other.holder == "worker-a"
    row = await _row(ledger_url, "t1")
    assert row["claim_token"] == mine.token


async def test_a_dead_holder_goes_stale_and_is_taken_over(
    two_ledgers: tuple[TaskLedger, TaskLedger], ledger_url: str
) -> None:
    """A holder that stops heartbeating is taken over after stale_after_s; its late succeed is refused."""
    a, b = two_ledgers
    mine = await a.claim("t1")
    a._forget("t1", mine.token)  # the holder stops heartbeating, as if its process died
    assert (await b.claim("t1")).outcome == "busy"
    await asyncio.sleep(1.3)
    taken = await b.claim("t1")
    assert (taken.outcome, taken.attempt) == ("run", 2)
    assert await a.succeed("t1", mine.token, "s-a", b"close-a") is False
    assert await b.succeed("t1", taken.token, "s-b", b"close-b") is True
    row = await _row(ledger_url, "t1")
    assert (row["state"], row["adapter_session_id"], row["close_message"]) == ("succeeded", "s-b", b"close-b")
    done = await a.claim("t1")
    assert (done.outcome, done.close_message) == ("done", b"close-b")


async def test_release_lets_the_next_delivery_run_at_once(two_ledgers: tuple[TaskLedger, TaskLedger]) -> None:
    """A released claim (shutdown, lost broker) is claimable at once, with the next attempt number."""
    a, b = two_ledgers
    mine = await a.claim("t1")
    await a.release("t1", mine.token, "worker stopped")
    again = await b.claim("t1")
    assert (again.outcome, again.attempt) == ("run", 2)


async def test_a_release_whose_caller_is_cancelled_again_still_reaches_the_ledger(ledger_url: str) -> None:
    """A run cut off by a lost broker connection is cancelled twice (aio-pika cancels the consumers of the
    dead channel, then the worker cancels what is in flight): the second cancellation, landing while the
    run releases its claim, must not drop the release, or the row stays running, no longer heartbeated,
    and the redelivery waits for it to go stale (60 s here)."""
    a = await _ledger(ledger_url, "worker-a", stale_after_s=60.0)
    b = await _ledger(ledger_url, "worker-b", stale_after_s=60.0)
    try:
        mine = await a.claim("t1")
        releasing = asyncio.create_task(a.release("t1", mine.token, "broker connection lost"))
        await asyncio.sleep(0)  # the release is queued...
        releasing.cancel()  # ...and its caller is cancelled before the ledger sent it
        with pytest.raises(asyncio.CancelledError):
            await releasing
        deadline = time.monotonic() + 5
        while (row := await _row(ledger_url, "t1"))["state"] == "running":
            assert time.monotonic() < deadline, "the release was dropped with its caller"
            await asyncio.sleep(0.05)
        assert (row["state"], row["last_error"]) == ("retrying", "released: broker connection lost")
        again = await b.claim("t1")
        assert (again.outcome, again.attempt) == ("run", 2)
    finally:
        await a.close()
        await b.close()


async def test_settle_by_a_taken_over_claim_is_refused(two_ledgers: tuple[TaskLedger, TaskLedger]) -> None:
    """A failure reported by a run that no longer holds the task does not change the task's state."""
    a, b = two_ledgers
    mine = await a.claim("t1")
    a._forget("t1", mine.token)
    await asyncio.sleep(1.3)
    taken = await b.claim("t1")
    assert taken.outcome == "run"
    assert await a.settle("t1", mine.token, "dead", "boom") is False
    assert await b.settle("t1", taken.token, "retrying", "boom") is True


async def test_succeed_is_idempotent_for_its_own_claim(two_ledgers: tuple[TaskLedger, TaskLedger]) -> None:
    """Recording success twice (a lost reply retried) answers True both times."""
    a, _ = two_ledgers
    claim = await a.claim("t1")
    assert await a.succeed("t1", claim.token, "s", b"c") is True
    assert await a.succeed("t1", claim.token, "s", b"c") is True


async def test_many_claims_share_round_trips(ledger_url: str) -> None:
    """500 concurrent claims and successes all resolve, each task once, attempts 1."""
    ledger = await _ledger(ledger_url, "w")
    try:
        claims = await asyncio.gather(*(ledger.claim(f"t{i}") for i in range(500)))
        assert {c.outcome for c in claims} == {"run"}
        results = await asyncio.gather(
            *(ledger.succeed(f"t{i}", c.token, f"s{i}", b"c") for i, c in enumerate(claims))
        )
        assert all(results)
    finally:
        await ledger.close()


async def test_one_group_holding_a_success_a_release_and_a_claim_of_one_task(ledger_url: str) -> None:
    """A success, its run's release queued behind it and a fresh duplicate's claim, all in the same round
    trip: the task ends succeeded (the release finds it succeeded, the claim is told it is done), whatever
    order the single group statement would have applied them in."""
    ledger = await _ledger(ledger_url, "w")
    try:
        claim = await ledger.claim("t1")
        succeed = asyncio.ensure_future(ledger.succeed("t1", claim.token, "s1", b"close-1"))
        release = asyncio.ensure_future(ledger.release("t1", claim.token, "cancelled"))
        duplicate = asyncio.ensure_future(ledger.claim("t1"))
        assert await succeed is True
        await release
        again = await duplicate
        assert (again.outcome, again.close_message) == ("done", b"close-1")
        row = await _row(ledger_url, "t1")
        assert (row["state"], row["attempts"], row["close_message"]) == ("succeeded", 1, b"close-1")
    finally:
        await ledger.close()


async def test_a_heartbeat_with_a_success_of_the_same_task_is_not_a_takeover(ledger_url: str) -> None:
    """The heartbeat of a group leaves out the tasks the group itself ended: a task succeeded in the same
    round trip as a heartbeat naming it is not reported as taken over, and the one only beaten is alive."""
    conn = await asyncpg.connect(ledger_url)
    try:
        tokens = {"a": new_token(), "b": new_token()}
        claims = Group(claims=[ClaimOp(t, tok, _future()) for t, tok in tokens.items()])
        first = await apply_group(conn, claims, {}, worker_id="w", stale_after=timedelta(seconds=60))
        assert {c.outcome for c in first.claims.values()} == {"run"}
        group = Group(succeeded=[SucceedOp("a", tokens["a"], "s-a", b"{}", _future())])
        result = await apply_group(conn, group, tokens, worker_id="w", stale_after=timedelta(seconds=60))
        assert (result.succeeded, result.alive, result.taken_over()) == ({"a"}, {"b"}, set())
    finally:
        await conn.close()


class _Recording:
    """A connection that remembers the statements it ran."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.queries: list[str] = []

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        self.queries.append(query)
        rows: list[asyncpg.Record] = await self.conn.fetch(query, *args)
        return rows


async def test_a_group_of_one_kind_runs_that_part_alone_under_the_same_rules(ledger_url: str) -> None:
    """Claims alone, successes alone and settlements alone each run a statement of just their part (the
    three-part statement, planned per call, cost PostgreSQL ~0.3 ms more per group), and each keeps the
    rules: a live claim is not taken, a success or settlement needs its claim's token, a succeeded task
    is not settled, a claim of a succeeded task is told it is done; a mixed group still runs them all."""
    conn = await asyncpg.connect(ledger_url)
    try:
        db = _Recording(conn)
        stale = timedelta(seconds=60)

        async def apply(group: Group) -> Any:
            return await apply_group(db, group, {}, worker_id="w", stale_after=stale)

        tokens = {"a": new_token(), "b": new_token()}
        first = await apply(Group(claims=[ClaimOp(t, tok, _future()) for t, tok in tokens.items()]))
        assert {t: c.outcome for t, c in first.claims.items()} == {"a": "run", "b": "run"}
        again = await apply(Group(claims=[ClaimOp("a", new_token(), _future())]))
        assert again.claims["a"].outcome == "busy"
        done = await apply(
            Group(
                succeeded=[
                    SucceedOp("a", tokens["a"], "s-a", b"close-a", _future()),
                    SucceedOp("b", "not-its-token", "s-b", b"close-b", _future()),
                ]
            )
        )
        assert done.succeeded == {"a"}
        settled = await apply(
            Group(
                settled=[
                    SettleOp("a", tokens["a"], "retrying", "late", _future()),
                    SettleOp("b", tokens["b"], "retrying", "boom", _future()),
                ]
            )
        )
        assert settled.settled == {"b"}
        assert all(" AS (" in q and q.count(" AS (\n") == 1 for q in db.queries), "one part each"
        mixed = await apply(
            Group(
                claims=[ClaimOp("a", new_token(), _future()), ClaimOp("b", new_token(), _future())],
                settled=[SettleOp("c", new_token(), "dead", "never claimed", _future())],
            )
        )
        assert (mixed.claims["a"].outcome, mixed.claims["a"].close_message) == ("done", b"close-a")
        assert (mixed.claims["b"].outcome, mixed.claims["b"].attempt) == ("run", 2)
        assert mixed.settled == set()
        assert "settled AS (" in db.queries[-1]
        assert "claimed AS (" in db.queries[-1]
    finally:
        await conn.close()


async def test_the_loop_holds_one_connection_and_replaces_it_when_it_breaks(ledger_url: str) -> None:
    """Group after group is committed on the same server session (no pool round trip per group); when
    that session is killed, the next group reconnects and its callers still get their answer."""
    ledger = await _ledger(ledger_url, "w")
    admin = await asyncpg.connect(ledger_url)
    try:
        assert (await ledger.claim("t1")).outcome == "run"
        assert ledger._conn is not None
        pid = ledger._conn.get_server_pid()
        assert (await ledger.claim("t2")).outcome == "run"
        assert ledger._conn.get_server_pid() == pid
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        assert (await ledger.claim("t3")).outcome == "run"
        assert ledger._conn is not None
        assert ledger._conn.get_server_pid() != pid
    finally:
        await admin.close()
        await ledger.close()
    assert ledger._conn is None


async def test_the_ledger_pool_sends_no_reset_query_on_release(ledger_url: str) -> None:
    """The ledger's pooled connections are not reset on release: its statements leave no session state,
    and asyncpg's reset (``... RESET ALL``) was a round trip on the path of every group commit."""
    ledger = await _ledger(ledger_url, "w")
    try:
        pool = ledger._pool
        assert pool is not None
        async with pool.acquire() as conn:
            pid = conn.get_server_pid()
            await conn.execute("SET application_name = 'ledger-reset-probe'")
        async with pool.acquire() as conn:
            assert conn.get_server_pid() == pid  # the same server session, handed out again
            assert await conn.fetchval("SHOW application_name") == "ledger-reset-probe"
    finally:
        await ledger.close()


async def test_the_ledger_plans_each_group_for_its_own_arrays(ledger_url: str) -> None:
    """The ledger's connections use custom plans: a generic plan cached while the table was nearly empty
    seq-scanned it on every group later (1,000 -> 500 tasks/s over 20,000 tasks in one run)."""
    ledger = await _ledger(ledger_url, "w")
    try:
        assert ledger._pool is not None
        assert await ledger._pool.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
    finally:
        await ledger.close()


def _future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


async def test_a_dead_loop_fails_callers_at_once(ledger_url: str) -> None:
    """If the ledger's loop dies, pending and new calls fail with LedgerUnavailable instead of hanging."""
    ledger = await _ledger(ledger_url, "w")
    try:
        assert ledger._loop_task is not None
        ledger._loop_task.cancel()
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(LedgerUnavailable, match="not running"):
            await ledger.claim("t1")
        assert time.monotonic() - started < 1
    finally:
        await ledger.close()


async def test_a_dead_loop_fails_the_calls_already_waiting(ledger_url: str) -> None:
    """Calls already awaiting when the loop dies (one in the group it was committing while PostgreSQL was
    away, one queued behind it) fail at once with LedgerUnavailable, not at their deadline."""
    host, port = ledger_url.split("@", 1)[1].split("/", 1)[0].split(":")
    async with TcpProxy(host, int(port)) as proxy:
        ledger = await _ledger(proxy.proxied_url(ledger_url), "w", op_timeout_s=30.0)
        try:
            assert (await ledger.claim("before")).outcome == "run"
            proxy.cut()
            committing = asyncio.create_task(ledger.claim("t1"))
            await asyncio.sleep(0.3)  # the loop has taken t1 and retries its commit
            queued = asyncio.create_task(ledger.claim("t2"))
            await asyncio.sleep(0.1)
            assert not committing.done()
            assert not queued.done()
            assert ledger._loop_task is not None
            ledger._loop_task.cancel()
            started = time.monotonic()
            for call in (committing, queued):
                with pytest.raises(LedgerUnavailable, match="loop died"):
                    await call
            assert time.monotonic() - started < 2
        finally:
            await ledger.close()


async def test_calls_have_a_deadline_while_the_database_is_away(ledger_url: str) -> None:
    """With PostgreSQL unreachable a claim fails after op_timeout_s (the task is handed back), and the
    ledger serves again once the database is back."""
    host_port = ledger_url.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.split(":")
    async with TcpProxy(host, int(port)) as proxy:
        ledger = await _ledger(proxy.proxied_url(ledger_url), "w", op_timeout_s=1.0)
        try:
            assert (await ledger.claim("before")).outcome == "run"
            proxy.cut()
            started = time.monotonic()
            with pytest.raises(LedgerUnavailable, match="no answer within"):
                await ledger.claim("during")
            assert time.monotonic() - started < 3
            proxy.restore()
            deadline = time.monotonic() + 15
            while True:
                try:
                    claim = await ledger.claim("after")
                    break
                except LedgerUnavailable:
                    assert time.monotonic() < deadline, "the ledger did not come back"
            assert claim.outcome == "run"
        finally:
            await ledger.close()
