"""Pieces of the benchmarks that need no services: the open-loop schedule, reading CPU time from ``/proc``,
and stopping the processes a run started."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench._cpu import PARTS, CpuSample, cost_rows, cpu_name, cpu_seconds, pids_named
from bench._ports import stop_processes
from bench._steady import LATE_S, Sends, on_schedule
from producer import demo_tasks


async def test_open_loop_sends_each_task_at_its_due_time() -> None:
    """Task i is handed over at start + i / rate, not earlier, and with a prompt consumer not late."""
    sends = Sends()
    start = time.time() + 0.05
    handed = [
        time.time() async for _ in on_schedule(demo_tasks(20, run_id="t"), rate=200, start=start, sends=sends)
    ]
    for i, at in enumerate(handed):
        assert at >= start + i / 200
    assert len(sends.submitted) == 20
    assert max(sends.lags) < LATE_S
    assert "kept to the schedule" in sends.verdict()


async def test_open_loop_catches_up_after_a_stall_without_shifting_the_schedule() -> None:
    """Sends delayed by a stalled publisher go out at once, later ones keep their due times, and the
    verdict says publishing fell behind."""
    sends = Sends()
    start = time.time()
    rate = 100.0
    async for task in on_schedule(demo_tasks(30, run_id="t"), rate=rate, start=start, sends=sends):
        if task.task_id.endswith("0000000"):
            await asyncio.sleep(0.15)  # the publisher stalls on the first task
    late = [i for i, lag in enumerate(sends.lags) if lag > LATE_S]
    assert late, sends.lags
    assert max(late) < 15  # tasks due after the stall (>= 150 ms) are on time again
    assert sends.lags[-1] < LATE_S
    assert "FELL BEHIND" in sends.verdict()


def test_cpu_seconds_and_pids_named_read_this_process() -> None:
    """cpu_seconds grows with CPU work done by the process, and pids_named finds a process by its comm."""
    before = cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.1
    while time.process_time() < deadline:
        pass
    assert cpu_seconds(os.getpid()) - before >= 0.05
    comm = Path("/proc/self/comm").read_text().strip()
    assert os.getpid() in pids_named(comm)


def test_cost_rows_divide_each_parts_cpu_by_the_tasks_of_the_window() -> None:
    """CPU ms/task = (end - start CPU seconds) x 1000 / tasks, per part; a part not seen gets no row."""
    start = CpuSample(100.0, {"worker": 1.0, "ingestor": 2.0, "rabbitmq": 3.0}, dict.fromkeys(PARTS, 1))
    end = CpuSample(110.0, {"worker": 3.0, "ingestor": 3.0, "rabbitmq": 3.5}, dict.fromkeys(PARTS, 1))
    rows = cost_rows(start, end, 500, what="w", window="a window")
    assert [(r.name, r.unit) for r in rows] == [(cpu_name(p, "w"), "CPU ms/task") for p in PARTS[:3]]
    assert [r.value for r in rows] == [4.0, 2.0, 1.0]
    assert "20% of one core" in rows[0].notes


def test_stop_processes_terminates_then_kills_past_one_shared_deadline() -> None:
    """A process that exits on SIGTERM reports it; one that ignores SIGTERM is killed once the deadline,
    shared by all, has passed; one already gone keeps its exit code."""
    ignores = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); "
        "time.sleep(60)"
    )
    stubborn = subprocess.Popen([sys.executable, "-c", ignores], stdout=subprocess.PIPE)
    assert stubborn.stdout is not None
    stubborn.stdout.readline()  # its handler is set
    polite = subprocess.Popen(["sleep", "60"])
    done = subprocess.Popen(["true"])
    done.wait()
    started = time.monotonic()
    codes = stop_processes([polite, stubborn, done], timeout_s=0.5)
    assert codes == [-signal.SIGTERM, -signal.SIGKILL, 0]
    assert time.monotonic() - started < 5
