"""On a RabbitMQ cluster: 8 workers and 2 ingestors, tasks/s, and what each part costs per task.

Per round: a three-node RabbitMQ cluster of its own (:mod:`bench._rabbit_cluster`: loopback ports, node
names and data directories of its own, so the shared node on 5672 is not touched); a fresh migrated
scratch database and topology prefix; ``INGESTORS`` ``python -m ingestor run`` and ``WORKERS`` ``python -m
worker --concurrency 64 --demo-latency-s 0`` processes (:func:`bench.mainjob.running_stack`), every one with
all three nodes in ``AMQP_URL``, on quorum queues (checked: members on every node). Once every process
consumes its queue, ``IDLE_S`` of nothing (each part's idle CPU, for the notes), then two phases on the same
processes:

1. **Burst**: N demo tasks published in one burst (the producer also has the three URLs); tasks/s = N /
   (last ``sessions.stored_at`` - first submit), as the end-to-end rows measure it.
2. **Open loop** at half the burst's tasks/s for ``seconds`` (task i at start + i / rate, as the steady
   rows do); after a ``warmup_s`` warm-up, a window to the end of the schedule: utime + stime from
   ``/proc/<pid>/stat`` at its two ends of every worker (summed), every ingestor (summed), every RabbitMQ
   node (the processes whose environment names the node, ``RABBITMQ_NODENAME``: its ``beam.smp`` and
   helpers), and PostgreSQL, divided by the sessions stored in the window. PostgreSQL is this run's share:
   the client backends of the scratch database (the harness's own connection left out), the server's
   background processes (checkpointer, WAL writer, background writer, launchers, autovacuum workers on
   this database) and the postmaster, read from ``pg_stat_activity``; the whole server, every process
   named ``postgres`` as :mod:`bench._cpu` reads it, is in the notes, with how many other databases'
   backends were busy (a shared server, e.g. a big fill running beside it, shows there, not in the row).

CPU ms per task is also the cores a part needs per 1,000 tasks/s (1,000 tasks/s x N ms = N cores). The
same rows for the whole burst (first sample before the first submit, last once every task is stored: every
part saturated, so batches are full) follow them. Afterwards every task
of both phases must be stored, the finalised JSONL must hold one line per task, and every process must
exit 0; the database, the queues and the cluster are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import asyncpg

from bench._cpu import PARTS, cpu_seconds, pids_named
from bench._e2e import CONCURRENCY, stack_run
from bench._rabbit_cluster import RabbitCluster
from bench._report import Result
from bench._stack import jsonl_stats, percentile
from bench._steady import Sends, on_schedule
from bench.mainjob import Run, check_alive, running_stack, stamped
from producer import Producer, demo_tasks

WORKERS: Final = 8
INGESTORS: Final = 2
NODES: Final = 3
TOTAL: Final = "total"
"""The row of the four parts together."""
_START_AHEAD_S: Final = 0.2
IDLE_S: Final = 3.0
"""The idle window before the burst: what each part costs doing nothing (in the notes)."""
_SETUP: Final = f"{NODES}-node RabbitMQ cluster, {WORKERS} workers x {CONCURRENCY} + {INGESTORS} ingestors"
_LABELS: Final = {
    "worker": f"atlas workers ({WORKERS} x python -m worker, sum)",
    "ingestor": f"atlas ingestors ({INGESTORS} x python -m ingestor run, sum)",
    "rabbitmq": f"RabbitMQ ({NODES} nodes, sum)",
    "postgres": "PostgreSQL (this run's backends + server processes)",
    TOTAL: "whole stack (the four parts)",
}
Metric = Literal["throughput", "achieved", "p99"]
Phase = Literal["open loop", "burst"]
PHASES: Final[tuple[Phase, ...]] = ("open loop", "burst")

# Server processes every database's work goes through; autovacuum workers count only on this database.
_SERVER_PROCESSES: Final = (
    "autovacuum launcher",
    "logical replication launcher",
    "background writer",
    "checkpointer",
    "walwriter",
    "archiver",
)
_ACTIVITY: Final = "SELECT pid, backend_type, datname, state FROM pg_stat_activity"


def cluster_name(metric: Metric) -> str:
    what = {
        "throughput": "throughput, burst, demo 0 ms",
        "achieved": "open loop at half the burst: rate achieved",
        "p99": "open loop at half the burst: p99 submit->stored",
    }[metric]
    return f"atlas on a {_SETUP}: {what}"


def cluster_cpu_name(part: str, phase: Phase) -> str:
    """The CPU-per-task row of one part (:data:`bench._cpu.PARTS`) or of :data:`TOTAL` in one phase."""
    return f"CPU per task, {_SETUP}, {phase}: {_LABELS[part]}"


def row_names() -> list[str]:
    """Every row of the group, in order."""
    return [
        cluster_name("throughput"),
        cluster_name("achieved"),
        cluster_name("p99"),
        *(cluster_cpu_name(part, phase) for phase in PHASES for part in (*PARTS, TOTAL)),
    ]


# -- CPU ---------------------------------------------------------------------------------------------


def node_pids(node_name: str) -> list[int]:
    """The processes of one RabbitMQ node: those whose environment names it (``RABBITMQ_NODENAME``, set
    for the node alone, not for ``rabbitmqctl``): its ``beam.smp`` and the helpers it starts."""
    wanted = f"RABBITMQ_NODENAME={node_name}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):  # gone since the listing, or not ours to read
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
    return pids


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def _cpu_by_pid(pids: Iterable[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):  # exited since it was listed
            out[pid] = cpu_seconds(pid)
    return out


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    """``time.time()`` when it was read."""
    cpu: Mapping[str, Mapping[int, float]]
    """Part -> pid -> CPU seconds so far."""
    server_postgres: float
    """Every process named ``postgres``, reaped children included (as :mod:`bench._cpu` reads it)."""
    busy_elsewhere: int
    """Client backends of other databases in state ``active``."""

    def used(self, later: Sample, part: str) -> float:
        """CPU seconds ``part`` used from this sample to ``later`` (a process new in ``later`` counts
        from 0: it started in between; one gone from ``later`` is lost, which the harness avoids)."""
        if part == TOTAL:
            return sum(self.used(later, each) for each in PARTS)
        before = self.cpu[part]
        return sum(seconds - before.get(pid, 0.0) for pid, seconds in later.cpu[part].items())

    def processes(self, part: str) -> int:
        return sum(len(self.cpu[each]) for each in PARTS) if part == TOTAL else len(self.cpu[part])


@dataclass(frozen=True, slots=True)
class Probe:
    """What a :class:`Sample` reads: the run's processes, the cluster's nodes, PostgreSQL's activity."""

    run: Run
    cluster: RabbitCluster
    conn: asyncpg.Connection
    """A connection to the run's database (left out of its backends)."""
    database: str

    async def sample(self) -> Sample:
        rows = await self.conn.fetch(_ACTIVITY)
        me = self.conn.get_server_pid()
        ours = [
            r["pid"]
            for r in rows
            if r["datname"] == self.database
            and r["pid"] != me
            and r["backend_type"] in ("client backend", "autovacuum worker")
        ]
        server = [r["pid"] for r in rows if r["backend_type"] in _SERVER_PROCESSES]
        busy = sum(
            1
            for r in rows
            if r["backend_type"] == "client backend"
            and r["datname"] != self.database
            and r["state"] == "active"
        )
        return await asyncio.to_thread(self._read, [*ours, *server], busy)

    def _read(self, postgres: list[int], busy: int) -> Sample:
        with contextlib.suppress(OSError, IndexError, ValueError):
            postgres.append(_parent(postgres[-1]))  # the postmaster (a server process's parent)
        pids = {
            "worker": [pid for name, pid in self.run.pids.items() if name.startswith("worker-")],
            "ingestor": [pid for name, pid in self.run.pids.items() if name.startswith("ingestor")],
            "rabbitmq": [pid for node in self.cluster.nodes for pid in node_pids(node.name)],
            "postgres": postgres,
        }
        whole = 0.0
        for pid in pids_named("postgres"):
            with contextlib.suppress(OSError):
                whole += cpu_seconds(pid, reaped_children=True)
        cpu = {part: _cpu_by_pid(part_pids) for part, part_pids in pids.items()}
        return Sample(time.time(), cpu, whole, busy)


# -- the run -----------------------------------------------------------------------------------------


async def _wait_stored(run: Run, conn: asyncpg.Connection, batch: str, n: int) -> dict[str, float]:
    """Until the ``n`` tasks of ``batch`` (``demo-<batch>-*``) have succeeded sessions assigned to a JSONL
    file; task -> ``sessions.stored_at``."""
    where = "FROM sessions WHERE task_id LIKE $1 AND status = 'succeeded' AND export_file IS NOT NULL"
    like = f"demo-{batch}-%"
    while await conn.fetchval(f"SELECT count(*) {where}", like) < n:
        check_alive(run)
        await asyncio.sleep(0.2)
    rows = await conn.fetch(f"SELECT task_id, stored_at {where}", like)
    return {row["task_id"]: row["stored_at"].timestamp() for row in rows}


@dataclass(frozen=True, slots=True)
class _Measured:
    queues: str
    idle: tuple[Sample, Sample]
    burst_submitted: dict[str, float]
    burst_stored: dict[str, float]
    burst_cpu: tuple[Sample, Sample]
    rate: float
    sends: Sends
    stored: dict[str, float]
    cpu: tuple[Sample, Sample]


def _check_queues(cluster: RabbitCluster, run: Run) -> str:
    """The task and telemetry queues are quorum queues with a member on every node; says where leaders are."""
    nodes = sorted(node.name for node in cluster.nodes)
    leaders = []
    for queue in (run.topology.tasks_queue, run.topology.ingestor_queue):
        info = cluster.queue(queue)
        if info.get("type") != "quorum" or sorted(info.get("members") or []) != nodes:
            raise RuntimeError(f"cluster: {queue} is not a quorum queue on all {NODES} nodes: {info}")
        leaders.append(f"{queue.rpartition('.')[2] or queue} on c{cluster.node(info['leader']).index}")
    return f"quorum queues, members on all {NODES} nodes, leaders: {', '.join(leaders)}"


async def _run(probe: Probe, *, seconds: float, warmup_s: float) -> _Measured:
    run, conn = probe.run, probe.conn
    async with running_stack(run, wait_ready=True):
        queues = await asyncio.to_thread(_check_queues, probe.cluster, run)
        burst, steady = f"{run.run_id}b", f"{run.run_id}o"
        submitted: dict[str, float] = {}
        idle = await _window(probe, time.time(), time.time() + IDLE_S)
        first = idle[1]
        async with Producer(run.amqp_url, run.topology) as producer:
            await producer.submit_many(stamped(demo_tasks(run.tasks, run_id=burst), submitted))
        burst_stored = await _wait_stored(run, conn, burst, run.tasks)
        last = await probe.sample()
        rate = len(burst_stored) / (max(burst_stored.values()) - min(submitted.values())) / 2
        n = max(1, round(rate * seconds))
        sends = Sends()
        start = time.time() + _START_AHEAD_S
        window = asyncio.ensure_future(_window(probe, start + warmup_s, start + seconds))
        try:
            async with Producer(run.amqp_url, run.topology) as producer:
                await producer.submit_many(
                    on_schedule(demo_tasks(n, run_id=steady), rate=rate, start=start, sends=sends)
                )
            cpu = await window
        finally:
            window.cancel()
        stored = await _wait_stored(run, conn, steady, n)
    return _Measured(queues, idle, submitted, burst_stored, (first, last), rate, sends, stored, cpu)


async def _window(probe: Probe, start: float, end: float) -> tuple[Sample, Sample]:
    """Samples at ``start`` and ``end`` (wall clock)."""
    await asyncio.sleep(max(0.0, start - time.time()))
    first = await probe.sample()
    await asyncio.sleep(max(0.0, end - time.time()))
    return first, await probe.sample()


async def cluster_rows(
    admin_database_url: str,
    logdir: Path,
    *,
    tasks: int,
    seconds: float,
    warmup_s: float,
    cluster: RabbitCluster | None = None,
) -> list[Result]:
    """Start a three-node cluster (or use ``cluster``, left running), run the burst of ``tasks`` and the
    open loop of ``seconds`` on it (see the module docstring), and return :func:`row_names`' rows."""
    own = cluster is None
    booted = time.monotonic()
    if cluster is None:
        # Started from this (the main) thread: the nodes' parent-death signal follows the thread that
        # started them, so they must not be started from a worker thread that may end first.
        cluster = RabbitCluster(size=NODES)
        cluster.start()
    boot_s = time.monotonic() - booted
    try:
        stack = stack_run(
            cluster.amqp_url,
            admin_database_url,
            logdir,
            "cluster",
            tasks=tasks,
            workers=WORKERS,
            concurrency=CONCURRENCY,
            demo_latency_s=0.0,
        )
        async with stack as (run, conn):
            run.ingestors = INGESTORS
            probe = Probe(run, cluster, conn, await conn.fetchval("SELECT current_database()"))
            measured = await _run(probe, seconds=seconds, warmup_s=warmup_s)
        files, lines = await asyncio.to_thread(jsonl_stats, run.jsonl_dir)
        await asyncio.to_thread(shutil.rmtree, run.jsonl_dir, ignore_errors=True)
    finally:
        if own:
            cluster.close()
    total = tasks + len(measured.sends.submitted)
    stored = len(measured.burst_stored) + len(measured.stored)
    if stored != total or lines != total or any(run.exit_codes):
        raise RuntimeError(
            f"cluster: {stored} stored, {lines} JSONL lines of {total} tasks, exit codes {run.exit_codes}; "
            f"logs in {run.workdir}"
        )
    boot = f"cluster started in {boot_s:.0f}s" if own else "an already running cluster"
    return _rows(measured, tasks=tasks, seconds=seconds, warmup_s=warmup_s, files=files, boot=boot)


def _rows(
    m: _Measured, *, tasks: int, seconds: float, warmup_s: float, files: int, boot: str
) -> list[Result]:
    setup = (
        f"{INGESTORS} x python -m ingestor run + {WORKERS} x python -m worker --concurrency {CONCURRENCY} "
        f"--demo-latency-s 0, every process and the producer given the {NODES} nodes' URLs in AMQP_URL; "
        f"{m.queues}; {boot}"
    )
    burst_s = max(m.burst_stored.values()) - min(m.burst_submitted.values())
    first, last = m.cpu
    idle_first, idle_last = m.idle
    window_s = last.at - first.at
    in_window = sum(1 for at in m.stored.values() if first.at <= at <= last.at)
    if in_window <= 0:
        raise RuntimeError("cluster: no task stored in the open-loop window")
    latencies = sorted(m.stored[t] - at for t, at in m.sends.submitted.items() if at >= first.at)
    schedule = (
        f"{len(m.sends.submitted):,} demo tasks published open loop at {m.rate:,.0f} tasks/s (half the "
        f"burst's) for {seconds:g}s; {m.sends.verdict()}"
    )
    window = f"the {window_s:.1f}s open-loop window after a {warmup_s:g}s warm-up"
    rows = [
        Result(
            cluster_name("throughput"),
            "tasks/s",
            tasks / burst_s,
            notes=(
                f"{setup}; {tasks:,} demo tasks submitted in one burst; first submit to last stored "
                f"(sessions.stored_at) = {burst_s:.1f}s; the JSONL ({files} finalised file(s)) holds one "
                "line per task"
            ),
        ),
        Result(
            cluster_name("achieved"),
            "tasks/s",
            in_window / window_s,
            notes=f"the same processes after the burst: {schedule}; {in_window:,} stored in {window}",
        ),
        Result(
            cluster_name("p99"),
            "ms",
            percentile(latencies, 99) * 1000,
            notes=(
                f"stored_at - submit time, nearest-rank over the {len(latencies):,} tasks submitted after "
                f"the warm-up; p50 {percentile(latencies, 50) * 1000:.0f} ms; {schedule}"
            ),
        ),
    ]
    idle = {p: idle_first.used(idle_last, p) / (idle_last.at - idle_first.at) for p in (*PARTS, TOTAL)}
    rows += _cpu_rows(first, last, in_window, "open loop", window, idle=idle)
    rows += _cpu_rows(*m.burst_cpu, tasks, "burst", f"the whole burst ({tasks:,} tasks, {burst_s:.1f}s)")
    return rows


def _cpu_rows(
    first: Sample,
    last: Sample,
    tasks: int,
    phase: Phase,
    window: str,
    *,
    idle: Mapping[str, float] | None = None,
) -> list[Result]:
    """A CPU-per-task row per part and the total: CPU time from ``first`` to ``last`` / ``tasks``."""
    rows = []
    window_s = last.at - first.at
    for part in (*PARTS, TOTAL):
        used = first.used(last, part)
        per_task = used * 1000 / tasks
        notes = (
            f"{used:.2f} CPU s ({last.processes(part)} process(es)) over {window} = "
            f"{100 * used / window_s:.0f}% of one core; {tasks:,} tasks stored in it; = {per_task:.2f} cores "
            "per 1,000 tasks/s"
        )
        if idle is not None:
            notes += f"; idle before the burst: {100 * idle[part]:.1f}% of one core"
        if part == "postgres":
            whole = (last.server_postgres - first.server_postgres) * 1000 / tasks
            notes += (
                f"; the whole server (every postgres process, reaped children too, as the single-node rows "
                f"read it): {whole:.2f} ms/task, with {max(first.busy_elsewhere, last.busy_elsewhere)} "
                "other databases' backend(s) busy at the window's ends"
            )
        rows.append(Result(cluster_cpu_name(part, phase), "CPU ms/task", per_task, notes=notes))
    return rows
