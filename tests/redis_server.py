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

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it (again, on the same port) and wait until it answers."""
        # A directory of its own even when it keeps nothing: a primary demoted to a
        # replica by a failover writes the snapshot it syncs from (dump.rdb) there,
        # and a server started later in the same directory would load it.
        self._scratch = tempfile.mkdtemp(prefix="wsgate-redis-")
        durability = ["--appendonly", "no", "--dir", self._scratch]
        if self.data_dir is not None:
            durability = ["--appendonly", "yes", "--appendfsync", "always", "--dir", self.data_dir]
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
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

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
