"""A real PgBouncer in transaction pooling mode, started by a test on a free loopback port.

    bouncer = PgBouncer(upstream_port=5432, pool_size=4)
    bouncer.start()                            # pgbouncer with its own ini in a private directory
    url = bouncer.url(direct_url)              # the same user and database, through the pooler
    bouncer.stop(); bouncer.start()            # a restart: every client connection is dropped
    await bouncer.admin("KILL db")             # the admin console (database ``pgbouncer``)
    bouncer.close()                            # stop and remove the directory

Authentication is ``trust`` both ways (the local test server trusts 127.0.0.1). As root, pgbouncer runs as
the ``postgres`` OS user (it refuses root), like tests/_pgserver.py's servers, and dies with the test
process (parent-death signal).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from bench._ports import free_port
from tests._pgserver import _RunAs


def pgbouncer_binary() -> str:
    """The pgbouncer executable; skip (fail in CI) when it is not installed."""
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None
    )
    if found is None:
        reason = "pgbouncer is not installed (Debian: apt-get install pgbouncer); .ci/run installs it"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


class PgBouncer:
    def __init__(self, *, upstream_host: str, upstream_port: int, pool_size: int = 4) -> None:
        self.binary = pgbouncer_binary()
        self.port = free_port()
        self._run_as = _RunAs.detect()
        self.root = Path(tempfile.mkdtemp(prefix="atlas-pgbouncer-"))
        self._run_as.chown(self.root)
        self.log_path = self.root / "pgbouncer.log"
        self._proc: subprocess.Popen[bytes] | None = None
        (self.root / "userlist.txt").write_text('"postgres" ""\n')
        (self.root / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={upstream_host} port={upstream_port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.root / 'userlist.txt'}\n"
            "admin_users = postgres\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {pool_size}\n"
            "max_client_conn = 500\n"
            # asyncpg sends none of these today; harmless if a driver does.
            "ignore_startup_parameters = extra_float_digits\n"
            "server_login_retry = 1\n"
            f"logfile = {self.log_path}\n"
        )
        for name in ("userlist.txt", "pgbouncer.ini"):
            self._run_as.chown(self.root / name)

    def url(self, direct_url: str) -> str:
        """``direct_url`` (same user and database) through this pooler."""
        parts = urlsplit(direct_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def start(self, timeout_s: float = 10.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        argv = self._run_as.argv([self.binary, str(self.root / "pgbouncer.ini")], pdeathsig=True)
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.root,
            start_new_session=True,
            **self._run_as.popen_kwargs(),
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited ({self._proc.returncode}):\n{self.log()[-2000:]}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"pgbouncer did not listen on {self.port}:\n{self.log()[-2000:]}")

    def stop(self) -> None:
        """Immediate shutdown (SIGTERM): client and server connections are dropped mid-whatever."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    async def admin(self, command: str) -> None:
        """One admin-console command, e.g. ``KILL db`` (``execute`` without arguments: the simple query
        protocol, the only one the console speaks)."""
        conn = await asyncpg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/pgbouncer", statement_cache_size=0
        )
        try:
            await conn.execute(command)
        finally:
            await conn.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
