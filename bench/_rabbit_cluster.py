"""A real three-node RabbitMQ cluster on loopback (never the shared node on 5672), for the cluster tests
(``tests/_rabbit_cluster.py`` adds their skip and fixture) and the cluster benchmark (:mod:`bench._cluster`).

``RabbitCluster`` runs its own RabbitMQ nodes from the installed server (Debian's ``rabbitmq-server``, or
any install whose scripts honour the ``RABBITMQ_*`` variables): each node has its own name
(``atlas-<token>-c<n>@localhost``, so two test sessions on one machine never meet), its own AMQP and
distribution ports (free ports on 127.0.0.1), and its own data and log directories under one temporary
directory. Nothing listens beyond loopback: the AMQP listener and Erlang distribution are bound to
127.0.0.1, epmd is asked on 127.0.0.1, and the enabled-plugins file is the cluster's own and empty (no
management plugin, no other listener).

The nodes and the ``rabbitmqctl`` calls made here share an Erlang cookie of their own: ``HOME`` points at
a directory of the cluster holding ``.erlang.cookie``, so neither the server nor the CLI reads the shared
node's cookie (``/var/lib/rabbitmq/.erlang.cookie``), and a CLI call can never reach the shared node by
mistake. ``RABBITMQ_CONF_ENV_FILE`` points at an empty file of the cluster's, so Debian's
``/etc/rabbitmq/rabbitmq-env.conf`` (which names the shared node) is not read either. The scripts are run
from ``/usr/lib/rabbitmq/bin`` directly: Debian's ``/usr/sbin`` wrappers switch to the ``rabbitmq`` user
and its home, and so its cookie.

    with RabbitCluster() as cluster:        # start 3 nodes, join 2 and 3 to 1, wait for 3 running
        cluster.amqp_url                    # "amqp://guest:guest@127.0.0.1:p1/,amqp://...:p2/,..."
        cluster.queue("x.tasks")            # {"name", "type", "leader", "members", "online", ...}
        cluster.kill(node)                  # SIGKILL the node (a crash); cluster.stop_app(node) is softer
        cluster.start(node)                 # the same node again: same name, ports and data; it rejoins
        cluster.running_nodes()             # from cluster_status

Nodes get a parent-death signal (``setpriv --pdeathsig``), so they go away with the process that started
them even if it is SIGKILLed; directories of dead processes are removed the next time a cluster is created.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self

from bench._ports import free_port, pid_alive

_DIR_PREFIX = "atlas-rabbit-cluster-"
_OWNER_FILE = "owner.pid"
_DEBIAN_SCRIPTS = Path("/usr/lib/rabbitmq/bin")


class RabbitClusterError(RuntimeError):
    """A node did not start, join or stop (the message has the tail of its log)."""


def find_scripts() -> Path | None:
    """The directory of the real ``rabbitmq-server`` and ``rabbitmqctl`` scripts: ``$RABBITMQ_SCRIPTS_DIR``,
    else Debian's ``/usr/lib/rabbitmq/bin``, else where ``rabbitmq-server`` on ``PATH`` lives."""
    candidates: list[Path] = []
    if override := os.environ.get("RABBITMQ_SCRIPTS_DIR"):
        candidates.append(Path(override))
    candidates.append(_DEBIAN_SCRIPTS)
    if found := shutil.which("rabbitmq-server"):
        candidates.append(Path(found).resolve().parent)
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in ("rabbitmq-server", "rabbitmqctl")):
            return directory
    return None


MISSING_SCRIPTS: Final = (
    "a RabbitMQ cluster needs a RabbitMQ server install (rabbitmq-server and rabbitmqctl): none found via "
    "$RABBITMQ_SCRIPTS_DIR, /usr/lib/rabbitmq/bin or PATH (Debian: apt-get install rabbitmq-server)"
)


def scripts_or_error() -> Path:
    """The scripts (:func:`find_scripts`), else :class:`RabbitClusterError` saying what to install."""
    scripts = find_scripts()
    if scripts is None:
        raise RabbitClusterError(MISSING_SCRIPTS)
    return scripts


def _sweep_stale_dirs(base: Path) -> None:
    """Remove the directories of processes that died without cleaning up (their nodes died with
    them: parent-death signal)."""
    for path in base.glob(f"{_DIR_PREFIX}*"):
        try:
            owner = int((path / _OWNER_FILE).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if owner != os.getpid() and not pid_alive(owner):
            shutil.rmtree(path, ignore_errors=True)


def _port_answers(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class RabbitNode:
    """One node of the cluster: its name, ports and directory, and its process while it runs."""

    index: int
    name: str
    amqp_port: int
    dist_port: int
    root: Path
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def stdout_path(self) -> Path:
        return self.root / "stdout.log"

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        chunks = []
        for path in (self.stdout_path, self.log_dir / f"{self.name}.log"):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                chunks.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(chunks) or "(no log)"

    def __str__(self) -> str:
        return self.name


@dataclass
class RabbitCluster:
    """A RabbitMQ cluster of ``size`` nodes on loopback (see the module docstring)."""

    size: int = 3
    scripts: Path = field(default_factory=scripts_or_error)
    nodes: list[RabbitNode] = field(default_factory=list)
    root: Path = field(init=False)
    token: str = field(default_factory=lambda: secrets.token_hex(3))

    def __post_init__(self) -> None:
        base = Path(tempfile.gettempdir())
        _sweep_stale_dirs(base)
        self.root = Path(tempfile.mkdtemp(prefix=_DIR_PREFIX, dir=base))
        (self.root / _OWNER_FILE).write_text(f"{os.getpid()}\n")
        home = self.root / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20).upper())
        cookie.chmod(0o400)
        (self.root / "rabbitmq-env.conf").write_text("# this cluster's own: nothing from /etc/rabbitmq\n")
        (self.root / "enabled_plugins").write_text("[].\n")
        taken: set[int] = set()
        for index in range(1, self.size + 1):
            amqp_port, dist_port = self._free_port(taken), self._free_port(taken)
            node_root = self.root / f"c{index}"
            (node_root / "mnesia").mkdir(parents=True)
            (node_root / "log").mkdir()
            (node_root / "rabbitmq.conf").write_text(
                "\n".join(
                    [
                        f"listeners.tcp.1 = 127.0.0.1:{amqp_port}",
                        "listeners.ssl = none",
                        "log.console = false",
                        "log.file.level = info",
                        # A node that loses its peers keeps serving: tests/test_cluster.py kills one of three.
                        "cluster_partition_handling = ignore",
                        "",
                    ]
                )
            )
            self.nodes.append(
                RabbitNode(
                    index=index,
                    name=f"atlas-{self.token}-c{index}@localhost",
                    amqp_port=amqp_port,
                    dist_port=dist_port,
                    root=node_root,
                )
            )

    @staticmethod
    def _free_port(taken: set[int]) -> int:
        while True:
            port = free_port()
            if port not in taken:
                taken.add(port)
                return port

    # -- where things are ------------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def amqp_url(self) -> str:
        """Every node's URL, comma-separated: what ``AMQP_URL`` takes for a cluster."""
        return ",".join(self.urls)

    def node(self, name_or_port: str | int) -> RabbitNode:
        """The node of that name, or of that AMQP port."""
        for node in self.nodes:
            if name_or_port in (node.name, node.amqp_port):
                return node
        raise KeyError(name_or_port)

    # -- the CLI ---------------------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        keep = ("PATH", "LANG", "LC_ALL", "TZ")
        env = {k: v for k, v in os.environ.items() if k in keep}
        env.update(
            HOME=str(self.root / "home"),  # the cluster's own Erlang cookie, for the nodes and the CLI
            RABBITMQ_CONF_ENV_FILE=str(self.root / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.root / "enabled_plugins"),
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def _node_env(self, node: RabbitNode) -> dict[str, str]:
        env = self._env()
        env.update(
            RABBITMQ_NODENAME=node.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(node.amqp_port),
            RABBITMQ_DIST_PORT=str(node.dist_port),
            RABBITMQ_MNESIA_BASE=str(node.root / "mnesia"),
            RABBITMQ_LOG_BASE=str(node.log_dir),
            RABBITMQ_CONFIG_FILE=str(node.root / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(node.root / "advanced.config"),  # absent: none
            # The script then execs the VM (with -noinput) instead of waiting on it in a shell, so the
            # process we hold is the node itself and signals reach it.
            detached="1",
        )
        return env

    def ctl(
        self, node: RabbitNode, *args: str, timeout_s: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n <node> <args>`` with the cluster's cookie."""
        result = subprocess.run(
            [str(self.scripts / "rabbitmqctl"), "-n", node.name, *args],
            capture_output=True,
            text=True,
            env=self._env(),
            cwd=self.root,
            timeout=timeout_s,
            check=False,
        )
        if check and result.returncode != 0:
            raise RabbitClusterError(
                f"rabbitmqctl -n {node} {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}\n{node.log_tail()}"
            )
        return result

    def ctl_json(self, node: RabbitNode, *args: str, timeout_s: float = 60.0) -> Any:
        out = self.ctl(node, *args, "--formatter", "json", "-q", timeout_s=timeout_s).stdout
        return json.loads(out) if out.strip() else []

    def _any_running(self) -> RabbitNode:
        for node in self.nodes:
            if node.is_running():
                return node
        raise RabbitClusterError("no node of the cluster runs")

    def running_nodes(self, via: RabbitNode | None = None) -> list[str]:
        """The cluster's running nodes, as ``cluster_status`` on ``via`` (any running node) sees them."""
        status = self.ctl_json(via or self._any_running(), "cluster_status")
        return sorted(status.get("running_nodes", []))

    def queue(self, name: str) -> dict[str, Any]:
        """``list_queues`` columns of one queue: name, type, leader, members, online, consumers, messages."""
        rows = self.ctl_json(
            self._any_running(), "list_queues", "name", "type", "leader", "members", "online",
            "consumers", "messages",
        )  # fmt: skip
        for row in rows:
            if row.get("name") == name:
                return dict(row)
        raise KeyError(f"queue {name!r} not found; queues: {[r.get('name') for r in rows]}")

    def connections(self) -> list[dict[str, Any]]:
        """Every AMQP connection of the cluster: ``port`` (the node's AMQP port, so which node it is on),
        ``peer_port`` and the client's ``connection_name``."""
        rows = self.ctl_json(
            self._any_running(), "list_connections", "port", "peer_port", "client_properties"
        )
        out = []
        for row in rows:
            props = row.get("client_properties") or {}
            if isinstance(props, list):  # [[key, type, value], ...] in some versions
                props = {p[0]: p[-1] for p in props if isinstance(p, list) and p}
            out.append({"port": row.get("port"), "peer_port": row.get("peer_port"), **props})
        return out

    # -- lifecycle ------------------------------------------------------------------------------------

    def _spawn(self, node: RabbitNode) -> None:
        argv = [str(self.scripts / "rabbitmq-server")]
        setpriv = shutil.which("setpriv")
        if setpriv:
            # The node goes away with the process (strictly, the thread) that started it.
            argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
        if node.log is not None:
            node.log.close()
        node.log = node.stdout_path.open("ab")
        node.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=node.log,
            stderr=subprocess.STDOUT,
            env=self._node_env(node),
            cwd=node.root,
            start_new_session=True,  # a Ctrl-C in the terminal is not this node's business
        )

    def _await_booted(self, node: RabbitNode, deadline: float) -> None:
        """Until the node accepts AMQP connections and ``await_startup`` says it is booted."""
        while not _port_answers(node.amqp_port):
            if not node.is_running():
                raise RabbitClusterError(f"node {node} exited while starting:\n{node.log_tail()}")
            if time.monotonic() > deadline:
                raise RabbitClusterError(f"node {node} not up in time:\n{node.log_tail()}")
            time.sleep(0.1)
        remaining = max(5.0, deadline - time.monotonic())
        self.ctl(node, "await_startup", "--timeout", str(int(remaining)), timeout_s=remaining + 15)

    def start(self, node: RabbitNode | None = None, *, timeout_s: float = 90.0) -> None:
        """Start one node (same name, ports and data: a cluster member rejoins by itself), or with no
        argument every node, then join nodes 2.. to node 1 and wait until all of them run."""
        deadline = time.monotonic() + timeout_s
        if node is not None:
            if not node.is_running():
                self._spawn(node)
            self._await_booted(node, deadline)
            return
        for each in self.nodes:  # spawned from this thread: the parent-death signal follows it
            if not each.is_running():
                self._spawn(each)
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda n: self._await_booted(n, deadline), self.nodes))
        first = self.nodes[0]
        members = self.running_nodes(via=first)
        joining = [other for other in self.nodes[1:] if other.name not in members]
        # stop_app and start_app on the joining nodes at once; the joins themselves one after another.
        with ThreadPoolExecutor(max(1, len(joining))) as pool:
            list(pool.map(lambda n: self.ctl(n, "stop_app"), joining))
            for other in joining:
                self.ctl(other, "join_cluster", first.name)
            list(pool.map(lambda n: self.ctl(n, "start_app"), joining))
        self.wait_running(len(self.nodes), timeout_s=max(5.0, deadline - time.monotonic()))

    def wait_running(self, count: int, *, timeout_s: float = 60.0) -> list[str]:
        """Until ``cluster_status`` shows ``count`` running nodes; returns them."""
        deadline = time.monotonic() + timeout_s
        running: list[str] = []
        while True:
            with contextlib.suppress(RabbitClusterError, subprocess.TimeoutExpired, ValueError):
                running = self.running_nodes()
                if len(running) == count:
                    return running
            if time.monotonic() > deadline:
                raise RabbitClusterError(f"cluster_status shows {running}, not {count} running nodes")
            time.sleep(0.5)

    def kill(self, node: RabbitNode) -> None:
        """SIGKILL the node: a crash, no goodbye to clients or peers."""
        if node.proc is not None and node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()

    def stop(self, node: RabbitNode, *, timeout_s: float = 60.0) -> None:
        """Stop the node gracefully (SIGTERM; SIGKILL after ``timeout_s``)."""
        proc = node.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        """Stop every node (in parallel) and remove the cluster's directory."""
        with ThreadPoolExecutor(max(1, len(self.nodes))) as pool:
            list(pool.map(lambda n: self.stop(n, timeout_s=30.0), self.nodes))
        for node in self.nodes:
            if node.log is not None:
                node.log.close()
                node.log = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        nodes = ", ".join(f"{n.name}:{n.amqp_port}{'' if n.is_running() else ' (down)'}" for n in self.nodes)
        return f"<RabbitCluster {nodes} in {self.root}>"


def node_names(nodes: Sequence[RabbitNode]) -> list[str]:
    return sorted(node.name for node in nodes)
