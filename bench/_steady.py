"""Steady state, open loop: submit-to-stored latency at a fixed rate, and what each part costs per task.

The whole stack runs the way the main job runs it (:func:`bench.mainjob.running_stack`: a fresh migrated
scratch database and topology prefix, one ``python -m ingestor run`` with its defaults, so a 200 ms flush
interval, and one ``python -m worker --concurrency 64``, demo adapter, no simulated latency). Once both
consume, the producer publishes at a fixed ``rate`` for ``seconds``: task i is due at start + i / rate and
goes out then, whatever earlier tasks are doing (open loop: a schedule of send times, not a wait on
completions; confirms are pipelined). Each task is stamped when it is handed to the producer, and how late
that is against its due time is recorded: if publishing falls behind the schedule, the notes say so.

The first ``warmup_s`` are a warm-up: tasks submitted in it are left out of the percentiles, and the window
(CPU time, rate achieved) starts after it and ends with the schedule. Latency = ``sessions.stored_at`` -
submit time. Rate achieved = sessions stored in the window / its length. CPU per task: :mod:`bench._cpu`
sampled at the window's ends, divided by the sessions stored in it. Afterwards every task must be stored
and the finalised JSONL must hold one line per task.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import asyncpg

from bench._cpu import CpuSample, cost_rows
from bench._e2e import CONCURRENCY, stack_run
from bench._report import Result
from bench._stack import jsonl_stats, percentile
from bench.mainjob import Run, running_stack, wait_stored
from producer import Producer, demo_tasks
from schemas import TaskMessage

Metric = Literal["p50", "p99", "achieved", "target"]
CPU_WHAT: Final = "open loop"
"""The CPU-per-task rows of this run are ``cpu_name(part, CPU_WHAT)``."""
P99_TARGET_MS: Final = 500.0
LATE_S: Final = 0.05
"""A send this much after its due time counts as publishing behind the schedule."""
_START_AHEAD_S: Final = 0.2
"""The schedule starts this long after it is made, so the first sends are not late by construction."""


def steady_name(metric: Metric) -> str:
    what = {
        "p50": "p50 submit->stored",
        "p99": "p99 submit->stored",
        "achieved": "rate achieved",
        "target": "target rate",
    }[metric]
    return f"atlas steady state, open loop at half the max, 1 worker x {CONCURRENCY}, demo 0 ms: {what}"


@dataclass
class Sends:
    """What the schedule did: each task's submit time and how late each send was against its due time."""

    submitted: dict[str, float] = field(default_factory=dict)
    lags: list[float] = field(default_factory=list)

    def late(self) -> int:
        return sum(1 for lag in self.lags if lag > LATE_S)

    def verdict(self) -> str:
        worst = max(self.lags, default=0.0) * 1000
        late = self.late()
        if not late:
            return f"publishing kept to the schedule (latest send {worst:.0f} ms after its due time)"
        return (
            f"PUBLISHING FELL BEHIND THE SCHEDULE: {late:,} of {len(self.lags):,} sends more than "
            f"{LATE_S * 1000:.0f} ms late, the latest by {worst:.0f} ms (the rate offered was lower than the "
            "target)"
        )


async def on_schedule(
    tasks: Iterable[TaskMessage], *, rate: float, start: float, sends: Sends
) -> AsyncIterator[TaskMessage]:
    """``tasks``, task i handed over at ``start + i / rate`` (wall clock) and stamped then; a late one
    goes at once (due times are absolute, so one late send does not shift the rest)."""
    for i, task in enumerate(tasks):
        due = start + i / rate
        wait = due - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        now = time.time()
        sends.submitted[task.task_id] = now
        sends.lags.append(now - due)
        yield task


async def _cpu_window(run: Run, start: float, end: float) -> tuple[CpuSample, CpuSample]:
    """CPU samples of the stack's processes at ``start`` and ``end`` (wall clock)."""
    pids = {"worker_pid": run.pids["worker-1"], "ingestor_pid": run.pids["ingestor"]}
    await asyncio.sleep(max(0.0, start - time.time()))
    first = await asyncio.to_thread(lambda: CpuSample.read(**pids))
    await asyncio.sleep(max(0.0, end - time.time()))
    last = await asyncio.to_thread(lambda: CpuSample.read(**pids))
    return first, last


@dataclass(frozen=True, slots=True)
class _Measured:
    sends: Sends
    stored: dict[str, float]
    cpu: tuple[CpuSample, CpuSample]
    exit_codes: list[int]
    jsonl_lines: int


async def _run(
    run: Run, conn: asyncpg.Connection, *, rate: float, seconds: float, warmup_s: float
) -> _Measured:
    sends = Sends()
    async with running_stack(run, wait_ready=True):
        start = time.time() + _START_AHEAD_S
        cpu = asyncio.ensure_future(_cpu_window(run, start + warmup_s, start + seconds))
        try:
            async with Producer(run.amqp_url, run.topology) as producer:
                schedule = on_schedule(
                    demo_tasks(run.tasks, run_id=run.run_id), rate=rate, start=start, sends=sends
                )
                await producer.submit_many(schedule)
            samples = await cpu
        finally:
            cpu.cancel()
        stored = await wait_stored(run, conn, progress=False)
    _, lines = await asyncio.to_thread(jsonl_stats, run.jsonl_dir)
    return _Measured(sends, stored, samples, run.exit_codes, lines)


async def steady_open_loop(
    amqp_url: str,
    admin_database_url: str,
    logdir: Path,
    *,
    rate: float,
    rate_source: str,
    seconds: float,
    warmup_s: float,
) -> list[Result]:
    """Publish at ``rate`` tasks/s for ``seconds``; latency, rate and CPU-per-task rows of the window after
    ``warmup_s``. ``rate_source`` says where the rate came from (for the notes)."""
    n = max(1, round(rate * seconds))
    stack = stack_run(
        amqp_url,
        admin_database_url,
        logdir,
        "steady",
        tasks=n,
        workers=1,
        concurrency=CONCURRENCY,
        demo_latency_s=0.0,
    )
    async with stack as (run, conn):
        measured = await _run(run, conn, rate=rate, seconds=seconds, warmup_s=warmup_s)
    await asyncio.to_thread(shutil.rmtree, run.jsonl_dir, ignore_errors=True)
    if len(measured.stored) != n or measured.jsonl_lines != n or any(measured.exit_codes):
        raise RuntimeError(
            f"steady state: {len(measured.stored)} stored, {measured.jsonl_lines} JSONL lines of {n} tasks, "
            f"exit codes {measured.exit_codes}; logs in {run.workdir}"
        )
    return _rows(measured, rate=rate, rate_source=rate_source, seconds=seconds, warmup_s=warmup_s)


def _rows(m: _Measured, *, rate: float, rate_source: str, seconds: float, warmup_s: float) -> list[Result]:
    first, last = m.cpu
    window_s = last.at - first.at
    in_window = sum(1 for at in m.stored.values() if first.at <= at <= last.at)
    # Percentiles of the tasks submitted after the warm-up (first.at is the warm-up's end as sampled).
    latencies = sorted(m.stored[t] - at for t, at in m.sends.submitted.items() if at >= first.at)
    counted = len(latencies)
    setup = (
        f"1 ingestor (defaults: 200 ms flush interval) + 1 x python -m worker --concurrency {CONCURRENCY} "
        f"--demo-latency-s 0; {len(m.sends.submitted):,} demo tasks published open loop at {rate:,.0f} "
        f"tasks/s for {seconds:g}s; {m.sends.verdict()}"
    )
    latency_notes = (
        f"{setup}; stored_at - submit time, nearest-rank over the {counted:,} tasks submitted after a "
        f"{warmup_s:g}s warm-up (left out)"
    )
    p99 = percentile(latencies, 99) * 1000
    verdict = "met" if p99 <= P99_TARGET_MS else "NOT met"
    return [
        Result(steady_name("p50"), "ms", percentile(latencies, 50) * 1000, notes=latency_notes),
        Result(
            steady_name("p99"),
            "ms",
            p99,
            notes=f"target p99 <= {P99_TARGET_MS:.0f} ms: {verdict}; {latency_notes}",
        ),
        Result(
            steady_name("achieved"),
            "tasks/s",
            in_window / window_s,
            baseline=steady_name("target"),
            notes=(
                f"sessions stored (stored_at) in the {window_s:.1f}s window after the warm-up: "
                f"{in_window:,}; {m.sends.verdict()}"
            ),
        ),
        Result(steady_name("target"), "tasks/s", rate, notes=rate_source),
        *cost_rows(
            first,
            last,
            in_window,
            what=CPU_WHAT,
            window=f"the open-loop window (after a {warmup_s:g}s warm-up)",
        ),
    ]
