"""Many concurrent LLM-bound sessions: one worker holding ``concurrency`` slow sessions in flight.

The whole stack (:func:`bench.mainjob.running_stack`): one ingestor and one ``python -m worker
--concurrency C --demo-latency-s L`` (every demo adapter call sleeps L; a demo task makes 4-6 calls, so a
session lasts about 5 L). Once both consume, the worker's idle ``VmRSS`` is read, then N tasks are
published in one burst: more than the worker can finish before the window ends (checked: the queue is not
empty at the end), so C tasks are in flight throughout. Warm-up: 1.5 estimated session times from the
publish, so the first wave of sessions is over. Then, for the window, every ``SAMPLE_S`` the ledger's
running tasks (claimed, not yet succeeded: in flight) and the worker's ``VmRSS`` are sampled.

Rows: tasks/s = tasks whose ledger row turned ``succeeded`` (``updated_at``) inside the window / its length,
against the target 0.8 x C / session time, with the session time measured as the median ledger claim ->
success (``created_at`` -> ``updated_at``) of those tasks; and the worker's ``VmHWM`` (peak RSS) after the
window, with the RSS per in-flight session ((peak - idle) / C).
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import asyncpg

from bench._cpu import cpu_seconds
from bench._e2e import stack_run
from bench._harness import QueueProbe, proc_status_kib
from bench._memory import CALLS_PER_TASK, worker_rss_name
from bench._report import Result
from bench.mainjob import Run, check_alive, running_stack
from producer import Producer, demo_tasks

SAMPLE_S: Final = 0.5
TARGET_SHARE: Final = 0.8
"""Target tasks/s = TARGET_SHARE x concurrency / session time."""
RSS_TARGET_MB: Final = 300
WARMUP_SESSIONS: Final = 1.5
QUEUE_MARGIN: Final = 1.5
"""Tasks queued = concurrency + QUEUE_MARGIN x what C sessions of the estimated length finish in the run."""

_RUNNING: Final = "SELECT count(*) FROM task_ledger WHERE state = 'running'"
_DONE_IN: Final = """
SELECT count(*) AS n,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM updated_at - created_at)) AS session_s
FROM task_ledger WHERE state = 'succeeded' AND updated_at >= $1 AND updated_at <= $2
"""
_CALLS: Final = """
SELECT avg((adapter_usage->>'calls')::float) FROM sessions
WHERE status = 'succeeded' AND adapter_usage ? 'calls'
"""


def inflight_name(concurrency: int, latency_s: float) -> str:
    return f"atlas worker, {concurrency:,} LLM-bound sessions in flight, demo {latency_s:g} s calls: tasks/s"


@dataclass(frozen=True, slots=True)
class _Window:
    start: float
    end: float
    in_flight: list[int]
    """Ledger running count, every ``SAMPLE_S``."""
    rss_kib: list[int]
    idle_kib: int
    peak_kib: int
    left: int
    """Tasks still queued at the end of the window."""
    cpu_s: float
    """The worker's CPU time (utime + stime) in the window: how far it is from CPU-bound."""


async def _window(run: Run, conn: asyncpg.Connection, *, warmup_s: float, seconds: float) -> _Window:
    async with running_stack(run, wait_ready=True):
        pid = run.pids["worker-1"]
        idle = proc_status_kib(pid)["VmRSS"]
        published = time.time()
        async with Producer(run.amqp_url, run.topology) as producer:
            await producer.submit_many(demo_tasks(run.tasks, run_id=run.run_id))
        start = published + warmup_s
        await asyncio.sleep(max(0.0, start - time.time()))
        cpu_start = cpu_seconds(pid)
        in_flight, rss = [], []
        while (now := time.time()) < start + seconds:
            check_alive(run)
            in_flight.append(int(await conn.fetchval(_RUNNING)))
            rss.append(proc_status_kib(pid)["VmRSS"])
            await asyncio.sleep(min(SAMPLE_S, max(0.0, start + seconds - now)))
        end = time.time()
        cpu_s = cpu_seconds(pid) - cpu_start
        peak = proc_status_kib(pid)["VmHWM"]
        async with QueueProbe(run.amqp_url) as probe:
            left = await probe.depth(run.topology.tasks_queue)
    return _Window(start, end, in_flight, rss, idle, peak, left, cpu_s)


async def llm_bound_sessions(
    amqp_url: str,
    admin_database_url: str,
    logdir: Path,
    *,
    concurrency: int,
    latency_s: float,
    seconds: float,
) -> list[Result]:
    """``concurrency`` sessions of ``latency_s`` calls in flight for ``seconds``: tasks/s and peak RSS."""
    estimated_s = CALLS_PER_TASK * latency_s
    warmup_s = WARMUP_SESSIONS * estimated_s
    n = concurrency + math.ceil(QUEUE_MARGIN * concurrency * (warmup_s + seconds) / estimated_s)
    stack = stack_run(
        amqp_url,
        admin_database_url,
        logdir,
        "inflight",
        tasks=n,
        workers=1,
        concurrency=concurrency,
        demo_latency_s=latency_s,
    )
    async with stack as (run, conn):
        w = await _window(run, conn, warmup_s=warmup_s, seconds=seconds)
        done = await conn.fetchrow(_DONE_IN, _utc(w.start), _utc(w.end))
        calls = await conn.fetchval(_CALLS)
    if w.left == 0 or any(run.exit_codes) or not done["n"]:
        raise RuntimeError(
            f"LLM-bound sessions: {w.left} tasks left queued (must be > 0: queue more), {done['n']} done in "
            f"the window, exit codes {run.exit_codes}; logs in {run.workdir}"
        )
    window_s = w.end - w.start
    rate = done["n"] / window_s
    session_s = float(done["session_s"])
    target = TARGET_SHARE * concurrency / session_s
    verdict = "met" if rate >= target else "NOT met"
    flight = (
        f"in flight (ledger running, sampled every {SAMPLE_S:g}s): min {min(w.in_flight):,}, median "
        f"{statistics.median(w.in_flight):,.0f}, max {max(w.in_flight):,}; the worker used "
        f"{100 * w.cpu_s / (w.end - w.start):.0f}% of one core"
    )
    calls_text = f"{calls:.1f} adapter calls per stored session" if calls is not None else "no session stored"
    setup = (
        f"1 ingestor + 1 x python -m worker --concurrency {concurrency} --demo-latency-s {latency_s:g}; "
        f"{n:,} demo tasks queued in one burst, {w.left:,} still queued at the end"
    )
    peak_mib = w.peak_kib / 1024
    per_session = (w.peak_kib - w.idle_kib) / concurrency
    rss_verdict = "met" if peak_mib * 1024 * 1024 <= RSS_TARGET_MB * 1_000_000 else "NOT met"
    return [
        Result(
            inflight_name(concurrency, latency_s),
            "tasks/s",
            rate,
            notes=(
                f"target {TARGET_SHARE:g} x {concurrency:,} / {session_s:.2f}s session = {target:,.1f} "
                f"tasks/s: {verdict}; {done['n']:,} tasks succeeded (ledger updated_at) in the "
                f"{window_s:.1f}s window after a {warmup_s:g}s warm-up; session = median ledger claim -> "
                f"success of those tasks ({calls_text} x {latency_s:g}s); {flight}; {setup}"
            ),
        ),
        Result(
            worker_rss_name(concurrency, latency_s),
            "MiB",
            peak_mib,
            notes=(
                f"VmHWM of the same worker after the window; target <= {RSS_TARGET_MB} MB "
                f"({RSS_TARGET_MB * 1_000_000 / 2**20:.0f} MiB) for the process: {rss_verdict}; VmRSS "
                f"{w.idle_kib / 1024:.0f} MiB idle before the burst, {max(w.rss_kib) / 1024:.0f} MiB max "
                f"sampled in the window; (peak - idle) / {concurrency:,} = {per_session:.1f} KiB per "
                f"in-flight session; {flight}"
            ),
        ),
    ]


def _utc(at: float) -> datetime:
    return datetime.fromtimestamp(at, tz=UTC)
