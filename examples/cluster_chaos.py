"""Three nodes and one Redis, clients spread over them, through node kills and Redis restarts.

    .venv/bin/python examples/cluster_chaos.py --duration 60

Runs ``scripts/cluster 3``: a redis-server (an append-only file fsynced on every write,
so that what it acknowledged survives its SIGKILL) and three gateway nodes, each
restarted by the script when it dies. Clients (the project's Python client) connect to
different nodes; each follows the topic ``feed`` and makes requests. Meanwhile a
publisher posts numbered publications through the server API of whichever node is up,
and a chaos task SIGKILLs nodes and Redis (the script starts them again) and cuts
connections (their sessions migrate to another node). At the end every client
must have received every publication the API accepted, exactly once and in order, and
got exactly one right reply to each request whose session survived.

docs/protocol.md promises exactly-once for topics through recovery by offset (a client whose
node died gets ``resumed: false`` and recovers from the history) and for requests within
a session (a session that moves to another node keeps its numbering). A request written
to a node that died is the one case where the protocol admits doubt: the client raises
``SessionLost`` and it is counted apart, as "unknown".
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import trio

from trio_wsgate import Backoff, SessionLost, open_client
from trio_wsgate.testing import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
JWT_SECRET = "cluster-chaos-jwt-secret-0123456789abcdef"
API_KEY = "cluster-chaos-api-key"


@dataclass
class Member:
    """A process that ``scripts/cluster`` runs, and restarts whenever it dies."""

    pidfile: Path
    port: int

    def kill(self) -> None:
        """SIGKILL it; wait until scripts/cluster has it serving again."""
        pid = int(self.pidfile.read_text())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if int(self.pidfile.read_text()) != pid:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        wait_for_port(self.port)


@dataclass
class Report:
    duration: float
    clients: int
    node_kills: int = 0
    cuts: int = 0
    redis_restarts: int = 0
    accepted: int = 0
    refused: int = 0
    requests: int = 0
    unknown: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    wrong_replies: int = 0
    resumed: int = 0
    sessions_lost: int = 0

    def __str__(self) -> str:
        return (
            f"{self.duration:.0f} s, {self.clients} clients over 3 nodes "
            f"({self.node_kills} node kills, {self.redis_restarts} Redis restarts, "
            f"{self.cuts} connections cut; {self.resumed} sessions resumed on another node, "
            f"{self.sessions_lost} lost with their node)\n"
            f"  publications: {self.accepted} accepted, "
            f"{self.refused} refused while Redis was away\n"
            f"  requests: {self.requests} answered, {self.unknown} unknown (their node died)\n"
            f"  lost {self.lost}, duplicated {self.duplicated}, reordered {self.reordered}, "
            f"wrong replies {self.wrong_replies}"
        )


def free_run(count: int) -> int:
    """A base port with ``count`` free ports from it, and as many from it + 100."""
    for _ in range(100):
        base = free_port()
        if base + 100 + count >= 65000:
            continue
        try:
            for port in (*range(base, base + count), *range(base + 100, base + 100 + count)):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no run of free ports")


def start_cluster(workdir: str) -> tuple[subprocess.Popen[bytes], Member, list[Member], list[int]]:
    """``scripts/cluster 3``: a redis-server and three nodes, each restarted if it dies."""
    base = free_run(3)
    env = {
        **os.environ,
        "WSGATE_CLUSTER_PORT": str(base),
        "WSGATE_CLUSTER_RUN": workdir,
        "WSGATE_SECRET": "cluster-chaos-resume-secret-0123",
        "WSGATE_JWT_SECRET": JWT_SECRET,
        "WSGATE_API_KEY": API_KEY,
        "WSGATE_ALLOW_SUBSCRIBE": "feed",
    }
    env.pop("WSGATE_REDIS", None)  # its own redis-server
    flags = ["--history-size", "10000", "--close-timeout", "1", "--log-level", "error"]
    cluster = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "cluster"), "3", *flags],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its whole process group is stopped at the end
    )
    admin_ports = [base + 100 + i for i in range(3)]
    for port in admin_ports:
        wait_for_port(port, timeout=60)
    run = Path(workdir)
    redis_port = _redis_port(run)
    nodes = [Member(run / f"node-{i}.pid", base + i) for i in range(3)]
    return cluster, Member(run / "redis.pid", redis_port), nodes, admin_ports


def _redis_port(run: Path) -> int:
    url = (run / "redis.url").read_text().strip()  # redis://127.0.0.1:PORT/0
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def publish(admin_ports: list[int], text: str) -> str:
    """POST /api/publish to a live node: "accepted", "refused" (503), "down", or
    "unknown" when the node died with the request sent (it may have published it).

    Only a node that refused the connection is tried again in the node's place: one
    that dropped it after the request may have published already, and publishing the
    text again would count as a duplicate delivery (it would be two publications)."""
    for index in random.sample(range(len(admin_ports)), len(admin_ports)):
        request = urllib.request.Request(
            f"http://127.0.0.1:{admin_ports[index]}/api/publish",
            method="POST",
            data=json.dumps({"topic": "feed", "data": text}).encode(),
            headers={"Authorization": f"apikey {API_KEY}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5):
                return "accepted"
        except urllib.error.HTTPError as exc:
            if exc.code == 503:
                return "refused"
            raise
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ConnectionRefusedError):
                continue  # that node is down: nothing was sent
            return "unknown"
        except OSError:
            return "unknown"  # it died with the request: published or not, unknown
    return "down"


async def run_cluster_chaos(
    duration: float = 20.0,
    clients: int = 6,
    seed: int = 0,
    min_kills: int = 2,
    restart_redis: bool = True,
) -> Report:
    """Run the scenario; return what was counted. It runs at least ``duration`` seconds
    and until ``min_kills`` nodes were killed (and Redis restarted once, if asked)."""
    rng = random.Random(seed)
    report = Report(duration, clients)
    workdir = tempfile.mkdtemp(prefix="wsgate-chaos-")
    cluster, redis, nodes, admin_ports = await trio.to_thread.run_sync(start_cluster, workdir)
    accepted: list[str] = []
    received: list[list[tuple[int | None, str | None, Any]]] = [[] for _ in range(clients)]
    stop_publishing = trio.Event()
    wires: list[trio.abc.Stream | None] = [None] * clients  # each client's connection
    try:
        async with trio.open_nursery() as nursery:
            for index in range(clients):
                await nursery.start(
                    _client, index, nodes, wires, received[index], report, stop_publishing
                )
            # Every client follows the topic before the first publication.
            publisher_done = trio.Event()
            nursery.start_soon(
                _publisher, admin_ports, accepted, report, stop_publishing, publisher_done
            )
            start = trio.current_time()
            while (
                trio.current_time() - start < duration
                or report.node_kills < min_kills
                or (restart_redis and report.redis_restarts < 1)
            ):
                await trio.sleep(rng.uniform(1.5, 3.0))
                if (
                    restart_redis
                    and report.node_kills % 2 == 1
                    and report.redis_restarts * 2 < report.node_kills
                ):
                    await trio.to_thread.run_sync(redis.kill)  # scripts/cluster restarts it
                    report.redis_restarts += 1
                victim = nodes[rng.randrange(len(nodes))]
                await trio.to_thread.run_sync(victim.kill)  # and restarts the node
                report.node_kills += 1
                await trio.sleep(2.5)  # the clients of the killed node have settled
                # Everything is up: cut two clients' connections. They come back on
                # another node, to which their sessions migrate.
                for victim_index in rng.sample(range(clients), min(2, clients)):
                    wire = wires[victim_index]
                    if wire is not None:
                        await trio.aclose_forcefully(wire)
                        report.cuts += 1
            stop_publishing.set()
            await publisher_done.wait()  # its last publication counted before we look
            expected = set(accepted)
            for _ in range(600):  # up to a minute for the last ones to arrive
                if not any(expected - {data for _, _, data in mine} for mine in received):
                    break
                await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    finally:
        os.killpg(cluster.pid, signal.SIGTERM)
        cluster.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)  # its pids, logs and Redis files
    report.accepted = len(accepted)
    published = set(accepted)
    for mine in received:
        datas = [data for _, _, data in mine]
        report.lost += len(published - set(datas))
        report.duplicated += len(datas) - len(set(datas))
        offsets = [(epoch, offset) for offset, epoch, _ in mine]
        report.reordered += sum(
            1 for a, b in itertools.pairwise(offsets) if a[0] == b[0] and b[1] <= a[1]
        )
        seen = set(datas)
        order = [data for data in datas if data in published]
        report.reordered += int(order != [data for data in accepted if data in seen])
    return report


async def _publisher(
    admin_ports: list[int],
    accepted: list[str],
    report: Report,
    stop: trio.Event,
    done: trio.Event,
) -> None:
    number = 0
    while not stop.is_set():
        text = f"p{number}"
        number += 1
        outcome = await trio.to_thread.run_sync(publish, admin_ports, text)
        if outcome == "accepted":
            accepted.append(text)
        elif outcome == "refused":
            report.refused += 1
        await trio.sleep(0.05)
    done.set()


async def _client(
    index: int,
    nodes: list[Member],
    wires: list[trio.abc.Stream | None],
    received: list[tuple[int | None, str | None, Any]],
    report: Report,
    stop: trio.Event,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    token = jwt.encode(
        {"sub": f"user{index}", "exp": int(time.time()) + 3600}, JWT_SECRET, algorithm="HS256"
    )
    attempts = [index]

    async def connect() -> trio.abc.Stream:
        # Round robin over the nodes, skipping dead ones, like a load balancer without
        # sticky sessions: every reconnection lands on another node, so the session
        # migrates (or, if its node died, is recovered by offset).
        for _ in range(len(nodes)):
            which = attempts[0] % len(nodes)
            attempts[0] += 1
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", nodes[which].port)
            except OSError:
                continue
            wires[index] = stream
            return stream
        raise OSError("no node is up")

    backoff = Backoff(base=0.1, factor=2, cap=1.0)
    url = f"ws://127.0.0.1:{nodes[index % len(nodes)].port}/ws"
    async with open_client(url, token=token, connect=connect, backoff=backoff) as client:
        try:
            await _use(client, index, received, report, stop, task_status)
        finally:
            stats = client.statistics()
            report.resumed += stats.resumes
            report.sessions_lost += stats.sessions_lost


async def _use(
    client: Any,
    index: int,
    received: list[tuple[int | None, str | None, Any]],
    report: Report,
    stop: trio.Event,
    task_status: trio.TaskStatus[None],
) -> None:
    await client.wait_connected()
    await client.subscribe("feed")
    task_status.started()

    async def read() -> None:
        async for message in client.messages():
            if message.topic == "feed":
                received.append((message.offset, message.epoch, message.data))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        number = 0
        while not stop.is_set():
            number += 1
            try:
                reply = await client.request("echo", {"client": index, "n": number})
            except SessionLost:
                report.unknown += 1
                continue
            report.requests += 1
            if reply != {"client": index, "n": number}:
                report.wrong_replies += 1
            await trio.sleep(0.05)
        await trio.sleep_forever()  # keep reading until the report is made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-redis-restarts", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    report = trio.run(
        run_cluster_chaos, args.duration, args.clients, args.seed, 2, not args.no_redis_restarts
    )
    print(report)
    failed = report.lost or report.duplicated or report.reordered or report.wrong_replies
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
