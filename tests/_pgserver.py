"""A private PostgreSQL cluster that a test can stop, crash and restart, to inject database faults.

``PgServer`` runs its own ``postgres`` (never the shared server on 5432): ``initdb`` into a fresh temporary
directory (once per instance; the ``pg_server`` fixture makes one per test session), trust authentication
for the unix socket and 127.0.0.1, listening on 127.0.0.1 only, on a free port chosen here, with its unix
socket inside the temporary directory. ``fsync`` is off and ``shared_buffers`` small, so a start or a
stop takes a fraction of a second; ``synchronous_commit`` stays on, so a committed row survives
``stop(mode="immediate")`` (a crash of the server, not of the machine).

    with PgServer() as pg:                 # initdb + start; stop + remove the directory on exit
        url = pg.url()                     # postgresql://postgres@127.0.0.1:<port>/postgres
        db_url = pg.create_database("x")   # a database of its own
        pg.stop()                          # fast shutdown; connecting now raises ConnectionRefusedError
        pg.start()                         # same port, same data
        pg.restart(mode="immediate")       # a crash + recovery; open connections are dropped
        await pg.stop_for(2.0)             # down for 2 s, without blocking the event loop

The server process is started as the ``postgres`` OS user when the tests run as root (``initdb`` and
``postgres`` refuse root), through ``setpriv`` with a parent-death signal, so it goes away with the test
process even if that is SIGKILLed. Directories left behind by a killed test process are removed the next
time a ``PgServer`` is created.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self, TypeVar
from urllib.parse import quote

import asyncpg
import pytest

from bench._ports import free_port, pid_alive

StopMode = Literal["smart", "fast", "immediate"]
_T = TypeVar("_T")

_STOP_SIGNALS: dict[str, signal.Signals] = {
    "smart": signal.SIGTERM,  # wait for clients to disconnect
    "fast": signal.SIGINT,  # roll back and disconnect clients, then a shutdown checkpoint
    "immediate": signal.SIGQUIT,  # abort at once: the next start runs crash recovery
}
_DIR_PREFIX = "atlas-pgserver-"
_OWNER_FILE = "owner.pid"
_SUPERUSER = "postgres"
_POLL_S = 0.01
# A unix socket path must fit in sockaddr_un.sun_path (108 bytes with the terminating NUL).
_MAX_SOCKET_PATH = 100


class PgServerError(RuntimeError):
    """The private server could not be created, started or stopped (the message has its log's tail)."""


# ---------------------------------------------------------------------------------------------------
# Locating the binaries


@dataclass(frozen=True)
class PgBinaries:
    bindir: Path
    major: int

    @property
    def initdb(self) -> str:
        return str(self.bindir / "initdb")

    @property
    def postgres(self) -> str:
        return str(self.bindir / "postgres")


def _major_version(bindir: Path) -> int | None:
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"(\d+)(?:\.\d+)?", out)
    return int(match.group(1)) if match else None


def _candidate_bindirs() -> list[Path]:
    candidates: list[Path] = []
    if override := os.environ.get("PGSERVER_BINDIR"):
        return [Path(override)]
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
    candidates.extend(Path("/usr/lib/postgresql").glob("*/bin"))
    return candidates


@functools.cache
def find_binaries() -> PgBinaries | None:
    """The newest PostgreSQL whose ``initdb`` and ``postgres`` exist: ``$PGSERVER_BINDIR`` if set, else
    among ``pg_config --bindir`` and ``/usr/lib/postgresql/*/bin``."""
    best: PgBinaries | None = None
    for bindir in _candidate_bindirs():
        if not all(os.access(bindir / name, os.X_OK) for name in ("initdb", "postgres")):
            continue
        major = _major_version(bindir)
        if major is not None and (best is None or major > best.major):
            best = PgBinaries(bindir.resolve(), major)
    return best


def require_binaries() -> PgBinaries:
    """The binaries, else skip the test (fail it when ``$CI`` is set: CI must not silently skip)."""
    binaries = find_binaries()
    if binaries is None:
        reason = (
            "PgServer needs PostgreSQL server binaries (initdb, postgres): none found via "
            "$PGSERVER_BINDIR, `pg_config --bindir` or /usr/lib/postgresql/*/bin"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return binaries


# ---------------------------------------------------------------------------------------------------
# Running as the postgres user


@dataclass(frozen=True)
class _RunAs:
    """How to start a PostgreSQL binary: as ourselves, or (when root) as an unprivileged OS user."""

    uid: int | None  # None: as the current user
    gid: int | None
    setpriv: str | None

    @classmethod
    def detect(cls) -> _RunAs:
        setpriv = shutil.which("setpriv")
        if os.geteuid() != 0:
            return cls(None, None, setpriv)
        user = os.environ.get("PGSERVER_OS_USER", "postgres")
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            reason = (
                f"PgServer runs as root, and initdb/postgres refuse root: it needs an OS user {user!r} "
                "(set $PGSERVER_OS_USER to use another)"
            )
            if os.environ.get("CI"):
                pytest.fail(reason)
            pytest.skip(reason)
        return cls(entry.pw_uid, entry.pw_gid, setpriv)

    def argv(self, argv: list[str], *, pdeathsig: bool) -> list[str]:
        if self.setpriv is None:
            return argv
        prefix = [self.setpriv]
        if self.uid is not None:
            prefix += [f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups"]
        if pdeathsig:
            # SIGQUIT = immediate shutdown: the server goes away with the process (strictly, the thread)
            # that started it.
            prefix += ["--pdeathsig", "QUIT"]
        if len(prefix) == 1:
            return argv
        return [*prefix, "--", *argv]

    def popen_kwargs(self) -> dict[str, Any]:
        if self.uid is None or self.setpriv is not None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def chown(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)


# ---------------------------------------------------------------------------------------------------
# Ports and directories


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _sweep_stale_dirs(base: Path) -> None:
    """Remove the directories of test processes that died without cleaning up (nothing runs in them)."""
    for path in base.glob(f"{_DIR_PREFIX}*"):
        owner = _read_pid(path / _OWNER_FILE)
        if owner is None or owner == os.getpid() or pid_alive(owner):
            continue
        postmaster = _read_pid(path / "data" / "postmaster.pid")
        if postmaster is not None and pid_alive(postmaster):
            continue
        shutil.rmtree(path, ignore_errors=True)


def _traversable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & 0o001 for p in (path, *path.parents))


def _base_dir(run_as: _RunAs) -> Path:
    base = Path(tempfile.gettempdir()).resolve()
    too_long = len(str(base)) + len(f"/{_DIR_PREFIX}xxxxxxxx/sock/.s.PGSQL.65535") > _MAX_SOCKET_PATH
    if too_long or (run_as.uid is not None and not _traversable_by_others(base)):
        base = Path("/tmp")  # noqa: S108 - short, and every user can reach it
    return base


# ---------------------------------------------------------------------------------------------------
# The server


@dataclass
class _Process:
    """What the finalizer needs to stop a forgotten server: shared by ``PgServer`` and its finalizer."""

    root: Path
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def kill(self, sig: signal.Signals, timeout_s: float) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None

    def remove(self) -> None:
        self.kill(signal.SIGQUIT, 10.0)
        shutil.rmtree(self.root, ignore_errors=True)


class PgServer:
    """A private PostgreSQL cluster (see the module docstring). Not started until ``start()`` or ``with``."""

    def __init__(
        self,
        *,
        port: int | None = None,
        max_connections: int = 200,
        shared_buffers: str = "16MB",
        settings: dict[str, str] | None = None,
    ) -> None:
        self.binaries = require_binaries()
        self._run_as = _RunAs.detect()
        base = _base_dir(self._run_as)
        _sweep_stale_dirs(base)
        self.root = Path(tempfile.mkdtemp(prefix=_DIR_PREFIX, dir=base))
        (self.root / _OWNER_FILE).write_text(f"{os.getpid()}\n")
        self._state = _Process(self.root)
        self._finalizer = weakref.finalize(self, _Process.remove, self._state)
        self._port = port if port is not None else free_port()
        self._port_fixed = port is not None  # once a caller may hold a URL, the port never changes
        self._initialized = False
        self._closed = False
        self._settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": str(max_connections),
            "shared_buffers": shared_buffers,
            "fsync": "off",
            "full_page_writes": "off",
            "wal_level": "minimal",
            "max_wal_senders": "0",
            "max_wal_size": "256MB",
            "dynamic_shared_memory_type": "posix",
            "logging_collector": "off",
            "log_line_prefix": "'%m [%p] '",
            "log_min_messages": "warning",
            "timezone": "'UTC'",
        }
        self._settings.update(settings or {})

    # -- where things are ------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        self._port_fixed = True
        return self._port

    def url(self, database: str = "postgres") -> str:
        """A libpq/asyncpg URL of the superuser ``postgres`` (trust auth) for ``database``."""
        return f"postgresql://{_SUPERUSER}@{self.host}:{self.port}/{quote(database, safe='')}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- lifecycle ------------------------------------------------------------------------------------

    def is_running(self) -> bool:
        """Whether the server process is alive (``start()``/``stop()`` return only once it is ready /
        gone)."""
        proc = self._state.proc
        return proc is not None and proc.poll() is None

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the server and return once it accepts connections (nothing to do when it runs)."""
        with self._state.lock:
            if self.is_running():
                return
            self._ensure_initialized()
            for attempt in range(5):
                self._spawn()
                deadline = time.monotonic() + timeout_s
                while not self._poll_ready(deadline):
                    time.sleep(_POLL_S)
                if self.is_running():
                    return
                self._retry_on_port_clash(attempt)

    async def astart(self, timeout_s: float = 60.0) -> None:
        """``start()`` without blocking the event loop."""
        if self.is_running():
            return
        if not self._initialized:
            await asyncio.to_thread(self._ensure_initialized)
        for attempt in range(5):
            # Spawned in the loop's thread: the parent-death signal follows the thread that started it.
            self._spawn()
            deadline = time.monotonic() + timeout_s
            while not self._poll_ready(deadline):  # noqa: ASYNC110 - polling a process, nothing to await
                await asyncio.sleep(_POLL_S)
            if self.is_running():
                return
            self._retry_on_port_clash(attempt)

    def stop(self, mode: StopMode = "fast", timeout_s: float = 60.0) -> None:
        """Stop the server (``fast``: disconnect clients and checkpoint; ``immediate``: abort, like a
        crash; ``smart``: wait for clients to leave) and return once the process is gone. After a
        ``smart`` or ``fast`` stop that takes longer than ``timeout_s``, the server is killed."""
        sig = _signal_for(mode)
        with self._state.lock:
            proc = self._state.proc
            if proc is not None and proc.poll() is None:
                proc.send_signal(sig)
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self._state.kill(signal.SIGQUIT, 10.0)
            self._state.kill(signal.SIGQUIT, 10.0)

    async def astop(self, mode: StopMode = "fast", timeout_s: float = 60.0) -> None:
        """``stop()`` without blocking the event loop."""
        sig = _signal_for(mode)
        proc = self._state.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            deadline = time.monotonic() + timeout_s
            while proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110 - as in astart
                await asyncio.sleep(_POLL_S)
        self._state.kill(signal.SIGQUIT, 10.0)

    def restart(self, mode: StopMode = "fast", timeout_s: float = 60.0) -> None:
        """Stop (dropping every open connection) and start again on the same port with the same data."""
        self.stop(mode, timeout_s)
        self.start(timeout_s)

    async def arestart(self, mode: StopMode = "fast", timeout_s: float = 60.0) -> None:
        await self.astop(mode, timeout_s)
        await self.astart(timeout_s)

    async def stop_for(self, seconds: float, mode: StopMode = "fast") -> None:
        """Stop the server, keep it down for ``seconds``, start it again (the event loop keeps running:
        run this as a task to have an outage while the code under test works)."""
        await self.astop(mode)
        await asyncio.sleep(seconds)
        await self.astart()

    def cleanup(self) -> None:
        """Stop the server at once and remove its directory (the instance is unusable afterwards)."""
        self._closed = True
        self._finalizer()

    close = cleanup

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    async def __aenter__(self) -> Self:
        try:
            await self.astart()
        except BaseException:
            self.cleanup()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<PgServer {self.binaries.major} {self.host}:{self._port} {state} {self.root}>"

    # -- databases ------------------------------------------------------------------------------------

    async def acreate_database(self, name: str | None = None) -> str:
        """Create a database (a unique name when ``name`` is None) and return its URL."""
        name = name or f"pgserver_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(self.url())
        try:
            await conn.execute(f"CREATE DATABASE {_quote_ident(name)}")
        finally:
            await conn.close()
        return self.url(name)

    def create_database(self, name: str | None = None) -> str:
        """``acreate_database`` for sync code (it may be called while an event loop runs)."""
        return _run_in_thread(lambda: self.acreate_database(name))

    # -- internals ------------------------------------------------------------------------------------

    def _ensure_initialized(self) -> None:
        if self._closed:
            raise PgServerError(f"{self!r} was cleaned up")
        if self._initialized:
            return
        self._run_as.chown(self.root)
        self.socket_dir.mkdir(exist_ok=True)
        self._run_as.chown(self.socket_dir)
        argv = [
            self.binaries.initdb,
            "--pgdata",
            str(self.data_dir),
            "--username",
            _SUPERUSER,
            "--encoding",
            "UTF8",
            "--locale",
            "C",
            "--auth",
            "trust",
            "--no-sync",
        ]
        result = subprocess.run(
            self._run_as.argv(argv, pdeathsig=False),
            capture_output=True,
            env=self._env(),
            cwd=self.root,
            timeout=120,
            check=False,
            **self._run_as.popen_kwargs(),
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise PgServerError(f"initdb failed ({result.returncode}):\n{output}")
        # Only ourselves: trust on the unix socket and on 127.0.0.1, nothing else.
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "local replication all trust\n"
            "host replication all 127.0.0.1/32 trust\n"
        )
        self._write_settings()
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\ninclude 'pgserver.conf'\n")
        self._initialized = True

    def _write_settings(self) -> None:
        settings = {**self._settings, "port": str(self._port)}
        path = self.data_dir / "pgserver.conf"
        path.write_text("".join(f"{key} = {value}\n" for key, value in settings.items()))
        self._run_as.chown(path)

    def _env(self) -> dict[str, str]:
        keep = ("PATH", "LANG", "TZ")
        env = {k: v for k, v in os.environ.items() if k in keep}
        env.update(LC_ALL="C", PGTZ="UTC")
        return env

    def _spawn(self) -> None:
        self._ensure_initialized()
        # A server killed with SIGKILL leaves its pid file behind; postgres removes a stale one itself.
        log = self.log_path.open("ab")
        self._state.log = log
        self._state.proc = subprocess.Popen(
            self._run_as.argv([self.binaries.postgres, "-D", str(self.data_dir)], pdeathsig=True),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._env(),
            cwd=self.root,
            start_new_session=True,  # a Ctrl-C in the terminal is not a fast shutdown of this server
            **self._run_as.popen_kwargs(),
        )

    def _poll_ready(self, deadline: float) -> bool:
        """True once the server is ready (or has exited: the caller looks at ``is_running()``)."""
        proc = self._state.proc
        if proc is None or proc.poll() is not None:
            return True
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            lines = []
        # Line 8 of postmaster.pid is the postmaster's status (PostgreSQL >= 10), as pg_ctl reads it.
        if len(lines) >= 8 and lines[0].strip() == str(proc.pid) and lines[7].strip() == "ready":
            return True
        if time.monotonic() > deadline:
            self._state.kill(signal.SIGQUIT, 10.0)
            raise PgServerError(f"{self!r} not ready in time; log:\n{self.log_tail()}")
        return False

    def _retry_on_port_clash(self, attempt: int) -> None:
        """The server exited while starting: pick another port if the chosen one was taken and nobody
        has seen the URL yet, else raise with the log."""
        self._state.kill(signal.SIGQUIT, 10.0)
        tail = self.log_tail()
        if "could not bind" in tail or "could not create any TCP/IP sockets" in tail:
            if not self._port_fixed and attempt < 4:
                self._port = free_port()
                self._write_settings()
                return
            raise PgServerError(f"port {self._port} on 127.0.0.1 is taken by another process; log:\n{tail}")
        raise PgServerError(f"{self!r} exited while starting; log:\n{tail}")


def _signal_for(mode: str) -> signal.Signals:
    try:
        return _STOP_SIGNALS[mode]
    except KeyError:
        raise ValueError(f"stop mode must be one of {sorted(_STOP_SIGNALS)}, not {mode!r}") from None


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _run_in_thread(make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion on a loop of its own (works whether or not a loop runs here)."""
    with ThreadPoolExecutor(1, thread_name_prefix="pgserver-sync") as pool:
        return pool.submit(lambda: asyncio.run(make())).result()
