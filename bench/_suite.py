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
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench._baselines import CELERY_NAME, DRAMATIQ_NAME, celery_task_leg, dramatiq_task_leg
from bench._ceilings import QueueType, broker_ceilings, consume_name, copy_ceilings
from bench._report import Machine, Result, collect_machine, combine_runs, load_average, render
from bench._taskleg import atlas_task_leg, taskleg_name


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


SMOKE: Final = Sizes(messages=1000, copy_rows=2000, tasks=2000, poll_s=0.02)
FULL: Final = Sizes(messages=20_000, copy_rows=100_000, tasks=10_000, repeats=3)


@dataclass(frozen=True, slots=True)
class Context:
    amqp_url: str
    database_url: str
    """A server where the suite may create (and drop) scratch databases."""
    sizes: Sizes
    logdir: Path


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
    runs: tuple[tuple[int, QueueType], ...] = ((1, "quorum"), (2, "quorum"), (1, "classic"))
    for workers, queue_type in runs:
        results += await atlas_task_leg(
            ctx.amqp_url,
            ctx.database_url,
            ctx.sizes.tasks,
            ctx.logdir,
            workers=workers,
            queue_type=queue_type,
            baseline=CELERY_NAME,
            poll_s=ctx.sizes.poll_s,
        )
    return results


Group = Callable[[Context], Awaitable[list[Result]]]
GROUPS: Final[dict[str, Group]] = {"ceilings": ceilings, "baselines": baselines, "atlas": atlas}

EXTRA_RATIOS: Final = (
    (taskleg_name(1), DRAMATIQ_NAME),
    (taskleg_name(2), DRAMATIQ_NAME),
    (taskleg_name(1, "classic"), DRAMATIQ_NAME),
    (taskleg_name(2), taskleg_name(1)),
    (taskleg_name(1), consume_name("quorum")),
    (CELERY_NAME, consume_name("classic")),
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
the ack). Ceilings use aio-pika / asyncpg directly with no framework. The machine is shared: the load
average before and after says how busy it was."""


async def run_suite(ctx: Context, only: Sequence[str] | None = None) -> tuple[list[Result], Machine]:
    """Run the groups (all, or ``only`` those) in order; returns the rows and the machine."""
    ctx.logdir.mkdir(parents=True, exist_ok=True)
    machine = await collect_machine(ctx.amqp_url, ctx.database_url)
    runs: list[list[Result]] = []
    for round_ in range(1, ctx.sizes.repeats + 1):
        rows: list[Result] = []
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
        runs.append(rows)
    machine = dataclasses.replace(machine, load_after=load_average())
    return combine_runs(runs), machine


def _say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def report(results: Sequence[Result], machine: Machine, *, sizes: Sizes) -> str:
    smoke = " (smoke sizes: not for comparison)" if sizes == SMOKE else ""
    sizes_line = (
        f"Sizes{smoke}: {sizes.messages:,} messages per broker ceiling, {sizes.copy_rows:,} COPY rows, "
        f"{sizes.tasks:,} tasks per task-leg row; {sizes.repeats} round(s), rows are medians. "
        "Higher is better everywhere except msgs/task."
    )
    method = METHOD.format(poll_ms=round(sizes.poll_s * 1000))
    return render(results, machine, method=f"{sizes_line}\n\n{method}", extra_ratios=EXTRA_RATIOS)
