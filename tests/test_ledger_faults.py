"""The task ledger when its driver fails inside a group commit, against a real PostgreSQL: callers get an
answer or an error at their deadline, never a wait without end (tests/test_ledger.py has its rules)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

from worker.runtime import LedgerUnavailable
from worker.runtime._ledger import TaskLedger
from worker.runtime._ledger_group import apply_group

pytestmark = pytest.mark.integration


async def test_a_driver_error_in_the_group_commit_is_retried_or_failed_never_hung(
    migrated_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncpg.InternalClientError raised inside the group commit (the driver losing track of a connection):
    once, the group is retried and its claim answered; for good, every caller gets LedgerUnavailable at its
    deadline instead of waiting forever, and the ledger serves again once the driver recovers."""
    failures = {"left": 1}

    async def flaky_apply(*args: Any, **options: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise asyncpg.InternalClientError("cannot switch to state 15; another operation is in progress")
        return await apply_group(*args, **options)

    monkeypatch.setattr("worker.runtime._ledger.apply_group", flaky_apply)
    ledger = TaskLedger(
        migrated_database, worker_id="w", heartbeat_s=0.2, stale_after_s=1.0, op_timeout_s=1.5
    )
    await ledger.open()
    try:
        claim = await ledger.claim("retried")  # the first commit fails, the retry answers
        assert (claim.outcome, failures["left"]) == ("run", 0)

        failures["left"] = 10**9  # the driver keeps failing
        started = time.monotonic()
        calls = asyncio.gather(
            ledger.claim("stuck-1"),
            ledger.succeed("retried", claim.token, "as-1", b"{}"),
            return_exceptions=True,
        )
        results = await asyncio.wait_for(calls, timeout=10)  # an answer for every caller, not a hang
        waited = time.monotonic() - started
        assert [type(r) for r in results] == [LedgerUnavailable, LedgerUnavailable], results
        assert all("within 1.5s" in str(r) for r in results), results
        assert waited < 1.5 + 1.0, waited

        failures["left"] = 0  # the driver recovers: the same ledger answers again, once its backoff is over
        deadline = time.monotonic() + 10
        while True:
            try:
                again = await ledger.claim("after")
            except LedgerUnavailable:
                assert time.monotonic() < deadline, "the ledger never answered again"
                continue
            break
        assert again.outcome == "run"
    finally:
        await ledger.close()
