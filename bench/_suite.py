"""The benchmark suite: sizes, the groups of benchmarks in run order, and ``run_suite``.

To add rows, write ``async def group(ctx: Context) -> list[Result]`` and append it to ``GROUPS``; a row
that names another row as its ``baseline`` gets a ratio in the table, and pairs in ``EXTRA_RATIOS`` get
one in the ratios list.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from bench._baselines import CELERY_NAME, DRAMATIQ_NAME, celery_task_leg, dramatiq_task_leg
from bench._ceilings import QueueType, broker_ceilings, consume_name, copy_ceilings
from bench._cluster import cluster_rows
from bench._console import TARGET_MS as CONSOLE_TARGET_MS
from bench._console import WARMUP as CONSOLE_WARMUP
from bench._console import console_pages, overview_readings
from bench._e2e import e2e_name, end_to_end
from bench._inflight import llm_bound_sessions
from bench._ingest import SESSIONS_NAME, ingestor_alone
from bench._memory import ingestor_peak_rss, worker_peak_rss
from bench._report import Machine, Result, collect_machine, combine_runs, load_average, render
from bench._samework_runs import CELERY_CONCURRENCY as SAME_CELERY_CONCURRENCY
from bench._samework_runs import (
    CELERY_SAME_NAME,
    DRAMATIQ_SAME_NAME,
    celery_same_work,
    dramatiq_same_work,
)
from bench._steady import steady_open_loop
from bench._taskleg import BUSY_CONCURRENCY, CONCURRENCY, atlas_task_leg, taskleg_name


@dataclass(frozen=True, slots=True)
class Sizes:
    messages: int
    """Messages per broker ceiling (publish, then consume the same ones)."""
    copy_rows: int
    tasks: int
    """N of every task-leg row: the same for Celery, Dramatiq and ours."""
    poll_s: float = 0.05
    """How often task-leg rows poll the queue depth."""
    repeats: int = 1
    """Rounds of every group (interleaved, so a busy spell on the machine hits all rows); rows are medians."""
    e2e_runs: tuple[tuple[int, float], ...] = ()
    """End-to-end rows: (worker processes, simulated LLM latency per call in s)."""
    e2e_tasks: int = 0
    """N of the end-to-end rows without latency."""
    e2e_latency_tasks: int = 0
    """N of the end-to-end rows with latency."""
    ingest_records: int = 0
    """Records pre-filled for the ingestor-alone rows."""
    rss_concurrency: int = 100
    """Tasks in flight in the worker peak-RSS row (50 ms demo latency)."""
    rss_seconds: float = 15.0
    """How long the worker peak-RSS row keeps ``rss_concurrency`` tasks in flight."""
    backlog_records: int = 0
    """The ingestor peak-RSS row's backlog."""
    backlog_seconds: float = 25.0
    """How long the ingestor peak-RSS row consumes the backlog before its SIGTERM."""
    steady_seconds: float = 60.0
    """How long the open-loop (steady-state) run publishes."""
    steady_warmup_s: float = 5.0
    """The open-loop run's warm-up: left out of its percentiles, CPU and rate window."""
    steady_fallback_rate: float = 200.0
    """The open-loop rate (tasks/s) when the run has no 1-worker end-to-end row to take half of."""
    inflight_concurrency: int = 1000
    """Sessions in flight in the LLM-bound row (one worker's ``--concurrency``)."""
    inflight_latency_s: float = 2.0
    """The LLM-bound row's simulated latency per demo adapter call."""
    inflight_seconds: float = 60.0
    """The LLM-bound row's window (after its warm-up)."""
    cluster_tasks: int = 0
    """The cluster rows' burst (8 workers, 2 ingestors, a 3-node RabbitMQ cluster of their own); 0 skips
    them (smoke sizes: the nodes alone take ~30 s to start; tests/test_cluster.py runs them small)."""
    cluster_seconds: float = 20.0
    """The cluster rows' open loop (at half their burst's tasks/s): its CPU window ends with it."""
    cluster_warmup_s: float = 4.0
    """The cluster rows' open-loop warm-up, left out of the window."""
    console_sessions: int = 0
    """Sessions generated for the web console's page timings."""
    console_requests: int = 200
    """Timed requests per console page (after a warm-up)."""

    def e2e_n(self, latency_s: float) -> int:
        return self.e2e_latency_tasks if latency_s > 0 else self.e2e_tasks


E2E_FULL_RUNS: Final = ((1, 0.0), (2, 0.0), (4, 0.0), (1, 0.05), (2, 0.05), (4, 0.05))
RSS_LATENCY_S: Final = 0.05

SMOKE: Final = Sizes(
    messages=1000,
    copy_rows=2000,
    tasks=2000,
    poll_s=0.02,
    e2e_runs=((2, 0.0),),
    e2e_tasks=200,
    e2e_latency_tasks=200,
    ingest_records=5000,
    rss_concurrency=20,
    rss_seconds=3.0,
    backlog_records=20_000,
    backlog_seconds=3.0,
    steady_seconds=4.0,
    steady_warmup_s=1.0,
    steady_fallback_rate=100.0,
    inflight_concurrency=100,
    inflight_latency_s=0.2,
    inflight_seconds=3.0,
    console_sessions=20_000,
    console_requests=30,
)
FULL: Final = Sizes(
    messages=20_000,
    copy_rows=100_000,
    tasks=10_000,
    repeats=3,
    e2e_runs=E2E_FULL_RUNS,
    e2e_tasks=12_000,
    e2e_latency_tasks=7_000,
    ingest_records=100_000,
    rss_concurrency=100,
    rss_seconds=15.0,
    backlog_records=1_000_000,
    backlog_seconds=25.0,
    steady_seconds=60.0,
    steady_warmup_s=5.0,
    steady_fallback_rate=200.0,
    inflight_concurrency=1000,
    inflight_latency_s=2.0,
    inflight_seconds=60.0,
    cluster_tasks=2000,
    console_sessions=1_000_000,
    console_requests=200,
)


@dataclass(frozen=True, slots=True)
class Context:
    amqp_url: str
    database_url: str
    """A server where the suite may create (and drop) scratch databases."""
    sizes: Sizes
    logdir: Path
    earlier: dict[str, Result] = field(default_factory=dict)
    """Rows measured so far in this round, by name (``run_suite`` fills it): a later group may size its run
    from an earlier row, e.g. the open-loop rate from the end-to-end throughput."""


async def ceilings(ctx: Context) -> list[Result]:
    n = ctx.sizes.messages
    return [
        *await broker_ceilings(ctx.amqp_url, n, "quorum"),
        *await broker_ceilings(ctx.amqp_url, n, "classic"),
        *await copy_ceilings(ctx.database_url, ctx.sizes.copy_rows),
    ]


async def baselines(ctx: Context) -> list[Result]:
    return [
        await celery_task_leg(ctx.amqp_url, ctx.sizes.tasks, ctx.logdir, poll_s=ctx.sizes.poll_s),
        await dramatiq_task_leg(ctx.amqp_url, ctx.sizes.tasks, ctx.logdir, poll_s=ctx.sizes.poll_s),
    ]


async def atlas(ctx: Context) -> list[Result]:
    results = []
    # The last run: one process with more tasks in flight. At 64 each task waits on four commits in turn
    # (ledger claim, telemetry confirm, ledger success, close confirm) and the process idles about a
    # fifth of the time; this row shows what the same process does when it is kept busy.
    runs: tuple[tuple[int, QueueType, int], ...] = (
        (1, "quorum", CONCURRENCY),
        (2, "quorum", CONCURRENCY),
        (1, "classic", CONCURRENCY),
        (1, "quorum", BUSY_CONCURRENCY),
    )
    for workers, queue_type, concurrency in runs:
        results += await atlas_task_leg(
            ctx.amqp_url,
            ctx.database_url,
            ctx.sizes.tasks,
            ctx.logdir,
            workers=workers,
            queue_type=queue_type,
            concurrency=concurrency,
            baseline=CELERY_NAME,
            # the target: one worker process at least as fast as Celery's bare task leg
            target_ratio=1.0 if (workers, queue_type, concurrency) == (1, "quorum", CONCURRENCY) else None,
            poll_s=ctx.sizes.poll_s,
        )
    return results


async def e2e(ctx: Context) -> list[Result]:
    results = []
    for workers, latency_s in ctx.sizes.e2e_runs:
        # the tasks/s of 2 and 4 workers is compared with 1 worker's, where that row is measured too
        one = 1 if (1, latency_s) in ctx.sizes.e2e_runs else None
        results += await end_to_end(
            ctx.amqp_url,
            ctx.database_url,
            ctx.sizes.e2e_n(latency_s),
            ctx.logdir,
            workers=workers,
            latency_s=latency_s,
            baseline_workers=one,
            # the target: end to end (ingestor and all) at least as fast as Celery's bare task leg
            target=CELERY_NAME if latency_s == 0 else None,
        )
    return results


async def samework(ctx: Context) -> list[Result]:
    """Celery and Dramatiq doing what the atlas end-to-end rows do, in a task body (the mission's bar)."""
    n = ctx.sizes.e2e_tasks
    return [
        await celery_same_work(ctx.amqp_url, ctx.database_url, n, ctx.logdir),
        await dramatiq_same_work(ctx.amqp_url, ctx.database_url, n, ctx.logdir),
    ]


async def steady(ctx: Context) -> list[Result]:
    """Open loop at half the 1-worker end-to-end throughput of this round, else at the fallback rate."""
    sizes, max_name = ctx.sizes, e2e_name(1, 0.0, "throughput")
    measured = ctx.earlier.get(max_name)
    if measured is not None:
        rate = measured.value / 2
        source = f"half of '{max_name}' measured earlier in this run ({measured.value:,.0f} tasks/s)"
    else:
        rate = sizes.steady_fallback_rate
        source = f"fixed fallback rate ({rate:g} tasks/s): this run has no '{max_name}' row to halve"
    return await steady_open_loop(
        ctx.amqp_url,
        ctx.database_url,
        ctx.logdir,
        rate=rate,
        rate_source=source,
        seconds=sizes.steady_seconds,
        warmup_s=sizes.steady_warmup_s,
    )


async def inflight(ctx: Context) -> list[Result]:
    sizes = ctx.sizes
    return await llm_bound_sessions(
        ctx.amqp_url,
        ctx.database_url,
        ctx.logdir,
        concurrency=sizes.inflight_concurrency,
        latency_s=sizes.inflight_latency_s,
        seconds=sizes.inflight_seconds,
    )


async def ingestor(ctx: Context) -> list[Result]:
    return await ingestor_alone(ctx.amqp_url, ctx.database_url, ctx.sizes.ingest_records, ctx.logdir)


async def memory(ctx: Context) -> list[Result]:
    sizes = ctx.sizes
    return [
        await worker_peak_rss(
            ctx.amqp_url,
            ctx.database_url,
            ctx.logdir,
            concurrency=sizes.rss_concurrency,
            latency_s=RSS_LATENCY_S,
            seconds=sizes.rss_seconds,
        ),
        await ingestor_peak_rss(
            ctx.amqp_url,
            ctx.database_url,
            ctx.logdir,
            records=sizes.backlog_records,
            seconds=sizes.backlog_seconds,
        ),
    ]


async def console(ctx: Context) -> list[Result]:
    sizes = ctx.sizes
    return await console_pages(
        ctx.amqp_url, ctx.database_url, sessions=sizes.console_sessions, requests=sizes.console_requests
    )


async def cluster(ctx: Context) -> list[Result]:
    sizes = ctx.sizes
    if not sizes.cluster_tasks:
        return []  # smoke sizes (see Sizes.cluster_tasks)
    return await cluster_rows(
        ctx.database_url,
        ctx.logdir,
        tasks=sizes.cluster_tasks,
        seconds=sizes.cluster_seconds,
        warmup_s=sizes.cluster_warmup_s,
    )


Group = Callable[[Context], Awaitable[list[Result]]]
GROUPS: Final[dict[str, Group]] = {
    "ceilings": ceilings,
    "baselines": baselines,
    "atlas": atlas,
    "e2e": e2e,
    "samework": samework,
    "steady": steady,
    "inflight": inflight,
    "ingestor": ingestor,
    "memory": memory,
    "console": console,
    "cluster": cluster,
}

EXTRA_RATIOS: Final = (
    (taskleg_name(1), DRAMATIQ_NAME),
    (taskleg_name(2), DRAMATIQ_NAME),
    (taskleg_name(1, "classic"), DRAMATIQ_NAME),
    (taskleg_name(2), taskleg_name(1)),
    # the same one process kept busy: what 64 tasks in flight leave idle
    (taskleg_name(1, concurrency=BUSY_CONCURRENCY), taskleg_name(1)),
    (taskleg_name(1), consume_name("quorum")),
    (CELERY_NAME, consume_name("classic")),
    # the target: end to end (ingestor and all) at least as fast as Celery's bare task leg
    (e2e_name(1, 0.0, "throughput"), CELERY_NAME),
    (e2e_name(2, 0.0, "throughput"), CELERY_NAME),
    # the mission's bar: faster than Celery and Dramatiq doing the same work (a session stored per task)
    (e2e_name(1, 0.0, "throughput"), CELERY_SAME_NAME),
    (e2e_name(1, 0.0, "throughput"), DRAMATIQ_SAME_NAME),
    (e2e_name(2, 0.0, "throughput"), CELERY_SAME_NAME),
    (e2e_name(2, 0.0, "throughput"), DRAMATIQ_SAME_NAME),
    # what the ingestor and the rest of the stack cost on top of the task leg (same worker processes)
    (e2e_name(1, 0.0, "throughput"), taskleg_name(1)),
    (e2e_name(2, 0.0, "throughput"), taskleg_name(2)),
    # what a simulated 50 ms LLM call (x ~5 per task) costs at concurrency 100
    (e2e_name(1, 0.05, "throughput"), e2e_name(1, 0.0, "throughput")),
    (e2e_name(2, 0.05, "throughput"), e2e_name(2, 0.0, "throughput")),
    # end to end against the ingestor alone (one session per task): how close the stack runs to its ingestor
    (e2e_name(1, 0.0, "throughput"), SESSIONS_NAME),
    (e2e_name(2, 0.0, "throughput"), SESSIONS_NAME),
)

METHOD: Final = """\
Every row ran in one `python -m bench` process against the services above, each on queues (and, for
atlas, a database) of its own, deleted afterwards. Task-leg rows (Celery, Dramatiq, atlas) share one
method: the queue is pre-filled with N tasks (not timed) and seen full; the worker process(es) start; the
queue depth is polled (passive declare) every {poll_ms} ms; t0 is the first poll below N (consumption started,
so process start-up is excluded), t1 the first poll at 0; rate = the depth at t0 / (t1 - t0). Then the
harness waits until every task is done (atlas: the ledger says so; the others: `rabbitmqctl` shows no
unacked message), stops the workers and checks that nothing is left in the queue. Celery and Dramatiq run
a no-op task that only counts its runs (checked to be N), so their rows are the frameworks' own cost per
task; the atlas rows run the full task leg
(ledger claim + success in PostgreSQL, a demo adapter session, telemetry published and confirmed, then
the ack). Ceilings use aio-pika / asyncpg directly with no framework.

End-to-end rows run the whole stack the way `./atlas run` does (`bench.mainjob.run_stack`): a fresh
scratch database and topology prefix per row, one ingestor and W workers (processes); once every process
consumes its queue, the producer publishes N demo tasks in one burst, stamping each task as it publishes
it; a task is stored when its session is complete in PostgreSQL and assigned to a JSONL file
(`sessions.stored_at`). tasks/s = N / (last stored - first submit); p50/p99 are of stored - submitted,
so they include the wait in the queue behind the burst (about N / rate at the tail). The finalised JSONL
must hold one line per task. The ingestor-alone rows pre-fill its queue with N records of demo-shaped
sessions (7 records each, ~1 KB per record) as TelemetryBatch envelopes of one kind (<= 500 records /
256 KiB, like a worker's), then time one `python -m ingestor run` from its first consumption (queue depth
polled every 20 ms) to the queue empty and every session stored (the last `stored_at`). Peak RSS rows read
`VmHWM` from `/proc/<pid>/status` after loading one process for a fixed window from its first
consumption: a worker with more 50 ms demo tasks queued than it can finish (so `--concurrency` tasks are
in flight throughout), and an ingestor on a pre-filled backlog that it need not drain (it is stopped with
SIGTERM).

The same-work baselines (`bench._samework`) are Celery and Dramatiq doing, in a task body, what the
atlas end-to-end rows do for a task: run its demo adapter session in the process (the atlas worker's
`Student` and `DemoAdapter`), store it in one PostgreSQL transaction (the `sessions` row, its
`step_results` rows and its plan, on a scratch database migrated like atlas's; `stored_at = now()`), then
append its JSONL line (`ingestor.build_line`) to the process's own file; acked after the body returns.
They skip what atlas adds (no task ledger, no telemetry through the broker, no fsync of the JSONL). They
are timed like the atlas end-to-end rows: once the framework's worker consumes its queue, N tasks are
published in one burst from the bench process (Celery's and Dramatiq's own clients, no publisher
confirms), tasks/s = N / (last `stored_at` - first publish); the database must then hold every step and
the files N lines. Celery runs prefork x {celery_same_c} (the body waits on the commit; more processes than
the no-op row's 2), Dramatiq 2 processes x 8 threads like its no-op row.

The steady-state rows run the same stack (1 ingestor with its defaults, so a 200 ms flush interval, and 1
worker x 64, demo 0 ms) open loop: once both consume, task i is published at start + i / rate whatever
the earlier tasks are doing (confirms pipelined), for {steady_s:g}s; rate = half the 1-worker end-to-end
throughput measured earlier in the same round (else a fixed fallback, named in the notes). A send more
than 50 ms after its due time counts as publishing behind the schedule, and the notes say so. The first
{warmup_s:g}s are a warm-up, left out: p50/p99 are of stored_at - submit time of the tasks submitted after
it (target p99 <= 500 ms), the rate achieved is the sessions stored in the window after it up to the end
of the schedule, divided by its length. CPU per task, in the same window: utime + stime from
`/proc/<pid>/stat` at its two ends, of the worker, the ingestor, RabbitMQ (every `beam.smp`) and PostgreSQL
(every process named `postgres`, plus its reaped children's time, so backends that exit count), divided
by the sessions stored in the window. RabbitMQ and PostgreSQL are read server-wide, so any other client of
the same servers counts too.

The cluster rows (`bench._cluster`) start a three-node RabbitMQ cluster of their own each round
(`bench._rabbit_cluster`: loopback ports, node names, data directories and Erlang cookie of its own, no
plugins) and run 2 ingestors and 8 workers x 64 (demo 0 ms) on a fresh scratch database, every process
and the producer given the three nodes in `AMQP_URL`, on quorum queues (checked: a member on every node).
Once all consume: 3 s idle, then a burst of N tasks (tasks/s = N / (last stored - first submit)), then, on
the same processes, an open loop at half the burst's rate; after its warm-up, a window to the end of the
schedule gives the rate achieved, p99 and CPU per task: utime + stime from `/proc` at the window's ends
of the workers and of the ingestors (summed), of the three nodes (the processes whose environment names
the node: its `beam.smp` and helpers) and of PostgreSQL's share of the run (the scratch database's
backends, the server's background processes and the postmaster, from `pg_stat_activity`; the whole
server, read as above, is in the notes), divided by the sessions stored in the window. CPU ms per task is
also the cores a part needs per 1,000 tasks/s. The same rows over the whole burst (every part
saturated, batches full) follow, and the open-loop rows' notes give each part's idle CPU.

The LLM-bound row runs the same stack with 1 worker at `--concurrency {inflight_c}` and demo calls of
{inflight_lat:g}s (4-6 calls a task): the worker's idle VmRSS is read, then more tasks are queued in one burst
than it can finish (checked: some are left at the end), so {inflight_c} are in flight throughout. After a
warm-up of 1.5 estimated session times, a {inflight_s:g}s window: tasks/s = ledger rows turned `succeeded`
(`updated_at`) in it / its length, against the target 0.8 x concurrency / session time (session = median
ledger claim -> success of those tasks); the ledger's running count (in flight) is sampled every 0.5 s.
Its peak-RSS row is that worker's VmHWM after the window (target <= 300 MB), with (peak - idle) /
concurrency per in-flight session in the notes.

The console rows (`bench._console`) time the web console over a scratch database of
{console_n:,} generated sessions (INSERT ... SELECT FROM generate_series, server-side: ~97.5% succeeded,
2% failed, 0.3% abandoned, the newest 25 running; adapters demo 70%, openai-agents 29%, langgraph 1%;
attempt 1 for 96.5%; unique task ids; created_at spread over 30 days; 5 step rows each, a plan for every
other one, a ledger row per task, a JSONL file per 5,000; UNLOGGED tables, VACUUM ANALYZE after; the
generation time is a row of its own). The console runs in the bench process (`console.create_app`, aiohttp
AppRunner on 127.0.0.1) and one aiohttp client sends each page's requests one at a time: {warmup} warm-up
requests, then {console_r} timed (wall time to the last byte, status 200 checked), random ids, task ids
and days drawn anew per request. Each row is a page's p95 against the issue's target "pages stay fast
at a million sessions", taken as p95 <= {target:g} ms; p50 and max are in the notes. The overview's
reading is cached for `refresh_s` whatever the number of viewers: its cached row is the page, its uncached
row calls the function the cache wraps ({overview_n} times after one warm-up), which is what a lone viewer
waits for at every refresh (its page asks again `refresh_s` after the last answer, when the reading has
just expired). The machine is shared: the load average before and after says how busy it was."""


async def run_suite(ctx: Context, only: Sequence[str] | None = None) -> tuple[list[Result], Machine]:
    """Run the groups (all, or ``only`` those) in order; returns the rows and the machine."""
    ctx.logdir.mkdir(parents=True, exist_ok=True)
    machine = await collect_machine(ctx.amqp_url, ctx.database_url)
    runs: list[list[Result]] = []
    for round_ in range(1, ctx.sizes.repeats + 1):
        rows: list[Result] = []
        ctx.earlier.clear()
        for name, group in GROUPS.items():
            if only is not None and name not in only:
                continue
            started = time.monotonic()
            _say(f"{name}, round {round_} of {ctx.sizes.repeats} ...")
            group_rows = await group(ctx)
            for row in group_rows:
                _say(f"  {row.name}: {row.value:,.1f} {row.unit}")
            _say(f"{name} done in {time.monotonic() - started:.1f}s")
            rows += group_rows
            ctx.earlier.update((row.name, row) for row in group_rows)
        runs.append(rows)
    machine = dataclasses.replace(machine, load_after=load_average())
    return combine_runs(runs), machine


def _say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def report(results: Sequence[Result], machine: Machine, *, sizes: Sizes) -> str:
    smoke = " (smoke sizes: not for comparison)" if sizes == SMOKE else ""
    sizes_line = (
        f"Sizes{smoke}: {sizes.messages:,} messages per broker ceiling, {sizes.copy_rows:,} COPY rows, "
        f"{sizes.tasks:,} tasks per task-leg row, {sizes.e2e_tasks:,} tasks per end-to-end row without "
        f"latency and {sizes.e2e_latency_tasks:,} with, {sizes.ingest_records:,} records for the ingestor "
        f"alone, peak RSS of a worker at concurrency {sizes.rss_concurrency} for {sizes.rss_seconds:g}s and "
        f"of an ingestor on a {sizes.backlog_records:,}-record backlog for {sizes.backlog_seconds:g}s, "
        f"steady state open loop for {sizes.steady_seconds:g}s ({sizes.steady_warmup_s:g}s warm-up), "
        f"{sizes.inflight_concurrency:,} LLM-bound sessions of {sizes.inflight_latency_s:g}s calls for a "
        f"{sizes.inflight_seconds:g}s window, the web console's pages over {sizes.console_sessions:,} "
        f"generated sessions ({sizes.console_requests} requests per page); {sizes.repeats} round(s), rows "
        "are medians. Higher is better everywhere except msgs/task, ms, MiB, s and CPU ms/task."
    )
    method = METHOD.format(
        poll_ms=round(sizes.poll_s * 1000),
        steady_s=sizes.steady_seconds,
        warmup_s=sizes.steady_warmup_s,
        inflight_c=sizes.inflight_concurrency,
        inflight_lat=sizes.inflight_latency_s,
        inflight_s=sizes.inflight_seconds,
        console_n=sizes.console_sessions,
        console_r=sizes.console_requests,
        warmup=CONSOLE_WARMUP,
        overview_n=overview_readings(sizes.console_requests),
        target=CONSOLE_TARGET_MS,
        celery_same_c=SAME_CELERY_CONCURRENCY,
    )
    return render(results, machine, method=f"{sizes_line}\n\n{method}", extra_ratios=EXTRA_RATIOS)
