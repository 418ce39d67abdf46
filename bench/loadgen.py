"""The load generator: picows (a Cython WebSocket client) on uvloop, in its own process.

    python -m bench.loadgen SCENARIO --url ws://127.0.0.1:PORT/ws --proto PROTO [options]

It speaks either the wsgate protocol (``--proto json`` or ``msgpack``: hello, sequenced
``msg`` with piggybacked acks, replies, ``ping``/``pong``, ``sub``) or the peers' bare
echo/broadcast (``--proto echo``, see bench/peers.py). It measures the server too, by
its pid (``--server-pid``): CPU time and RSS from /proc over the same window as its own
counts, so that both are read at the same moments. It prints one JSON object, including
its own busy share (its CPU time over the wall time of the window): a generator near
100% busy would be measuring itself, not the server.

The generator is kept cheap on purpose: requests are formatted from a template, the
acks of subscribers are read off the last ``seq`` of a frame instead of decoding it,
and only a sample of subscribers decodes what it receives (for latency).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import uvloop
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

PAYLOAD = "x" * 64  # the 64-byte payload of every request
TICKS = os.sysconf("SC_CLK_TCK")
SAMPLED = 100  # fan-out subscribers that decode what they receive, for latency


# -- the server, read from /proc ---------------------------------------------------------


#: Measure the server's process and all its descendants (``--server-tree``: the
#: workers of ``--workers N``, under their supervisor).
TREE = False


def _pids(pid: int) -> list[int]:
    """``pid``, and with :data:`TREE` every process below it."""
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        if TREE:  # children are listed per thread: the supervisor spawns from one
            for children in glob.glob(f"/proc/{current}/task/*/children"):
                try:
                    with open(children) as f:
                        queue += [int(child) for child in f.read().split()]
                except OSError:
                    pass
    return pids


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process (with :data:`TREE`, its tree) has used."""
    total = 0.0
    for each in _pids(pid):
        try:
            with open(f"/proc/{each}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue  # ended meanwhile
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def server_rss(pid: int) -> int:
    """Resident set size in bytes (with :data:`TREE`, of the whole tree)."""
    total = 0
    for each in _pids(pid):
        try:
            with open(f"/proc/{each}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Window:
    """One measuring window: wall time, our CPU and the server's, read together."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.wall = time.monotonic()
        self.cpu = own_cpu()
        self.server = server_cpu(pid) if pid else 0.0

    def close(self) -> dict[str, float]:
        wall = time.monotonic() - self.wall
        result = {"seconds": wall, "generator_busy": (own_cpu() - self.cpu) / wall}
        if self.pid:
            result["server_cpu"] = (server_cpu(self.pid) - self.server) / wall
        return result


# -- the wire ----------------------------------------------------------------------------


class Wire:
    """How one ``--proto`` encodes requests and reads what comes back."""

    def __init__(self, proto: str, version: int = 1) -> None:
        self.proto = proto
        self.gateway = proto != "echo"
        self.binary = proto == "msgpack"
        self.kind = WSMsgType.BINARY if self.binary else WSMsgType.TEXT
        self.version = version
        subprotocol = f"wsgate.v{version}.{proto}"
        self.headers = {"Sec-WebSocket-Protocol": subprotocol} if self.gateway else {}
        # Version 2's deliveries (docs/protocol.md §14), counted without decoding: the
        # head of every pub starts with its type.
        self.pub_mark = b"\xa4type\xa3pub" if self.binary else b'{"type":"pub"'
        if proto == "json":
            self.template = '{"type":"msg","seq":%d,"ack":%d,"event":"%s","data":"' + PAYLOAD + '"}'
            self.decode: Callable[[bytes], Any] = json.loads
            self.encode: Callable[[Any], bytes] = lambda value: json.dumps(
                value, separators=(",", ":")
            ).encode()
        else:
            self.decode = msgpack.unpackb
            self.encode = msgpack.packb

    def request(self, seq: int, ack: int, event: str = "echo") -> bytes:
        if self.proto == "json":
            return (self.template % (seq, ack, event)).encode()
        return msgpack.packb(
            {"type": "msg", "seq": seq, "ack": ack, "event": event, "data": PAYLOAD}
        )

    def last_seq(self, payload: bytes) -> int:
        """The ``seq`` of the last envelope in a message, without decoding it (0: none)."""
        if self.proto == "json":
            at = payload.rfind(b'"seq":')
            if at < 0:
                return 0
            start = end = at + 6
            while payload[end] in b"0123456789":
                end += 1
            return int(payload[start:end])
        at = payload.rfind(b"\xa3seq")
        if at < 0:
            return 0
        head = payload[at + 4]
        if head < 0x80:
            return head
        size = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}[head]
        return int.from_bytes(payload[at + 5 : at + 5 + size], "big")


def envelopes(value: Any) -> list[dict[str, Any]]:
    return value if isinstance(value, list) else [value]


# -- one connection ------------------------------------------------------------------------


class Conn(WSListener):  # type: ignore[misc]
    """One WebSocket connection; what it does with messages is the scenario's."""

    def __init__(self, gen: Generator) -> None:
        super().__init__()
        self.gen = gen
        self.wire = gen.wire
        self.transport: WSTransport | None = None
        self.ready = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.seq = 0  # ours
        self.server_seq = 0  # the last of the server's we processed
        self.acked = 0  # the last of the server's we acknowledged
        self.sent_at: dict[int, float] = {}
        self.sampled = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        if self.wire.gateway:
            transport.send(self.wire.kind, self.wire.encode({"type": "hello"}))
        else:
            self.ready.set_result(None)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.TEXT or kind == WSMsgType.BINARY:
            self.gen.on_message(self, frame.get_payload_as_bytes())
        elif kind == WSMsgType.CLOSE:
            if not transport.is_close_frame_sent:
                transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before ready"))
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.send(self.wire.kind, payload)

    def request(self, event: str = "echo") -> None:
        self.seq += 1
        if self.wire.gateway:
            self.acked = self.server_seq
            self.send(self.wire.request(self.seq, self.server_seq, event))
        else:
            self.send(b"%08d" % self.seq + PAYLOAD.encode())

    def ack(self) -> None:
        if self.server_seq > self.acked:
            self.acked = self.server_seq
            self.send(self.wire.encode({"type": "ack", "ack": self.server_seq}))

    def handle_control(self, envelope: dict[str, Any]) -> None:
        """What every gateway connection does: welcome, pings."""
        kind = envelope["type"]
        if kind == "welcome":
            self.ready.set_result(None)
        elif kind == "ping":
            pong: dict[str, Any] = {"type": "pong"}
            if "ts" in envelope:
                pong["ts"] = envelope["ts"]
            self.send(self.wire.encode(pong))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_close_frame_sent:
            self.transport.send_close(WSCloseCode.OK)


class Generator:
    """A scenario's state: its counts and what it does with each message."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.wire = Wire(args.proto, args.protocol_version)
        self.count = 0
        self.latencies: list[float] = []
        self.running = False

    def on_message(self, conn: Conn, payload: bytes) -> None:
        raise NotImplementedError

    async def connect(self) -> Conn:
        _, conn = await ws_connect(
            lambda: Conn(self),
            self.args.url,
            extra_headers=self.wire.headers,
            read_buffer_init_size=4096,
            websocket_handshake_timeout=30,
        )
        await asyncio.wait_for(conn.ready, 30)
        return conn

    async def connect_many(self, count: int, concurrency: int = 200) -> list[Conn]:
        conns: list[Conn] = []
        left = iter(range(count))

        async def opener() -> None:
            for _ in left:
                conns.append(await self.connect())

        await asyncio.gather(*(opener() for _ in range(min(concurrency, count))))
        return conns


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50_ms": at(0.5), "p99_ms": at(0.99), "p999_ms": at(0.999), "samples": len(values)}


# -- scenarios ------------------------------------------------------------------------------


class RequestReply(Generator):
    """Scenario 1: each connection keeps ``--inflight`` requests in flight; replies counted."""

    def on_message(self, conn: Conn, payload: bytes) -> None:
        wire = self.wire
        if not wire.gateway:
            self.count += 1
            if self.running:
                conn.request()
            return
        for envelope in envelopes(wire.decode(payload)):
            kind = envelope["type"]
            if kind == "reply":
                conn.server_seq = envelope["seq"]
                self.count += 1
                if self.running:
                    conn.request()
            elif kind == "msg":
                conn.server_seq = envelope["seq"]
            elif kind != "ack":
                conn.handle_control(envelope)
        if conn.server_seq - conn.acked >= 64:
            conn.ack()

    async def run(self) -> dict[str, Any]:
        args = self.args
        conns = await self.connect_many(args.connections)
        self.running = True
        for conn in conns:  # warm up, then measure a window
            for _ in range(args.inflight):
                conn.request()
        await asyncio.sleep(args.warmup)
        start, window = self.count, Window(args.server_pid)
        await asyncio.sleep(args.duration)
        result = window.close()
        result["requests_per_s"] = (self.count - start) / result["seconds"]
        self.running = False
        await asyncio.sleep(0.5)
        return result


class Latency(RequestReply):
    """Scenario 2: requests at a fixed total rate over the connections; reply latency."""

    def on_message(self, conn: Conn, payload: bytes) -> None:
        now = time.monotonic()
        wire = self.wire
        if not wire.gateway:
            sent = conn.sent_at.pop(int(payload[:8]), None)
            if sent is not None and self.running:
                self.latencies.append(now - sent)
            return
        for envelope in envelopes(wire.decode(payload)):
            kind = envelope["type"]
            if kind == "reply":
                conn.server_seq = envelope["seq"]
                sent = conn.sent_at.pop(envelope["re"], None)
                if sent is not None and self.running:
                    self.latencies.append(now - sent)
            elif kind == "msg":
                conn.server_seq = envelope["seq"]
            elif kind != "ack":
                conn.handle_control(envelope)

    async def run(self) -> dict[str, Any]:
        args = self.args
        conns = await self.connect_many(args.connections)
        loop = asyncio.get_running_loop()
        turn = 0

        def send() -> None:
            nonlocal turn
            conn = conns[turn % len(conns)]
            turn += 1
            conn.sent_at[conn.seq + 1] = time.monotonic()
            conn.request()

        # Requests evenly spaced, open loop: a thread sleeps between them and hands each
        # to the event loop. uvloop's timers have a resolution of 1 ms, so pacing them
        # from the loop means either bursts of rate/1000 requests at once, which the
        # server then answers one after the other (queueing the figure would measure),
        # or spinning, which kept the generator 99% busy and slowed the server's CPU
        # beside it by a third.
        stop = threading.Event()

        def pace() -> None:
            due = time.monotonic()
            while not stop.is_set():
                due += 1 / args.rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                loop.call_soon_threadsafe(send)

        pacer = threading.Thread(target=pace, daemon=True)
        pacer.start()
        await asyncio.sleep(args.warmup)
        self.running, window, first = True, Window(args.server_pid), turn
        await asyncio.sleep(args.duration)
        stop.set()
        result = window.close()
        result["achieved_rate"] = (turn - first) / result["seconds"]
        await asyncio.sleep(0.2)  # the last replies
        self.running = False
        result.update(percentiles(self.latencies))
        result["rate"] = args.rate
        result["unanswered"] = sum(len(conn.sent_at) for conn in conns)
        return result


class FanOut(Generator):
    """Scenario 3: subscribers of one topic; a publisher keeps ``--outstanding`` publications
    not yet delivered to every subscriber. Deliveries counted, latency from a sample."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.published = 0
        self.room = asyncio.Event()
        self.subscribers = 0
        # --group G: subscribers in topics of G each (bench.0, bench.1...), the
        # publisher going round them; else all of them in one topic, bench.
        self.topics = max(1, args.connections // args.group) if args.group else 0
        self.joined = 0

    @property
    def per_publication(self) -> int:
        """Deliveries each publication makes."""
        return self.subscribers // self.topics if self.topics else self.subscribers

    def on_message(self, conn: Conn, payload: bytes) -> None:
        wire = self.wire
        if conn.sampled or not conn.ready.done() or b"ping" in payload:
            self.decode_all(conn, payload)
        elif wire.version == 2:
            self.count += payload.count(wire.pub_mark)
        elif wire.gateway:
            seq = wire.last_seq(payload)
            if seq > conn.server_seq:
                self.count += seq - conn.server_seq
                conn.server_seq = seq
                if conn.server_seq - conn.acked >= 32:
                    conn.ack()
        else:
            self.count += 1
        if (
            self.published * self.per_publication - self.count
            < self.args.outstanding * self.per_publication
        ):
            self.room.set()

    def decode_all(self, conn: Conn, payload: bytes) -> None:
        now = time.monotonic()
        if not self.wire.gateway:
            self.count += 1
            if self.running:
                self.latencies.append(now - json.loads(payload[1:])["t"])
            return
        for envelope in envelopes(self.wire.decode(payload)):
            kind = envelope["type"]
            if kind == "msg" or kind == "pub":
                if kind == "msg":
                    conn.server_seq = envelope["seq"]
                self.count += 1
                if self.running and conn.sampled:
                    self.latencies.append(now - envelope["data"]["t"])
            elif kind == "reply":
                conn.server_seq = envelope["seq"]
                if envelope.get("re") == 1 and not conn.ready.done():
                    if "error" in envelope:
                        conn.ready.set_exception(RuntimeError(f"sub refused: {envelope}"))
                    else:
                        conn.ready.set_result(None)  # subscribed
            elif kind == "welcome":
                topic = f"bench.{self.joined % self.topics}" if self.topics else "bench"
                self.joined += 1
                conn.send(self.wire.encode({"type": "sub", "seq": 1, "topic": topic}))
                conn.seq = 1
            elif kind != "ack":
                conn.handle_control(envelope)
        if conn.server_seq - conn.acked >= 32:
            conn.ack()

    async def acker(self, conns: list[Conn]) -> None:
        """Acknowledge what is left unacknowledged, well within the protocol's 100 ms."""
        while True:
            await asyncio.sleep(0.05)
            for conn in conns:
                conn.ack()

    async def run(self) -> dict[str, Any]:
        args = self.args
        conns = await self.connect_many(args.connections)
        if not self.wire.gateway:
            for conn in conns:
                conn.send(b"S")
            await asyncio.sleep(0.5)  # the peer has them all subscribed
        for conn in conns[:SAMPLED]:
            conn.sampled = True
        self.subscribers = len(conns)
        self.count = 0
        publisher = await self.connect_publisher()
        acks = asyncio.ensure_future(self.acker([*conns, publisher]))
        start_count = 0
        end = time.monotonic() + args.warmup + args.duration
        window: Window | None = None
        measure_from = time.monotonic() + args.warmup
        while True:
            now = time.monotonic()
            if window is None and now >= measure_from:
                self.running, window, start_count = True, Window(args.server_pid), self.count
            if now >= end:
                break
            if (self.published - args.outstanding) * self.per_publication >= self.count:
                self.room.clear()
                try:
                    await asyncio.wait_for(self.room.wait(), 5)
                except TimeoutError:
                    break  # stalled: the counts say how far it got
                continue
            self.published += 1
            data: dict[str, Any] = {"t": time.monotonic(), "i": self.published}
            if self.topics:
                data["topic"] = f"bench.{self.published % self.topics}"
            if self.wire.gateway:
                publisher.seq += 1
                publisher.acked = publisher.server_seq
                publisher.send(
                    self.wire.encode(
                        {
                            "type": "msg",
                            "seq": publisher.seq,
                            "ack": publisher.server_seq,
                            "event": "publish",
                            "data": data,
                        }
                    )
                )
            else:
                publisher.send(b"P" + json.dumps(data).encode())
            await asyncio.sleep(0)
        assert window is not None
        result = window.close()
        self.running = False
        acks.cancel()
        result["deliveries_per_s"] = (self.count - start_count) / result["seconds"]
        result["subscribers"] = self.subscribers
        result["subscribers_per_topic"] = self.per_publication
        result["publications"] = self.published
        result.update(percentiles(self.latencies))
        return result

    async def connect_publisher(self) -> Conn:
        gen = self

        class Publisher(Generator):
            def on_message(self, conn: Conn, payload: bytes) -> None:
                for envelope in envelopes(gen.wire.decode(payload)) if gen.wire.gateway else []:
                    if envelope["type"] in ("reply", "msg"):
                        conn.server_seq = envelope["seq"]
                    elif envelope["type"] != "ack":
                        conn.handle_control(envelope)

        return await Publisher(self.args).connect()


class Idle(Generator):
    """Scenario 4: open connections, then measure the server's RSS and CPU while idle."""

    def on_message(self, conn: Conn, payload: bytes) -> None:
        self.count += 1
        if self.wire.gateway:
            for envelope in envelopes(self.wire.decode(payload)):
                if envelope["type"] in ("reply", "msg"):
                    conn.server_seq = envelope["seq"]
                elif envelope["type"] != "ack":
                    conn.handle_control(envelope)

    async def run(self) -> dict[str, Any]:
        args = self.args
        pid = args.server_pid
        await asyncio.sleep(1)
        before = server_rss(pid)
        opened = time.monotonic()
        conns = await self.connect_many(args.connections)
        open_seconds = time.monotonic() - opened
        await asyncio.sleep(args.warmup)
        window = Window(pid)
        await asyncio.sleep(args.duration)
        result = window.close()
        after = server_rss(pid)
        result.update(
            connections=len(conns),
            open_seconds=open_seconds,
            rss_before=before,
            rss_after=after,
            kib_per_connection=(after - before) / len(conns) / 1024,
            server_messages=self.count,
            still_open=sum(not conn.closed.done() for conn in conns),
        )
        for conn in conns:
            conn.close()
        return result


class Churn(Generator):
    """Scenario 5: open a connection, say hello, say bye, close; as fast as it goes."""

    def on_message(self, conn: Conn, payload: bytes) -> None:
        for envelope in envelopes(self.wire.decode(payload)):
            conn.handle_control(envelope)

    async def cycle(self) -> None:
        conn = await self.connect()
        if self.wire.gateway:
            conn.send(self.wire.encode({"type": "bye"}))
        conn.close()
        await asyncio.wait_for(conn.closed, 10)
        self.count += 1

    async def run(self) -> dict[str, Any]:
        args = self.args
        end = time.monotonic() + args.duration
        failures = 0

        async def worker() -> None:
            nonlocal failures
            while time.monotonic() < end:
                try:
                    await self.cycle()
                except (OSError, TimeoutError, ConnectionError):
                    failures += 1
                    await asyncio.sleep(0.01)

        window = Window(args.server_pid)
        await asyncio.gather(*(worker() for _ in range(args.connections)))
        result = window.close()
        result.update(cycles=self.count, cycles_per_s=self.count / result["seconds"])
        result["failures"] = failures
        return result


SCENARIOS: dict[str, type[Generator]] = {
    "rr": RequestReply,
    "latency": Latency,
    "fanout": FanOut,
    "idle": Idle,
    "churn": Churn,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--url", required=True)
    parser.add_argument("--proto", choices=["json", "msgpack", "echo"], default="json")
    parser.add_argument(
        "--protocol-version", type=int, choices=[1, 2], default=1, help="the wsgate version"
    )
    parser.add_argument("--server-pid", type=int)
    parser.add_argument(
        "--server-tree", action="store_true", help="measure the server pid's descendants too"
    )
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--rate", type=float, default=5000)
    parser.add_argument("--outstanding", type=int, default=4)
    parser.add_argument("--group", type=int, default=0, help="fan-out: subscribers per topic")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    global TREE
    TREE = args.server_tree
    generator = SCENARIOS[args.scenario](args)
    result = uvloop.run(generator.run())
    result["scenario"] = args.scenario
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    os._exit(0)  # connections left open are the server's to notice, not ours to close


if __name__ == "__main__":
    main()
