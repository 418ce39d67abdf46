"""Hostile input against a live node: it must keep serving and leak nothing.

    .venv/bin/python examples/hostile.py --duration 180

Starts ``python -m trio_wsgate serve`` (limits on: a rate limit, a per-address cap, a
small message size) and attacks it from many sockets at once, each attack picked at
random: garbage before the handshake, a dripped or oversized request head, random
WebSocket frames (any opcode, bit, length, masked or not, fragmented), random and
mutated envelopes after a real ``hello``, bursts over the rate limit, forged resumes,
and an end at a random moment: a clean close, a FIN, or a reset (RST). All the while a
well-behaved canary client makes calls and must get every answer.

Afterwards, with every hostile socket gone and every detached session expired (the node
keeps them for a resume for 5 s here): the node still answers, ``wsgate_tasks`` is back
where it was before the attack, no connection or session is left, no internal error
was counted, and the resident memory grew by less than the bound. The loops are bounded
by count and by time, and everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from trio_wsgate.testing import RawClient, free_port

ROOT = Path(__file__).resolve().parent.parent
TYPES = ["hello", "msg", "reply", "sub", "unsub", "pub", "ack", "ping", "pong", "refresh", "bye"]
FIELDS = ["seq", "ack", "re", "event", "topic", "data", "token", "resume", "since", "ts"]
RSS_BOUND_MIB = 24.0  # after a warm-up round: what the allocator may keep, at most


@dataclass
class Report:
    attacks: collections.Counter[str] = field(default_factory=collections.Counter)
    endings: collections.Counter[str] = field(default_factory=collections.Counter)
    canary_calls: int = 0
    canary_failures: int = 0
    canary_error: str = ""
    #: The node's ERROR lines and tracebacks, if any (there should be none).
    node_errors: list[str] = field(default_factory=list)
    tasks_before: float = 0
    tasks_after: float = 0
    connections_after: float = 0
    sessions_after: float = 0
    internal_errors: float = 0
    rss_before_mib: float = 0
    rss_after_mib: float = 0
    still_serving: bool = False

    @property
    def healthy(self) -> bool:
        return (
            self.still_serving
            and self.canary_failures == 0
            and self.tasks_after <= self.tasks_before
            and self.connections_after == 0
            and self.sessions_after == 0
            and self.internal_errors == 0
            and self.rss_after_mib - self.rss_before_mib < RSS_BOUND_MIB
        )

    def __str__(self) -> str:
        attacks = ", ".join(f"{n} {k}" for k, n in sorted(self.attacks.items()))
        endings = ", ".join(f"{n} x {k}" for k, n in sorted(self.endings.items()))
        return (
            f"attacks: {sum(self.attacks.values())} ({attacks})\n"
            f"how they ended: {endings}\n"
            f"canary: {self.canary_calls} calls, {self.canary_failures} failed"
            + (f" ({self.canary_error})" if self.canary_error else "")
            + "\n"
            f"wsgate_tasks: {self.tasks_before:.0f} before, {self.tasks_after:.0f} after; "
            f"connections open after: {self.connections_after:.0f}; "
            f"sessions after: {self.sessions_after:.0f}; "
            f"internal errors: {self.internal_errors:.0f}\n"
            f"RSS: {self.rss_before_mib:.1f} MiB before, {self.rss_after_mib:.1f} MiB after\n"
            f"still serving: {self.still_serving}; healthy: {self.healthy}"
            + "".join("\n  " + line.rstrip() for line in self.node_errors)
        )


# Run as ``python -c _WITH_PARENT PID ARGV...``: PR_SET_PDEATHSIG (Linux) kills the
# child when this process ends, however it ends (Ctrl-C, SIGTERM, SIGKILL), and it
# survives the exec of ARGV. Elsewhere the ``finally`` blocks are all there is.
_WITH_PARENT = """
import ctypes, os, signal, sys
if sys.platform == "linux":
    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def child_command(*argv: str) -> list[str]:
    """``argv`` as a child process that dies with this one (see ``_WITH_PARENT``)."""
    return [sys.executable, "-c", _WITH_PARENT, str(os.getpid()), *argv]


class Node:
    """The node under attack: a real process on free ports.

    ``env`` is added to this process's environment for it (``WSGATE_*`` settings).
    """

    def __init__(self, flags: list[str], env: Mapping[str, str] | None = None) -> None:
        self.admin_port = free_port()
        self.process = subprocess.Popen(
            child_command(
                *(sys.executable, "-m", "trio_wsgate", "serve", "--port", "0"),
                *("--admin-port", str(self.admin_port), "--log-level", "info", *flags),
            ),
            cwd=ROOT,
            env=None if env is None else {**os.environ, **env},
            stderr=subprocess.PIPE,
            text=True,
        )
        self.port = 0
        self.log: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.log.append(line)
                match = re.search(r"listening on ws://127\.0\.0\.1:(\d+)/", line)
                if match:
                    self.port = int(match.group(1))
                if "admin on" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(30) or not self.port:
            raise RuntimeError("the node did not start:\n" + "".join(self.log))

    def metric(self, name: str) -> float:
        url = f"http://127.0.0.1:{self.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def rss_mib(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        if self.process.stderr is not None:
            self.process.stderr.close()


def _envelope(rng: random.Random) -> Any:
    if rng.random() < 0.1:
        return rng.choice([5, "x", None, [], [1, [2]], {"a": {"b": {}}}])
    value: dict[str, Any] = {"type": rng.choice([*TYPES, "teleport", ""])}
    for name in rng.sample(FIELDS, rng.randint(0, 4)):
        value[name] = rng.choice(
            [rng.randint(-3, 20), 2**64, "x" * rng.randint(0, 50), None, {"k": [1]}, 1.5, True]
        )
    return value


def _frame(rng: random.Random) -> bytes:
    opcode = rng.choice([0, 1, 2, 8, 9, 10, 3, 11, 15])
    first = (0x80 if rng.random() < 0.8 else 0) | (rng.choice([0, 0, 0, 0x40]) | opcode)
    payload = rng.randbytes(rng.choice([0, 1, 5, 125, 126, 300]))
    length = len(payload)
    masked = rng.random() < 0.9
    if rng.random() < 0.05:  # a lie: a huge length, then nothing
        header = bytes([first, (0x80 if masked else 0) | 127]) + struct.pack("!Q", 2**40)
        return header + (os.urandom(4) if masked else b"")
    if length < 126:
        header = bytes([first, (0x80 if masked else 0) | length])
    else:
        header = bytes([first, (0x80 if masked else 0) | 126]) + struct.pack("!H", length)
    if not masked:
        return header + payload
    mask = os.urandom(4)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _end(stream: trio.SocketStream, rng: random.Random, report: Report) -> None:
    how = rng.choice(["close", "fin", "reset", "linger"])
    report.endings[how] += 1
    if how == "reset":
        with contextlib.suppress(OSError):  # unless it is closed already
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    elif how == "linger":
        await trio.sleep(rng.random() * 0.5)
    await trio.aclose_forcefully(stream)


async def _attack(port: int, rng: random.Random, report: Report) -> None:
    kind = rng.choice(
        ["garbage", "drip", "big-head", "frames", "envelopes", "burst", "resume", "idle"]
    )
    report.attacks[kind] += 1
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        report.endings["refused at connect"] += 1
        return
    try:
        with trio.move_on_after(rng.choice([0.05, 0.3, 1.0, 3.0])):
            if kind == "garbage":
                await stream.send_all(rng.randbytes(rng.randint(1, 3000)))
                await stream.receive_some()
            elif kind == "drip":
                for byte in b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n":
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(0.05)
            elif kind == "big-head":
                head = b"GET /ws HTTP/1.1\r\nHost: x\r\n" + b"X-A: " + b"a" * 20000 + b"\r\n\r\n"
                await stream.send_all(head)
                await stream.receive_some()
            else:
                client = await RawClient.connect(stream)
                if kind != "idle":
                    await client.hello(**_resume(rng) if kind == "resume" else {})
                for _ in range(rng.randint(1, 30)):
                    if kind == "frames":
                        await stream.send_all(_frame(rng))
                    elif kind == "burst":
                        await client.send(*({"type": "ping", "ts": i} for i in range(20)))
                    elif kind in ("envelopes", "resume"):
                        raw = json.dumps(_envelope(rng)).encode()
                        if rng.random() < 0.2:
                            raw = bytes(b ^ rng.choice([0, 0, 0, 1, 128]) for b in raw)
                        await client.send_raw(raw, binary=rng.random() < 0.1)
                    await trio.sleep(rng.random() * 0.02)
                await client.wait_closed()
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, Exception):
        pass  # the node hung up on us: that is the point
    finally:
        await _end(stream, rng, report)


def _resume(rng: random.Random) -> dict[str, Any]:
    return {"resume": {"session": "x" * rng.randint(0, 40), "token": "forged", "ack": 0}}


async def _canary(port: int, stop: trio.Event, report: Report) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        client = await RawClient.connect(stream)
        await client.hello()
        seq = acked = 0
        while not stop.is_set():
            seq += 1
            report.canary_calls += 1
            try:
                with trio.fail_after(5):
                    call = {"type": "msg", "seq": seq, "event": "echo", "data": seq, "ack": acked}
                    await client.send(call)
                    reply = await client.recv_type("reply")
                    acked = reply["seq"]  # acks keep the server's window open
                if reply.get("data") != seq:
                    report.canary_failures += 1
            except Exception as exc:
                report.canary_failures += 1
                report.canary_error = repr(exc)
                return
            await trio.sleep(0.05)
        await client.close()
    finally:
        await trio.aclose_forcefully(stream)


async def _one_call(port: int) -> bool:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        client = await RawClient.connect(stream)
        await client.hello()
        await client.send({"type": "msg", "seq": 1, "event": "echo", "data": "still here"})
        ok = (await client.recv_type("reply")).get("data") == "still here"
        await client.close()
        await client.wait_closed()
        await stream.aclose()
        return ok


async def _round(
    port: int, seconds: float, workers: int, rng: random.Random, report: Report, limit: int
) -> None:
    deadline = trio.current_time() + seconds
    count = [0]

    async def worker(seed: int) -> None:
        local = random.Random(seed)
        while trio.current_time() < deadline and count[0] < limit:
            count[0] += 1
            await _attack(port, local, report)

    async with trio.open_nursery() as nursery:
        for _ in range(workers):
            nursery.start_soon(worker, rng.randrange(2**32))


async def attack_node(
    port: int, seconds: float, workers: int = 30, seed: int = 1, max_attacks: int = 100_000
) -> Report:
    """The attacks alone, on a node of someone else's: ``workers`` sockets at once for
    ``seconds`` (at most ``max_attacks``). Only ``attacks`` and ``endings`` are filled."""
    report = Report()
    await _round(port, seconds, workers, random.Random(seed), report, max_attacks)
    return report


async def _settle(node: Node, name: str, at_most: float, seconds: float = 30) -> float:
    value = node.metric(name)
    for _ in range(int(seconds / 0.1)):
        if value <= at_most:
            break
        await trio.sleep(0.1)
        value = node.metric(name)
    return value


async def run_hostile(
    duration: float = 20,
    workers: int = 30,
    seed: int = 1,
    max_attacks: int = 100_000,
    transport: str = "websockets",
) -> Report:
    """Attack a fresh node for ``duration`` seconds (at most ``max_attacks``); report."""
    rng = random.Random(seed)
    report = Report()
    node = Node(
        [
            *("--transport", transport, "--rate-limit", "200", "--max-connections-per-ip", "200"),
            *("--max-message-size", "4096", "--hello-timeout", "2", "--handshake-timeout", "2"),
            # Detached sessions are kept for a resume this long: short, so that the
            # end of the run can wait for them to expire before measuring.
            *("--resume-ttl", "5"),
        ]
    )
    try:
        port = node.port
        # A warm-up round, so that the baseline includes what the allocator keeps.
        await _round(port, min(5.0, duration / 4), workers, rng, Report(), max_attacks)
        await _settle(node, "wsgate_connections_open", 0)
        await _settle(node, "wsgate_sessions", 0)  # the warm-up's have expired
        report.tasks_before = node.metric("wsgate_tasks")
        report.rss_before_mib = node.rss_mib()
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_canary, port, stop, report)
            await _round(port, duration, workers, rng, report, max_attacks)
            stop.set()
        report.connections_after = await _settle(node, "wsgate_connections_open", 0)
        report.sessions_after = await _settle(node, "wsgate_sessions", 0)
        report.tasks_after = await _settle(node, "wsgate_tasks", report.tasks_before)
        report.internal_errors = node.metric("wsgate_internal_errors_total")
        report.rss_after_mib = node.rss_mib()
        report.still_serving = node.process.poll() is None and await _one_call(port)
    finally:
        node.stop()
        errors = [i for i, line in enumerate(node.log) if " ERROR " in line]
        if errors:
            report.node_errors = node.log[errors[0] : errors[0] + 60]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of attack")
    parser.add_argument("--workers", type=int, default=30, help="hostile sockets at once")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--transport", default="websockets", choices=["websockets", "trio-websocket", "asgi"]
    )
    args = parser.parse_args()
    report = trio.run(run_hostile, args.duration, args.workers, args.seed, 100_000, args.transport)
    print(report)
    sys.exit(0 if report.healthy else 1)


if __name__ == "__main__":
    main()
