"""Loopback ports and process liveness for the servers the benchmarks and tests start themselves
(RabbitMQ nodes here, PostgreSQL and PgBouncer in tests/)."""

from __future__ import annotations

import contextlib
import os
import random
import socket
from pathlib import Path


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
