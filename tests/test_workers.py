"""``trio-wsgate serve --workers N``: N processes on one port act as one gateway.

The machine runs as users run it, a subprocess of ``python -m trio_wsgate serve``, with
its private redis-server (these tests need the binary: they skip without it, and fail
under ``WSGATE_REQUIRE_REDIS=1``). Which worker a connection lands on is the kernel's
choice (``SO_REUSEPORT`` hashes the connection's addresses), so a test that needs the
other worker reconnects until the ``where`` handler names it, a bounded number of times.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_wsgate.testing import Closed, RawClient, free_port
from trio_wsgate.workers import merge_metrics

from .redis_server import redis_binary

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on ws://127\.0\.0\.1:(\d+)/ws \((\d+) workers on one port\)")


@dataclass
class Machine:
    process: subprocess.Popen[bytes]
    port: int
    admin: str
    log: Path

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.admin + path, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def post(self, path: str, value: Any) -> Any:
        request = urllib.request.Request(
            self.admin + path, data=json.dumps(value).encode(), method="POST"
        )
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def children(self) -> list[int]:
        """The supervisor's child processes (the workers and the private Redis)."""
        tasks = Path(f"/proc/{self.process.pid}/task")
        return [
            int(word)
            for task in tasks.iterdir()
            for word in (task / "children").read_text().split()
        ]


@contextmanager
def machine(tmp_path: Path, workers: int = 2, *flags: str) -> Iterator[Machine]:
    redis_binary()  # skips (or fails in CI) without a redis-server to start
    log = tmp_path / "machine.log"
    admin_port = free_port()
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trio_wsgate",
                "serve",
                "--workers",
                str(workers),
                "--port",
                "0",
                "--admin-port",
                str(admin_port),
                "--app",
                "tests/workers_app.py:gateway",
                "--allow-subscribe",
                "room",
                "--open-api",
                *flags,
            ],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("WSGATE_")},
        )
    try:
        deadline = time.monotonic() + 60
        found = None
        while found is None and time.monotonic() < deadline and process.poll() is None:
            found = LISTENING.search(log.read_text())
            time.sleep(0.05)
        assert found is not None, log.read_text()
        assert int(found.group(2)) == workers
        yield Machine(process, int(found.group(1)), f"http://127.0.0.1:{admin_port}", log)
    finally:
        if process.poll() is None:  # drained, so that it removes its directory
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


class Peer:
    """A client of the machine that resumes its session wherever it lands."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.welcome: dict[str, Any] = {}
        self.seq = 0  # the last seq this client sent
        self.server_seq = 0  # the last server seq it processed
        self.pushed: list[Any] = []  # the data of every topic message, once each
        self.stream: trio.abc.Stream | None = None
        self.client: RawClient | None = None

    async def connect(self) -> dict[str, Any]:
        self.stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        self.client = await RawClient.connect(self.stream)
        if not self.welcome:
            self.welcome = await self.client.hello()
            return self.welcome
        resume = {
            "session": self.welcome["session"],
            "token": self.welcome["resume_token"],
            "ack": self.server_seq,
        }
        return await self.client.hello(resume=resume)

    async def call(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Send a sequenced envelope; take what comes until its reply."""
        assert self.client is not None
        self.seq += 1
        await self.client.send({"type": kind, "seq": self.seq, "ack": self.server_seq, **fields})
        while True:
            envelope = await self.client.recv()
            if envelope.get("seq") is not None:
                if envelope["seq"] <= self.server_seq:
                    continue  # resent, already processed
                self.server_seq = envelope["seq"]
            if envelope["type"] == "msg" and envelope.get("topic") == "room":
                self.pushed.append(envelope["data"])
            if envelope["type"] == "reply" and envelope["re"] == self.seq:
                return envelope

    async def where(self) -> int:
        reply = await self.call("msg", event="where")
        pid: int = reply["data"]
        return pid

    async def drop(self) -> None:
        """Vanish: no close frame, no bye."""
        assert self.stream is not None
        await trio.aclose_forcefully(self.stream)


@pytest.mark.parametrize("named", [(), ("--node-id", "gw")], ids=["default-ids", "node-id"])
def test_a_client_that_comes_back_on_the_other_worker_resumes_with_nothing_lost(
    tmp_path: Path, named: tuple[str, ...]
) -> None:
    # With --node-id, every worker had that one name, and a resume on the other worker
    # took the session for its own without a hand-over (resumed: false).
    with machine(tmp_path, 2, *named) as node:

        async def scenario() -> None:
            peer = Peer(node.port)
            assert (await peer.connect())["resumed"] is False
            assert (await peer.call("sub", topic="room"))["data"]["offset"] == 0
            first = await peer.where()
            await peer.drop()
            for n in range(3):  # while it is away
                answer = await trio.to_thread.run_sync(
                    node.post, "/api/publish", {"topic": "room", "data": n}
                )
                assert answer["offset"] == n + 1
            landed = first
            for _ in range(40):  # each lands on either worker, by the kernel's hash
                welcome = await peer.connect()
                assert welcome["resumed"] is True
                landed = await peer.where()
                if landed != first:
                    break
                await peer.drop()
            assert landed != first, "40 connections in a row landed on one worker"
            await trio.to_thread.run_sync(node.post, "/api/publish", {"topic": "room", "data": 3})
            while len(peer.pushed) < 4:
                await peer.call("msg", event="where")
            assert peer.pushed == [0, 1, 2, 3]  # each once, in order, across the move
            status, metrics = await trio.to_thread.run_sync(node.get, "/metrics")
            assert status == 200
            assert re.search(r'wsgate_connections_open\{worker="0"\} [01]\.0', metrics)
            assert re.search(r'wsgate_connections_open\{worker="1"\} [01]\.0', metrics)
            assert "wsgate_workers 2.0" in metrics
            migrated = re.findall(
                r'wsgate_resumes_total\{result="migrated",worker="\d"\} (\d+)\.0', metrics
            )
            assert sum(map(int, migrated)) >= 1
            status, stats = await trio.to_thread.run_sync(node.get, "/api/stats")
            assert status == 200
            assert json.loads(stats)["connections"] == 1
            # SIGTERM drains every worker: the client is told 1001, the machine ends.
            children = node.children()
            assert len(children) == 3  # two workers and the private redis-server
            node.process.send_signal(signal.SIGTERM)

            async def until_closed() -> None:
                with trio.fail_after(30):
                    while True:
                        await peer.call("msg", event="where")

            with pytest.raises(Closed) as closed:
                await until_closed()
            assert closed.value.code == 1001
            await peer.drop()
            exit_code = await trio.to_thread.run_sync(node.process.wait, 30)
            assert exit_code == 0, node.log.read_text()
            for pid in children:
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)

        trio.run(scenario)


def test_a_worker_that_dies_is_started_again(tmp_path: Path) -> None:
    with machine(tmp_path) as node:

        async def scenario() -> None:
            peer = Peer(node.port)
            await peer.connect()
            victim = await peer.where()
            await peer.drop()
            os.kill(victim, signal.SIGKILL)
            with trio.fail_after(30):
                while True:
                    status, text = await trio.to_thread.run_sync(node.get, "/readyz")
                    if status == 200 and text == "ready (2 workers)\n":
                        _, metrics = await trio.to_thread.run_sync(node.get, "/metrics")
                        if re.search(r'wsgate_worker_starts\{worker="\d"\} 2\.0', metrics):
                            break
                    await trio.sleep(0.1)
            assert "exited with -9: starting it again" in node.log.read_text()
            # The machine still serves on its one port.
            peer = Peer(node.port)
            assert (await peer.connect())["resumed"] is False
            assert await peer.where() in node.children()  # the new one, or the other
            await peer.drop()

        trio.run(scenario)


def test_without_a_redis_server_the_command_says_what_to_do() -> None:
    process = subprocess.run(
        [sys.executable, "-m", "trio_wsgate", "serve", "--workers", "2", "--port", "0"],
        cwd=ROOT,
        env={"PATH": "/nonexistent", "HOME": os.environ.get("HOME", "/")},
        capture_output=True,
        timeout=60,
    )
    assert process.returncode != 0
    message = process.stderr.decode()
    assert "--redis URL" in message
    assert "redis-server" in message


def test_the_machine_metrics_label_each_worker_and_keep_each_family_once() -> None:
    one = (
        "# HELP wsgate_connections_open Open.\n# TYPE wsgate_connections_open gauge\n"
        "wsgate_connections_open 3.0\n"
        "# HELP wsgate_closes_total Ends.\n# TYPE wsgate_closes_total counter\n"
        'wsgate_closes_total{code="1000",reason="clean"} 5.0\n'
    )
    two = one.replace("3.0", "4.0").replace("5.0", "6.0")
    text = merge_metrics([("0", one), ("1", two)]).decode()
    assert text.count("# TYPE wsgate_connections_open gauge") == 1
    assert 'wsgate_connections_open{worker="0"} 3.0' in text
    assert 'wsgate_connections_open{worker="1"} 4.0' in text
    assert 'wsgate_closes_total{code="1000",reason="clean",worker="1"} 6.0' in text


def serve_until_it_stops(*flags: str) -> subprocess.CompletedProcess[bytes]:
    """``trio-wsgate serve --workers 2 --admin-port 0 FLAGS``, run to its end."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "trio_wsgate",
            "serve",
            "--workers",
            "2",
            "--admin-port",
            "0",
            *list(flags),
        ],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("WSGATE_")},
        capture_output=True,
        timeout=60,
    )


def test_a_worker_that_cannot_start_stops_the_command_with_its_error() -> None:
    redis_binary()
    process = serve_until_it_stops("--port", "0", "--app", "no_such_module:gateway")
    assert process.returncode == 1
    log = process.stderr.decode()
    assert "exited with 1 at start (its log is above)" in log
    assert "Traceback (most recent call last)" in log  # the worker's own, for the reason
    assert "Exception Group" not in log


def test_a_port_another_process_holds_is_refused_not_shared() -> None:
    redis_binary()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        process = serve_until_it_stops("--port", str(port))
    assert process.returncode == 1
    assert f"port {port} is in use" in process.stderr.decode()


def test_workers_started_again_answer_the_api_without_anyone_asking_readyz(
    tmp_path: Path,
) -> None:
    with machine(tmp_path) as node:
        workers = [
            pid
            for pid in node.children()
            if b"trio_wsgate" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        answer = None
        while answer is None:
            assert time.monotonic() < deadline, "the API never answered again"
            try:
                answer = node.post("/api/publish", {"topic": "room", "data": "back"})
            except urllib.error.HTTPError as error:
                if error.code != 503:  # 503: no worker ready yet
                    raise
                time.sleep(0.1)
        assert answer["offset"] >= 1


def test_a_signal_during_start_up_drains_what_has_started(tmp_path: Path) -> None:
    """Found by a hostile review: the supervisor watched for signals only once every
    worker was ready (up to a minute): a SIGTERM before that killed it outright, its
    temporary directory left behind, its children signalled by no one in order."""
    redis_binary()
    log = tmp_path / "machine.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "trio_wsgate", "serve", "--workers", "2", "--port", "0"],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("WSGATE_")},
        )
    tasks = Path(f"/proc/{process.pid}/task")
    children: list[int] = []
    for _ in range(600):  # bounded: until its first child (the private Redis) runs
        children = [int(w) for t in tasks.iterdir() for w in (t / "children").read_text().split()]
        if children or "listening on" in log.read_text():
            break
        time.sleep(0.01)
    assert children, log.read_text()
    assert "listening on" not in log.read_text()  # still starting
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0, log.read_text()
    assert "SIGTERM: draining" in log.read_text()
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_worker_signalled_twice_still_drains(tmp_path: Path) -> None:
    """Found by a hostile review: a worker took any second signal for "stop now", and
    a service manager that signals every process of the service (systemd's default),
    or Ctrl-C's SIGINT to the whole process group, reaches each worker beside its
    supervisor's SIGTERM: the workers stopped without parking their sessions. A worker
    leaves stopping by force to its supervisor."""
    with machine(tmp_path, 2, "--close-timeout", "3") as node:
        workers = [
            pid
            for pid in node.children()
            if b"trio_wsgate" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert len(workers) == 2
        # A client that never answers the close: each worker's drain takes a while.
        deaf = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(4)]
        for sock in deaf:
            sock.sendall(
                b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
        node.process.send_signal(signal.SIGTERM)
        for _ in range(500):  # bounded: until each worker has taken its supervisor's
            if node.log.read_text().count("trio_wsgate.server: SIGTERM: draining") >= 2:
                break
            time.sleep(0.01)
        # (Sent before that, the two could be one: the kernel keeps one pending signal.)
        for pid in workers:  # the service manager's own, while they drain
            os.kill(pid, signal.SIGTERM)
        assert node.process.wait(60) == 0, node.log.read_text()
        text = node.log.read_text()
        assert "still draining" in text
        assert "stopping now" not in text
        for sock in deaf:
            sock.close()


def test_the_machine_answers_no_stats_when_no_worker_answers(tmp_path: Path) -> None:
    """Found by a hostile review: with every worker unresponsive, /api/stats answered
    200 with every total 0, to anyone (no worker was there to check the key). (And
    its 413 was plain text where a node's API errors are JSON.)"""
    with machine(tmp_path, 2) as node:
        big = urllib.request.Request(
            node.admin + "/api/publish", data=b"x" * (1 << 20), method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(big, timeout=10)
        assert refused.value.code == 413
        assert json.loads(refused.value.read())["error"] == "too_large"
        workers = [
            pid
            for pid in node.children()
            if b"trio_wsgate" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            status, _ = node.get("/api/stats")
            assert status == 503
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        assert node.get("/api/stats")[0] == 200
