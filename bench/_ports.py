"""Loopback ports and process liveness for the servers and services the benchmarks and tests start
themselves (RabbitMQ nodes and the pipeline's processes here, PostgreSQL and PgBouncer in tests/)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A free port on 127.0.0.1 below the ephemeral range, so that no outgoing connection takes it while
    its server is stopped (a restarted server keeps its port)."""
    low, _ = _ephemeral_range()
    rng = random.SystemRandom()
    lo, hi = (15000, low - 1) if low > 16000 else (1024 + 1, 65535)
    for _ in range(200):
        port = rng.randint(lo, hi)
        if port_is_free(port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # let the kernel pick one
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a process of another user counts; a zombie, dead but not reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
            return False
    return True


def stop_processes(
    procs: Iterable[subprocess.Popen[Any]], sig: int = signal.SIGTERM, *, timeout_s: float = 30.0
) -> list[int]:
    """Signal every process still running (SIGTERM: let it shut down cleanly; they stop together), wait
    up to ``timeout_s`` in all, SIGKILL what is left; their exit codes, in order. Never leaves a process
    behind, nor hangs on one."""
    stopping = list(procs)
    for proc in stopping:
        if proc.poll() is None:
            proc.send_signal(sig)
    deadline = time.monotonic() + timeout_s
    codes = []
    for proc in stopping:
        try:
            codes.append(proc.wait(timeout=max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    return codes
