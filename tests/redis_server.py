"""A real redis-server for the tests, on a free port of 127.0.0.1, that tests may kill.

Never the machine's shared one: a test may kill it. Where no ``redis-server`` is installed the
tests that need one skip, with the reason, unless ``WSGATE_REQUIRE_REDIS=1`` (CI), in
which case they fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import pytest

from trio_wsgate.testing import free_port


@dataclass
class RedisServer:
    """One redis-server process; :meth:`kill` and :meth:`start` it at will."""

    binary: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    _scratch: str | None = None
    #: A directory for an append-only file fsynced on every write: what it
    #: acknowledged survives a SIGKILL. None: it keeps nothing.
    data_dir: str | None = None
    #: A node of a Redis Cluster: the file where it keeps the cluster's layout (kept
    #: across a kill and start, so that the node comes back as itself). None: standalone.
    node_file: str | None = None
    bus_port: int = field(default_factory=free_port)
    #: More of redis-server's options.
    options: list[str] = field(default_factory=list)
    _started: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it (again, on the same port) and wait until it answers.

        The first start draws other free ports if the ones it had were taken meanwhile
        (a free port is only free until someone binds it); a restart keeps its own.
        """
        for _ in range(5):
            if self._launch():
                self._started = True
                return
            self.kill()
            if self._started:
                break
            self.port = free_port()
            self.bus_port = free_port()
            while self.bus_port == self.port:
                self.bus_port = free_port()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def _launch(self) -> bool:
        # A directory of its own even when it keeps nothing: a primary demoted to a
        # replica by a failover writes the snapshot it syncs from (dump.rdb) there,
        # and a server started later in the same directory would load it.
        self._scratch = tempfile.mkdtemp(prefix="wsgate-redis-")
        durability = ["--appendonly", "no", "--dir", self._scratch]
        if self.data_dir is not None:
            durability = ["--appendonly", "yes", "--appendfsync", "always", "--dir", self.data_dir]
        if self.node_file is not None:
            durability += ["--cluster-enabled", "yes", "--cluster-config-file", self.node_file]
            # The cluster bus is on a port of its own (by default port + 10000, which
            # a free port above 55535 cannot have).
            durability += ["--cluster-port", str(self.bus_port)]
        durability += self.options
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *durability,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.process.poll() is None:
            if self.answers(b"PING\r\n", b"+PONG"):
                return True
            time.sleep(0.05)
        return False  # it exited (a port taken), or never answered

    def answers(self, command: bytes, expected: bytes) -> bool:
        """Whether it answers ``command`` (inline) with a reply that holds ``expected``."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(command)
                return expected in sock.recv(4096)
        except OSError:
            return False

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and commands queue, but nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT: it answers what queued meanwhile, in order."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: no goodbye to anyone, and its data is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        reason = "no redis-server is installed (apt-get install redis-server)"
        if os.environ.get("WSGATE_REQUIRE_REDIS") == "1":
            pytest.fail(f"WSGATE_REQUIRE_REDIS=1 but {reason}")
        pytest.skip(reason)
    return binary


@dataclass
class RedisClusterServers:
    """A Redis Cluster of ``size`` primaries (no replicas) on free ports of 127.0.0.1.

    Every node is a :class:`RedisServer` started with ``--cluster-enabled yes`` and a
    node file in its own scratch directory; ``redis-cli --cluster create`` then spreads
    the 16384 slots over them.
    """

    binary: str
    size: int = 3
    #: How long a primary may not answer before its replica takes over (Redis's
    #: default is 15 s).
    node_timeout_ms: int = 15000
    #: More of redis-server's options, for every node.
    extra_options: list[str] = field(default_factory=list)
    nodes: list[RedisServer] = field(default_factory=list)
    _dir: str | None = None

    @property
    def url(self) -> str:
        """A ``redis+cluster://`` URL naming every node (any one of them would do)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="wsgate-cluster-")
        self.nodes = []
        for index in range(self.size):
            node_file = os.path.join(self._dir, f"nodes-{index}.conf")
            self.nodes.append(RedisServer(self.binary, node_file=node_file, options=self._options))
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli") or os.path.join(os.path.dirname(self.binary), "redis-cli")
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        self.wait_ok()

    def add_replica(self, primary: RedisServer) -> RedisServer:
        """Start a node and join it to the cluster as ``primary``'s replica; return it
        once it is in sync."""
        assert self._dir is not None
        node_file = os.path.join(self._dir, f"nodes-{len(self.nodes)}.conf")
        replica = RedisServer(self.binary, node_file=node_file, options=self._options)
        replica.start()
        self.nodes.append(replica)
        cli = shutil.which("redis-cli") or os.path.join(os.path.dirname(self.binary), "redis-cli")
        subprocess.run(
            [
                cli,
                "--cluster",
                "add-node",
                f"127.0.0.1:{replica.port}",
                f"127.0.0.1:{primary.port}",
                "--cluster-slave",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        deadline = time.monotonic() + 20
        while not replica.answers(b"INFO replication\r\n", b"master_link_status:up"):
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not sync with its primary")
            time.sleep(0.1)
        self.wait_ok()
        return replica

    @property
    def _options(self) -> list[str]:
        return ["--cluster-node-timeout", str(self.node_timeout_ms), *self.extra_options]

    def wait_ok(self) -> None:
        """Wait until every node says the cluster is up (``cluster_state:ok``)."""
        deadline = time.monotonic() + 20
        while not all(
            node.answers(b"CLUSTER INFO\r\n", b"cluster_state:ok") for node in self.nodes
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not come up")
            time.sleep(0.1)

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
