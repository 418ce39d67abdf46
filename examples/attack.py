"""The attack battery of issue 18: a live node under each attack, well-behaved clients beside.

The fourteen cases of the issue, examples/hostile.py's run (15) and a reset during the
opening handshake found while building the battery (16); ``--list`` lists them.

    scripts/attack [--quick] [--duration S] [--only 1,4,ping-flood] [--redis]
                   [--write docs/conformance.md]

Each attack gets a fresh node: ``python -m trio_wsgate serve`` on free ports of 127.0.0.1,
with the default flags but for the few it needs (``--allow-subscribe '*'`` always, for the
well-behaved clients; ``--open-api``, or a key in ``WSGATE_API_KEY`` for the attack on
the API; a key in ``WSGATE_JWT_SECRET`` for the attacks on tokens; ``--allow-publish
'*'`` for the publication flood; ``--heartbeat-interval 1`` for the pings before
``hello``). With ``--redis``, the hand-over and the drain get two nodes sharing a
redis-server of the battery's own (on a free port) and one ``WSGATE_SECRET``. The
default ``--resume-ttl`` is kept: a detached session holds no task, so nothing has to
expire before ``wsgate_tasks`` can be compared.

The attack runs for ``--duration`` seconds from up to ``--sockets`` (100) sockets at once
(1000 idle ones for the idle flood) while 50 well-behaved clients (``open_client``, their
sockets bound to 127.0.0.2) make echo requests one after the other and follow a topic
that the battery publishes to through ``/api/publish``. Then, with every socket gone,
the battery checks issue 18's "Done when", for every attack:

- the node lived throughout (its process, sampled every 100 ms), still answers
  ``/healthz``, and exits 0 when drained by SIGTERM at the end;
- its resident memory (VmRSS, sampled every 100 ms) peaked below its idle baseline +
  256 MiB;
- ``wsgate_internal_errors_total`` is 0;
- ``wsgate_tasks`` came back to its idle baseline (polled for up to 30 s);
- every well-behaved request was answered exactly once, with its own data (and, where
  the attackers run no handler themselves, the node's count of handler runs equals the
  requests made), and no publication was lost or doubled (by offset);

and what the attack itself must get (a 401, a 1007, no ping before ``welcome``...). It
prints a table, per attack and overall, and exits 1 if anything failed. Every loop is
bounded in count and in time, everything talks to 127.0.0.0/8 only, and every process it
starts is killed when it ends, however it ends (on Linux even by SIGKILL).

One trio process runs the attackers and the well-behaved clients. Measured on 2 cores,
it takes 40% to 100% of one core during an attack and the node the rest (each attack's
"CPU" line): a second battery process would only take CPU from the node.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import hashlib
import hmac
import itertools
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import msgpack
import trio

from trio_wsgate import Client, ClientClosed, HandlerError, SessionLost, open_client
from trio_wsgate.exceptions import WsgateError
from trio_wsgate.protocol.codecs import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL
from trio_wsgate.testing import Closed, FaultProxy, RawClient, Refused, free_port

try:
    from examples.hostile import Node, attack_node, child_command
except ModuleNotFoundError:  # ``python examples/attack.py``: the project root is not on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from examples.hostile import Node, attack_node, child_command

ROOT = Path(__file__).resolve().parent.parent
RSS_BOUND_MIB = 256.0
TOPIC = "bystanders"  # the well-behaved clients' topic; attackers never touch it
BYSTANDER_ADDRESS = "127.0.0.2"
SETTLE_SECONDS = 30.0  # how long connections and tasks get to go back down
REQUEST_TIMEOUT = 30.0  # a well-behaved request unanswered this long counts as failed
MAX_ROUNDS = 100_000  # of any loop, whatever the clock says
ECHO_FLOOD_AT_ONCE = 1000  # attack 5's requests sent and not yet dropped, all sockets
# Whatever a hostile socket can meet: the node hung up, refused, or answered garbage.
PEER_ERRORS = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    Closed,
    Refused,
    WsgateError,
)
UPGRADE = (
    b"GET /ws HTTP/1.1\r\n"
    b"Host: 127.0.0.1\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"\r\n"
)


# -- processes ------------------------------------------------------------------------


def read_cpu_seconds(pid: int) -> float:
    """User and system CPU time of the process so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def read_rss_mib(pid: int) -> float | None:
    """The process's VmRSS in MiB; None once it is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _short_paths(line: str) -> str:
    """A traceback line with the project's, the venv's and Python's prefixes cut."""
    paths = sysconfig.get_paths()
    for prefix in (paths["purelib"], paths["stdlib"], str(ROOT)):
        line = line.replace(prefix + os.sep, "")
    return line


def revision() -> str:
    """The commit measured, and whether the package had uncommitted changes (read-only)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "trio_wsgate"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "an unknown revision"
    return (
        f"{head or 'an unknown revision'}{' with local changes to trio_wsgate/' if dirty else ''}"
    )


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")
_ERROR_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (ERROR|CRITICAL) ")


class BatteryNode(Node):
    """A node under attack (examples/hostile.py's), with what the battery asks of it."""

    def __init__(self, flags: list[str], env: dict[str, str]) -> None:
        super().__init__(flags, env)
        self.baseline: dict[str, float] = {}
        self.baseline_series: set[tuple[tuple[str, str], ...]] = set()
        self.final: dict[str, float] = {}
        self.sampler = RssSampler(self.process.pid)
        #: Drained on purpose during the attack (the drain case): no "after" figures.
        self.drained_early = False
        self.exit_code: int | None = None
        self._cpu = 0.0

    def cpu_seconds(self) -> float:
        """CPU time so far (the last reading, once the process is gone)."""
        if self.process.poll() is None:
            self._cpu = max(self._cpu, read_cpu_seconds(self.process.pid))
        return self._cpu

    async def scrape(self) -> Metrics | None:
        """/metrics of the admin port, parsed; None if the node does not answer."""
        try:
            status, body = await http(self.admin_port, "GET", "/metrics")
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, ValueError):
            return None
        return Metrics(body.decode()) if status == 200 else None

    async def value(self, name: str, **labels: str) -> float | None:
        metrics = await self.scrape()
        return None if metrics is None else metrics.value(name, **labels)

    async def answers(self) -> bool:
        """/healthz answers 200 on both ports."""
        try:
            for port in (self.admin_port, self.port):
                status, _ = await http(port, "GET", "/healthz", timeout=5)
                if status != 200:
                    return False
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, ValueError):
            return False
        return True

    async def drain(self, timeout: float = 25.0) -> int | None:
        """SIGTERM, and the exit code within ``timeout`` (None: it had to be killed)."""
        self.cpu_seconds()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await trio.to_thread.run_sync(self.process.wait, timeout)
        code = self.process.poll()
        if code is None:
            self.stop()
        self.exit_code = code
        return code

    def errors_logged(self, most: int = 3) -> list[str]:
        """The node's first ``most`` ERROR lines, each with the end of its traceback
        (the first one's last frames, the others' exception)."""
        found: list[str] = []
        errors = [i for i, line in enumerate(self.log) if _ERROR_LINE.match(line)]
        for number, index in enumerate(errors[:most]):
            end = index + 1
            while end < len(self.log) and not _LOG_LINE.match(self.log[end]):
                end += 1
            found.append(self.log[index].rstrip())
            tail = self.log[max(index + 1, end - (8 if number == 0 else 1)) : end]
            found.extend("  " + _short_paths(line.rstrip()) for line in tail if line.strip())
        if len(errors) > most:
            found.append(f"... and {len(errors) - most} more")
        return found

    def save_log(self, path: Path) -> None:
        path.write_text("".join(self.log))


class RssSampler:
    """VmRSS every 100 ms from a thread: the peak, and whether the process died."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = 0.0
        self.peak = 0.0
        self.died = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.baseline = self.peak = read_rss_mib(self.pid) or 0.0
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            rss = read_rss_mib(self.pid)
            if rss is None:
                self.died = not self._stop.is_set()
                return
            self.peak = max(self.peak, rss)

    @property
    def growth(self) -> float:
        return self.peak - self.baseline


class RedisServer:
    """A redis-server of the battery's own on a free port (as tests/redis_server.py)."""

    def __init__(self, binary: str) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            child_command(
                *(binary, "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no"),
            ),
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
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def flush(self) -> None:
        """Forget the previous attack's keys (each attack starts from nothing)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            sock.recv(16)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


# -- HTTP and metrics -----------------------------------------------------------------


async def http(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    """One HTTP/1.1 request to 127.0.0.1 (``Connection: close``): status and body."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    head += f"Content-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    chunks: list[bytes] = []
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            await stream.send_all(head.encode() + b"\r\n" + body)
            for _ in range(MAX_ROUNDS):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            await trio.aclose_forcefully(stream)
    raw = b"".join(chunks)
    head_bytes, _, content = raw.partition(b"\r\n\r\n")
    status_line = head_bytes.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/"):
        raise ValueError(f"not an HTTP answer: {raw[:40]!r}")
    if b"transfer-encoding: chunked" in head_bytes.lower():
        content = _dechunk(content)
    return int(status_line[1]), content


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class Metrics:
    """A scrape of /metrics: samples by name and labels."""

    def __init__(self, text: str) -> None:
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            match = _SAMPLE.match(line)
            if match:
                labels = dict(_LABEL.findall(match.group(2) or ""))
                self.samples.append((match.group(1), labels, float(match.group(3))))

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels``."""
        return sum(
            value
            for sample, have, value in self.samples
            if sample == name and all(have.get(k) == v for k, v in labels.items())
        )

    def series(self, name: str) -> set[tuple[tuple[str, str], ...]]:
        return {tuple(sorted(have.items())) for sample, have, _ in self.samples if sample == name}


# -- tokens ---------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_token(secret: str, claims: str) -> str:
    """An HS256 token correctly signed with ``secret`` whose claims are this JSON text,
    as given: NaN and 1e400 included, which no JSON encoder emits."""
    signing_input = _b64(b'{"alg":"HS256","typ":"JWT"}') + "." + _b64(claims.encode())
    mac = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(mac)


# -- sockets --------------------------------------------------------------------------


async def connect_from(address: str, port: int) -> trio.SocketStream:
    """TCP to 127.0.0.1:port from ``address`` (another loopback address)."""
    sock = trio.socket.socket()
    try:
        await sock.bind((address, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def set_reset(stream: trio.abc.Stream) -> None:
    """Make the next close of a socket stream a reset (RST) instead of a FIN."""
    if isinstance(stream, trio.SocketStream):
        with contextlib.suppress(OSError):
            linger = struct.pack("ii", 1, 0)
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)


@contextlib.asynccontextmanager
async def websocket(
    port: int,
    *,
    subprotocol: str = JSON_SUBPROTOCOL,
    path: str = "/ws",
    headers: dict[str, str] | None = None,
    address: str | None = None,
    reset: bool = False,
) -> AsyncIterator[RawClient]:
    """A RawClient after its opening handshake; closed without ceremony on the way out
    (a FIN, or a RST with ``reset`` or when unread data is left)."""
    if address is None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    else:
        stream = await connect_from(address, port)
    try:
        client = await RawClient.connect(
            stream, path=path, subprotocols=(subprotocol,), headers=headers
        )
        yield client
    finally:
        if reset:
            set_reset(stream)
        await trio.aclose_forcefully(stream)


def resume_of(welcome: dict[str, Any], ack: int = 0) -> dict[str, Any]:
    return {"session": welcome["session"], "token": welcome["resume_token"], "ack": ack}


def msg(seq: int, data: Any, event: str = "echo", ack: int | None = None) -> dict[str, Any]:
    envelope = {"type": "msg", "seq": seq, "event": event, "data": data}
    if ack is not None:
        envelope["ack"] = ack
    return envelope


async def recv_for(client: RawClient, seconds: float) -> tuple[list[dict[str, Any]], int | None]:
    """Everything the server sends for ``seconds``, and its close code if it closed."""
    received: list[dict[str, Any]] = []
    with trio.move_on_after(seconds):
        try:
            for _ in range(MAX_ROUNDS):
                received.append(await client.recv())
        except Closed as exc:
            return received, exc.code
    return received, None


# -- the run's shape ------------------------------------------------------------------


@dataclass
class Options:
    duration: float = 15.0
    sockets: int = 100
    bystanders: int = 50
    idle_sockets: int = 1000
    pause: float = 0.02
    publish_interval: float = 0.05
    seed: int = 18
    quick: bool = False
    logs: Path | None = None


@dataclass
class Published:
    """What the battery published to the bystanders' topic through /api/publish."""

    offsets: list[int] = field(default_factory=list)
    epochs: set[str] = field(default_factory=set)
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    finished: trio.Event = field(default_factory=trio.Event)

    @property
    def last(self) -> int:
        return max(self.offsets, default=0)


@dataclass
class Figures:
    """The well-behaved clients' account of an attack."""

    clients: int = 0
    ready: int = 0
    requests: int = 0
    answered: int = 0
    wrong: int = 0  # answered with data not their own
    duplicated: int = 0  # answered a second time
    failed: int = 0  # raised or timed out
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)
    expected: int = 0  # publications the clients should have had, summed
    received: int = 0
    lost: int = 0
    doubled: int = 0
    other_epoch: int = 0
    connects: int = 0
    resumes: int = 0
    resumed_clients: int = 0
    sessions_lost: int = 0

    @property
    def once(self) -> int:
        return self.answered - self.wrong - self.duplicated

    @property
    def p99_ms(self) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000

    @property
    def ok(self) -> bool:
        return (
            self.clients > 0
            and self.ready == self.clients
            and self.requests > 0
            and self.failed == 0
            and self.once == self.requests
            and self.expected > 0
            and self.lost == 0
            and self.doubled == 0
            and self.other_epoch == 0
        )


@dataclass
class Ctx:
    """What an attack gets: its nodes, its clock, and where to put what it saw."""

    options: Options
    nodes: list[BatteryNode]
    rng: random.Random
    jwt_secret: str | None = None
    api_key: str | None = None
    #: Where the well-behaved clients connect and the battery publishes (the drain
    #: case moves them to the second node).
    target: list[int] = field(default_factory=list)
    admin: list[int] = field(default_factory=list)
    deadline: float = 0.0
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Echo requests of the attack's own answered (each ran exactly once), and sent
    #: but unanswered (each ran once or not at all).
    extra_echoes: int = 0
    uncertain_echoes: int = 0
    figures: Figures = field(default_factory=Figures)

    @property
    def node(self) -> BatteryNode:
        return self.nodes[0]

    @property
    def port(self) -> int:
        return self.nodes[0].port

    @property
    def sockets(self) -> int:
        return self.options.sockets

    def remaining(self) -> float:
        return self.deadline - trio.current_time()

    def require(self, ok: bool, failure: str) -> None:
        if not ok:
            self.failures.append(failure)

    def require_no_unexpected(self) -> None:
        """Fail if any answer was counted as ``UNEXPECTED ...`` (the first five say which)."""
        unexpected = {k: n for k, n in self.counts.items() if k.startswith("UNEXPECTED")}
        self.require(not unexpected, f"unexpected answers: {dict(list(unexpected.items())[:5])}")

    def token(self, user: str, **claims: Any) -> str | None:
        if self.jwt_secret is None:
            return None
        payload = {"sub": user, "exp": int(time.time()) + 3600, **claims}
        return jwt.encode(payload, self.jwt_secret, algorithm="HS256")

    async def echo(
        self, client: RawClient, seq: int, data: Any, *before: dict[str, Any]
    ) -> dict[str, Any]:
        """An echo request of the attack's own and its reply, counted for the check of
        handler runs. The exchange is shielded from the attack's deadline (for at most
        5 s): cut short, it would leave a run that is counted nowhere."""
        self.uncertain_echoes += 1
        with trio.CancelScope(shield=True), trio.fail_after(5):
            await client.send(*before, msg(seq, data))
            reply = await client.recv_type("reply")
        self.uncertain_echoes -= 1
        self.extra_echoes += 1
        return reply

    def api_headers(self) -> dict[str, str]:
        return {"Authorization": f"apikey {self.api_key}"} if self.api_key else {}

    def count_ending(self, exc: BaseException) -> None:
        if isinstance(exc, Closed):
            self.counts[f"ended: closed {exc.code}"] += 1
        elif isinstance(exc, Refused):
            self.counts[f"ended: refused with HTTP {exc.status}"] += 1
        elif isinstance(exc, OSError | trio.BrokenResourceError | trio.ClosedResourceError):
            self.counts["ended: connection broken"] += 1
        else:
            self.counts[f"ended: {type(exc).__name__}"] += 1


async def swarm(
    ctx: Ctx,
    body: Callable[[random.Random, int], Awaitable[None]],
    workers: int | None = None,
    until: float | None = None,
) -> None:
    """``workers`` sockets at once (default ``--sockets``), each running ``body(rng,
    worker)`` over and over until ``until`` (default the attack's deadline)."""
    deadline = ctx.deadline if until is None else until

    async def worker(index: int, seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(MAX_ROUNDS):
            if trio.current_time() >= deadline:
                return
            try:
                await body(rng, index)
            except PEER_ERRORS as exc:
                ctx.count_ending(exc)

    with trio.move_on_at(deadline):
        async with trio.open_nursery() as nursery:
            for index in range(ctx.sockets if workers is None else workers):
                nursery.start_soon(worker, index, ctx.rng.randrange(2**32))


# -- the well-behaved clients ---------------------------------------------------------


async def bystander(
    ctx: Ctx,
    index: int,
    published: Published,
    ready: Callable[[], None],
    stop: trio.Event,
) -> None:
    """One well-behaved client: echo requests one after the other, and the topic."""
    figures = ctx.figures
    figures.clients += 1

    async def connect() -> trio.abc.Stream:
        return await connect_from(BYSTANDER_ADDRESS, ctx.target[0])

    url = f"ws://127.0.0.1:{ctx.target[0]}/ws"
    received: collections.Counter[int] = collections.Counter()
    answered: set[int] = set()
    token = ctx.token(f"bystander-{index}")
    async with open_client(url, connect=connect, token=token, seed=index) as client:
        try:
            with trio.fail_after(30):
                await client.wait_connected()
                start = (await client.subscribe(TOPIC))["offset"]
        except (trio.TooSlowError, ClientClosed, HandlerError, SessionLost) as exc:
            figures.errors[f"could not start: {exc!r}"] += 1
            ready()
            return
        figures.ready += 1
        ready()

        caught_up = trio.Event()  # every publication is in, once the publisher is done

        def check_caught_up() -> None:
            if published.finished.is_set() and max(received, default=start) >= published.last:
                caught_up.set()

        async def follow() -> None:
            try:
                async for message in client.messages():
                    if message.topic == TOPIC and message.offset is not None:
                        received[message.offset] += 1
                        if published.epochs and message.epoch not in published.epochs:
                            figures.other_epoch += 1
                        check_caught_up()
            except ClientClosed:
                pass
            finally:
                caught_up.set()  # nothing more will come

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            for n in range(1, MAX_ROUNDS):
                if stop.is_set():
                    break
                figures.requests += 1
                sent = trio.current_time()
                try:
                    with trio.fail_after(REQUEST_TIMEOUT):
                        data = await client.request("echo", {"c": index, "n": n})
                except (HandlerError, SessionLost, trio.TooSlowError) as exc:
                    figures.failed += 1
                    figures.errors[repr(exc)[:80]] += 1
                    continue
                except ClientClosed as exc:
                    figures.failed += 1
                    figures.errors[repr(exc)[:80]] += 1
                    break
                figures.latencies.append(trio.current_time() - sent)
                figures.answered += 1
                if data != {"c": index, "n": n}:
                    figures.wrong += 1
                elif n in answered:
                    figures.duplicated += 1
                else:
                    answered.add(n)
                await trio.sleep(ctx.options.pause)
            # Everything published must arrive, then the client leaves (bye).
            with trio.move_on_after(15):
                await published.finished.wait()
                check_caught_up()
                await caught_up.wait()
            nursery.cancel_scope.cancel()
        statistics = client.statistics()
    expected = {offset for offset in published.offsets if offset > start}
    figures.expected += len(expected)
    figures.received += sum(received.values())
    figures.lost += len(expected - received.keys())
    figures.doubled += sum(count - 1 for count in received.values())
    figures.connects += statistics.connects
    figures.resumes += statistics.resumes
    figures.resumed_clients += statistics.resumes > 0
    figures.sessions_lost += statistics.sessions_lost


async def publisher(ctx: Ctx, published: Published, stop: trio.Event) -> None:
    """Publish to the bystanders' topic through the HTTP API until ``stop``."""
    try:
        for n in range(1, MAX_ROUNDS):
            if stop.is_set():
                break
            body = json.dumps({"topic": TOPIC, "event": "tick", "data": {"n": n}}).encode()
            try:
                status, answer = await http(
                    ctx.admin[0], "POST", "/api/publish", body, ctx.api_headers()
                )
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, ValueError) as exc:
                published.refused[type(exc).__name__] += 1
            else:
                if status == 200:
                    result = json.loads(answer)
                    published.offsets.append(result["offset"])
                    published.epochs.add(result["epoch"])
                else:
                    published.refused[f"HTTP {status}"] += 1
            await trio.sleep(ctx.options.publish_interval)
    finally:
        published.finished.set()


async def warm_up(ctx: Ctx, node: BatteryNode) -> None:
    """What an idle node does once before its baseline: a request, a subscription, a
    publication received, a session dropped and resumed, a clean end."""
    url = f"ws://127.0.0.1:{node.port}/ws"

    async def connect() -> trio.abc.Stream:
        return await connect_from(BYSTANDER_ADDRESS, node.port)

    with trio.fail_after(30):
        async with open_client(url, connect=connect, token=ctx.token("warm-up")) as client:
            await client.wait_connected()
            await client.request("echo", "warm-up")
            await client.subscribe(TOPIC)
            body = json.dumps({"topic": TOPIC, "data": "warm-up"}).encode()
            await http(node.admin_port, "POST", "/api/publish", body, ctx.api_headers())
            async for _ in client.messages():
                break
        async with websocket(node.port, address=BYSTANDER_ADDRESS, reset=True) as raw:
            welcome = await raw.hello(token=ctx.token("warm-up"))
        async with websocket(node.port, address=BYSTANDER_ADDRESS) as raw:
            await raw.hello(token=ctx.token("warm-up"), resume=resume_of(welcome))
            await raw.send({"type": "bye"})
            await raw.wait_closed()
    await settle(node, "wsgate_connections_open", 0, 10)


async def settle(node: BatteryNode, name: str, at_most: float, seconds: float) -> float | None:
    """Poll a gauge until it is at most ``at_most`` or ``seconds`` pass; its last value."""
    value = await node.value(name)
    with trio.move_on_after(seconds):
        while value is not None and value > at_most:
            await trio.sleep(0.2)
            value = await node.value(name)
    return value


# -- the attacks ----------------------------------------------------------------------


async def attack_admin_upgrade(ctx: Ctx) -> None:
    """1. A WebSocket upgrade to the ADMIN port followed by one byte more, or a NUL
    (and, a quarter of the time, the same to the WebSocket port)."""

    async def body(rng: random.Random, worker: int) -> None:
        admin = rng.random() < 0.75
        extra = rng.choice([b"x", b"\0", b"\0\0\0", b"x" * rng.randint(2, 100)])
        stream = await trio.open_tcp_stream("127.0.0.1", ctx.node.admin_port if admin else ctx.port)
        try:
            await stream.send_all(UPGRADE + extra)
            answer = b""
            with trio.move_on_after(3):
                answer = await stream.receive_some(4096)
            status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "none"
            ctx.counts[f"{'admin' if admin else 'websocket'} port answered {status}"] += 1
        finally:
            if rng.random() < 0.3:
                set_reset(stream)
            await trio.aclose_forcefully(stream)

    await swarm(ctx, body)
    ctx.require(sum(ctx.counts.values()) > 0, "no upgrade was sent")


async def _two_to_the_64(
    ctx: Ctx, rng: random.Random, first: BatteryNode, second: BatteryNode
) -> None:
    """Echo with data 2**64 (never acked) on ``first``, then resume on ``second``."""
    async with websocket(first.port) as client:
        welcome = await client.hello()
        count = rng.randint(1, 20)
        for seq in range(1, count + 1):
            await client.send(msg(seq, "v" * 1000))  # never acknowledged
        payload = b'{"type":"msg","seq":%d,"event":"echo","data":18446744073709551616}'
        await client.send_raw(payload % (count + 1), binary=False)
        with trio.fail_after(10):
            code, _ = await client.wait_closed()
    ctx.counts[f"2**64: closed {code}"] += 1
    async with websocket(second.port) as client:
        again = await client.hello(resume=resume_of(welcome))
        ctx.counts[f"2**64, then resumed on the other node: resumed {again['resumed']}"] += 1
        await client.send({"type": "bye"})
        with trio.fail_after(10):
            await client.wait_closed()


async def _fill(client: RawClient, count: int, size: int) -> None:
    """``count`` echo requests of ``size`` bytes, their replies read and never acked."""
    for seq in range(1, count + 1):
        await client.send(msg(seq, "h" * size))
    for _ in range(count):
        await client.recv_type("reply")


async def _hand_over(ctx: Ctx, rng: random.Random, first: BatteryNode, second: BatteryNode) -> None:
    """Replies never acked on ``first``, then a resume on ``second`` (first still open)."""
    count = rng.randint(1, 60)
    async with websocket(first.port) as old:
        welcome = await old.hello()
        await _fill(old, count, rng.randint(10, 2000))
        async with websocket(second.port) as new:
            again = await new.hello(resume=resume_of(welcome))
            ctx.counts[f"hand-over: resumed {again['resumed']}"] += 1
            if again["resumed"]:
                with trio.fail_after(10):
                    resent = [(await new.recv_type("reply"))["re"] for _ in range(count)]
                ctx.counts["hand-over: replies resent in order"] += resent == list(
                    range(1, count + 1)
                )
            with trio.move_on_after(5):
                code, _ = await old.wait_closed()
                ctx.counts[f"hand-over: the old connection closed {code}"] += 1
            if rng.random() < 0.5:
                await new.send({"type": "bye"})
                with trio.move_on_after(5):
                    await new.wait_closed()
            else:
                set_reset(new.stream)  # left detached on ``second``


async def attack_redis(ctx: Ctx) -> None:
    """2. 2**64 then a resume on the other node; hand-overs; a drain that parks."""
    first, second = ctx.nodes
    half = trio.current_time() + ctx.options.duration / 2

    async def both(rng: random.Random, worker: int) -> None:
        a, b = (first, second) if rng.random() < 0.5 else (second, first)
        if rng.random() < 0.4:
            await _two_to_the_64(ctx, rng, a, b)
        else:
            await _hand_over(ctx, rng, a, b)

    await swarm(ctx, both, workers=max(2, ctx.sockets // 4), until=half)

    # Sessions detached on the first node when it drains: it parks them in Redis.
    parked: list[tuple[dict[str, Any], int]] = []

    async def park(rng: random.Random) -> None:
        count = rng.randint(1, 30)
        async with websocket(first.port, reset=True) as client:
            welcome = await client.hello()
            await _fill(client, count, 500)
        parked.append((welcome, count))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(max(5, ctx.sockets // 5)):
                nursery.start_soon(park, random.Random(ctx.rng.random()))
    first_errors = await first.value("wsgate_internal_errors_total")
    first.final["wsgate_internal_errors_total"] = first_errors or 0
    ctx.target[0], ctx.admin[0] = second.port, second.admin_port
    first.sampler.stop()
    first.drained_early = True
    started = trio.current_time()
    code = await first.drain()
    ctx.notes.append(
        f"first node drained by SIGTERM in {trio.current_time() - started:.1f} s, exit {code}"
    )
    ctx.require(code == 0, f"the drained node exited {code}")
    resumed = 0
    for welcome, count in parked:
        with contextlib.suppress(*PEER_ERRORS):
            async with websocket(second.port) as client:
                again = await client.hello(resume=resume_of(welcome))
                with trio.fail_after(10):
                    replies = [await client.recv_type("reply") for _ in range(count)]
                resumed += again["resumed"] and len(replies) == count
                await client.send({"type": "bye"})
                with trio.move_on_after(5):
                    await client.wait_closed()
    ctx.counts["parked sessions"] += len(parked)
    ctx.counts["parked sessions resumed on the other node, replies and all"] += resumed
    ctx.require(resumed == len(parked), f"{resumed} of {len(parked)} parked sessions resumed")

    async def alone(rng: random.Random, worker: int) -> None:
        if rng.random() < 0.4:
            await _two_to_the_64(ctx, rng, second, second)
        else:
            await _hand_over(ctx, rng, second, second)

    await swarm(ctx, alone, workers=max(2, ctx.sockets // 4))
    bad = sum(n for k, n in ctx.counts.items() if k.startswith("2**64: closed") and "1007" not in k)
    ctx.require(bad == 0, f"{bad} echos of 2**64 not closed with 1007")
    refused = ctx.counts["hand-over: resumed False"]
    ctx.require(refused == 0, f"{refused} hand-overs not resumed")


async def attack_jwt_times(ctx: Ctx) -> None:
    """3. Correctly signed tokens whose exp is NaN or 1e400: 401, or 4001."""
    assert ctx.jwt_secret is not None
    bad_claims = [("exp", "NaN"), ("exp", "1e400"), ("exp", "-Infinity"), ("nbf", "NaN")]
    bad_claims += [("iat", "1e400")]
    tokens = [
        (f"{name}={value}", forged_token(ctx.jwt_secret, f'{{"sub":"mallory","{name}":{value}}}'))
        for name, value in bad_claims
    ]

    async def body(rng: random.Random, worker: int) -> None:
        claim, bad = rng.choice(tokens)
        where = rng.choice(["header", "query", "hello", "refresh"])
        try:
            if where == "header":
                headers = {"Authorization": f"Bearer {bad}"}
                async with websocket(ctx.port, headers=headers) as client:
                    await client.hello()
            elif where == "query":
                async with websocket(ctx.port, path=f"/ws?token={bad}") as client:
                    await client.hello()
            elif where == "hello":
                async with websocket(ctx.port) as client:
                    await client.send({"type": "hello", "token": bad})
                    with trio.fail_after(10):
                        code, _ = await client.wait_closed()
                    raise Closed(code, "")
            else:
                async with websocket(ctx.port) as client:
                    await client.hello(token=ctx.token("mallory"))
                    await client.send({"type": "refresh", "token": bad})
                    with trio.fail_after(10):
                        code, _ = await client.wait_closed()
                    raise Closed(code, "")
            outcome = "accepted"
        except Refused as exc:
            outcome = f"HTTP {exc.status}"
        except Closed as exc:
            outcome = f"close {exc.code}"
        expected = "HTTP 401" if where in ("header", "query") else "close 4001"
        ctx.counts[f"{where}: {outcome}"] += 1
        if outcome != expected:
            ctx.counts[f"UNEXPECTED {where} {claim}: {outcome}"] += 1

    await swarm(ctx, body)
    ctx.require_no_unexpected()


# Empty-payload pings would do; 125 bytes (the most a ping may carry) make the node
# answer with as much as it can. A zero mask leaves the payload as it is.
_PING = b"\x89\xfd" + b"\0\0\0\0" + b"p" * 125
_PINGS = _PING * 500  # 65.5 KB per write


async def attack_ping_flood(ctx: Ctx) -> None:
    """4. WebSocket pings as fast as the socket takes them, never reading, some before
    hello; each socket for the whole attack (reopened when the node closes it)."""

    async def body(rng: random.Random, worker: int) -> None:
        async with websocket(ctx.port, reset=True) as client:
            if rng.random() < 0.5:
                await client.send({"type": "hello"})
            for _ in range(MAX_ROUNDS):
                await client.stream.send_all(_PINGS)
                ctx.counts["ping frames sent"] += 500

    await swarm(ctx, body)


async def attack_echo_flood(ctx: Ctx) -> None:
    """5. Echo requests of 63 KB never read, ~1000 at a time over the sockets (up to 255
    per socket: the window is 256), each socket's held a while, then dropped."""
    big = b"e" * 63_000
    in_flight = trio.Semaphore(ECHO_FLOOD_AT_ONCE)

    async def body(rng: random.Random, worker: int) -> None:
        count = 255 if rng.random() < 0.1 else rng.randint(5, 16)
        taken = 0
        try:
            async with websocket(ctx.port, reset=rng.random() < 0.5) as client:
                await client.hello()
                with trio.move_on_after(rng.uniform(1, 4)):
                    for seq in range(1, count + 1):
                        await in_flight.acquire()
                        taken += 1
                        payload = b'{"type":"msg","seq":%d,"event":"echo","data":"%s"}' % (
                            seq,
                            big,
                        )
                        await client.send_raw(payload, binary=False)
                        ctx.counts["63 KB echos sent"] += 1
                    await trio.sleep_forever()  # never read
        finally:
            for _ in range(taken):
                in_flight.release()

    await swarm(ctx, body)


def _value(rng: random.Random, depth: int = 0) -> Any:
    """A value inside the domain (docs/protocol.md, "Values"), of every kind."""
    kind = rng.randrange(9 if depth < 20 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randint(-(2**53 - 1), 2**53 - 1)
    if kind == 3:
        return rng.choice([0.1, -2.5e-300, 1.7976931348623157e308, rng.uniform(-1e9, 1e9)])
    if kind in (4, 5):
        return "".join(rng.choice('aé€😀\u0000"\\/\n') for _ in range(rng.randint(0, 40)))
    if kind in (6, 7):
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {f"k{i}é": _value(rng, depth + 1) for i in range(rng.randint(0, 3))}


async def attack_resume_encoding(ctx: Ctx) -> None:
    """6. A session filled with replies never acked, resumed in the other encoding."""

    async def body(rng: random.Random, worker: int) -> None:
        first, second = JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL
        if rng.random() < 0.5:
            first, second = second, first
        count = rng.randint(50, 255)
        values = {seq: _value(rng) for seq in range(1, count + 1)}
        take_over = rng.random() < 0.3
        async with contextlib.AsyncExitStack() as stack:
            old = await stack.enter_async_context(
                websocket(ctx.port, subprotocol=first, reset=True)
            )
            welcome = await old.hello()
            for seq in range(1, count + 1):
                await old.send(msg(seq, values[seq]))
            for _ in range(count):
                await old.recv_type("reply")
            if not take_over:
                await stack.aclose()  # dropped with a RST
            async with websocket(ctx.port, subprotocol=second) as new:
                again = await new.hello(resume=resume_of(welcome))
                ctx.counts[f"{first[9:]} -> {second[9:]}: resumed {again['resumed']}"] += 1
                if not again["resumed"]:
                    return
                with trio.fail_after(10):
                    replies = [await new.recv_type("reply") for _ in range(count)]
                same = all(reply.get("data") == values[reply["re"]] for reply in replies)
                ctx.counts["replies re-encoded intact" if same else "REPLIES CHANGED"] += 1
                if rng.random() < 0.5:
                    await new.send({"type": "bye", "ack": replies[-1]["seq"]})
                    with trio.move_on_after(5):
                        await new.wait_closed()

    await swarm(ctx, body)
    not_resumed = sum(n for k, n in ctx.counts.items() if k.endswith("resumed False"))
    ctx.require(not_resumed == 0, f"{not_resumed} resumes in the other encoding refused")
    ctx.require(ctx.counts["REPLIES CHANGED"] == 0, "replies changed by the re-encoding")


async def attack_publish_flood(ctx: Ctx) -> None:
    """7. ``pub`` of 60 KB payloads to many distinct topics (``--allow-publish '*'``)."""
    big = b"p" * 60_000
    topic_numbers = itertools.count()

    async def body(rng: random.Random, worker: int) -> None:
        async with websocket(ctx.port, reset=rng.random() < 0.5) as client:
            await client.hello()
            seq = acked = 0
            for _ in range(MAX_ROUNDS):
                batch = []
                for _ in range(10):
                    seq += 1
                    topic = f"flood-{next(topic_numbers)}" if rng.random() < 0.8 else "flood"
                    batch.append(seq)
                    payload = b'{"type":"pub","seq":%d,"ack":%d,"topic":"%s","data":"%s"}' % (
                        seq,
                        acked,
                        topic.encode(),
                        big,
                    )
                    await client.send_raw(payload, binary=False)
                for _ in batch:
                    reply = await client.recv_type("reply")
                    acked = reply["seq"]
                    error = reply.get("error")
                    ctx.counts[f"pub: {error['code'] if error else 'published'}"] += 1

    await swarm(ctx, body)
    ctx.notes.append(f"{next(topic_numbers)} distinct topics")


async def attack_subscribe_many(ctx: Ctx) -> None:
    """8. One session subscribes to as many topics as it can (``--allow-subscribe '*'``)."""
    most = [0]

    async def body(rng: random.Random, worker: int) -> None:
        async with websocket(ctx.port, reset=rng.random() < 0.5) as client:
            await client.hello()
            seq = acked = subscribed = 0
            for _ in range(10):  # 320 attempts: far past the 128 allowed
                batch = []
                for _ in range(32):
                    seq += 1
                    topic = f"many-{worker}-{rng.randrange(10**9)}"
                    batch.append({"type": "sub", "seq": seq, "ack": acked, "topic": topic})
                await client.send(*batch)
                for _ in batch:
                    reply = await client.recv_type("reply")
                    acked = reply["seq"]
                    error = reply.get("error")
                    ctx.counts[f"sub: {error['code'] if error else 'subscribed'}"] += 1
                    subscribed += error is None
            most[0] = max(most[0], subscribed)
            if rng.random() < 0.5:
                await client.send({"type": "bye", "ack": acked})
                with trio.move_on_after(5):
                    await client.wait_closed()

    await swarm(ctx, body)
    ctx.notes.append(f"at most {most[0]} topics in one session")
    ctx.require(0 < most[0] <= 128, f"a session subscribed to {most[0]} topics (bound: 128)")
    ctx.require(ctx.counts["sub: limit_exceeded"] > 0, "no sub was refused")


async def attack_idle_flood(ctx: Ctx) -> None:
    """9. 1000 idle sockets from 127.0.0.1, reopened every 10 s, while fresh clients
    from 127.0.0.2 (raw handshakes, hello, an echo, bye) must all get in."""
    period = min(10.0, max(1.0, ctx.options.duration / 3))
    latencies: list[float] = []

    async def open_idle(held: list[trio.SocketStream], limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            try:
                held.append(await trio.open_tcp_stream("127.0.0.1", ctx.port))
            except OSError:
                ctx.counts["idle: connect failed"] += 1

    async def wave() -> None:
        """``--idle-sockets`` sockets that send nothing, held for ``period``."""
        held: list[trio.SocketStream] = []
        limiter = trio.CapacityLimiter(100)  # connects at once
        try:
            with trio.move_on_at(min(trio.current_time() + period, ctx.deadline)):
                async with trio.open_nursery() as nursery:
                    for _ in range(ctx.options.idle_sockets):
                        nursery.start_soon(open_idle, held, limiter)
                ctx.counts["idle sockets opened"] += len(held)
                await trio.sleep_forever()
        finally:
            for stream in held:
                await trio.aclose_forcefully(stream)

    async def flood() -> None:
        for _ in range(MAX_ROUNDS):
            if ctx.remaining() <= 0:
                return
            await wave()

    async def probe(rng: random.Random, worker: int) -> None:
        started = trio.current_time()
        try:
            with trio.fail_after(5):
                async with websocket(ctx.port, address=BYSTANDER_ADDRESS) as client:
                    await client.hello()
                    reply = await ctx.echo(client, 1, "probe")
                    await client.send({"type": "bye", "ack": reply["seq"]})
                    await client.wait_closed()
            ctx.counts["fresh connections from 127.0.0.2: ok"] += reply["data"] == "probe"
            latencies.append(trio.current_time() - started)
        except PEER_ERRORS as exc:
            ctx.counts[f"FRESH CONNECTION FROM 127.0.0.2 FAILED: {exc!r}"[:90]] += 1
        await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        await swarm(ctx, probe, workers=2)
    before = ctx.node.baseline.get("refused_503", 0)
    refused = await ctx.node.value("wsgate_handshakes_refused_total", status="503")
    ctx.notes.append(f"idle sockets closed by the node at once: {(refused or 0) - before:.0f}")
    if latencies:
        ctx.notes.append(
            f"fresh connection p99 {sorted(latencies)[int(len(latencies) * 0.99)] * 1000:.0f} ms"
        )
    failed = sum(n for k, n in ctx.counts.items() if k.startswith("FRESH"))
    ok = ctx.counts["fresh connections from 127.0.0.2: ok"]
    ctx.require(
        failed == 0 and ok > 0, f"fresh connections from 127.0.0.2: {ok} ok, {failed} failed"
    )


_NESTED = b'{"type":"msg","seq":1,"event":"echo","data":' + b"[" * 990 + b"]" * 990 + b"}"
_NESTED_MAPS = b'{"type":"msg","seq":1,"event":"echo","data":' + b'{"a":' * 990 + b"1" + b"}" * 991
BAD_VALUES: list[tuple[str, bool, bytes, bool]] = [
    # (name, after a good hello, payload, binary)
    ("hello.token lone surrogate", False, b'{"type":"hello","token":"\\ud800"}', False),
    ("ping.ts 1e400", True, b'{"type":"ping","ts":1e400}', False),
    ("ping.ts lone surrogate", True, b'{"type":"ping","ts":"\\ud800"}', False),
    ("data 990 arrays deep", True, _NESTED, False),
    ("data 990 maps deep", True, _NESTED_MAPS, False),
    (
        "data 2**64",
        True,
        b'{"type":"msg","seq":1,"event":"echo","data":18446744073709551616}',
        False,
    ),
    ("msgpack NaN", True, msgpack.packb(msg(1, float("nan"))), True),
    ("msgpack bytes", True, msgpack.packb(msg(1, b"\0")), True),
    ("msgpack 2**64-1", True, msgpack.packb(msg(1, 2**64 - 1)), True),
]


async def attack_bad_values(ctx: Ctx) -> None:
    """10. Values that decode but cannot be encoded (on the JWT node): 1007 each time."""

    async def body(rng: random.Random, worker: int) -> None:
        name, after_hello, payload, binary = rng.choice(BAD_VALUES)
        subprotocol = MSGPACK_SUBPROTOCOL if binary else JSON_SUBPROTOCOL
        async with websocket(ctx.port, subprotocol=subprotocol) as client:
            if after_hello:
                await client.hello(token=ctx.token("mallory"))
            await client.send_raw(payload, binary=binary)
            with trio.fail_after(10):
                code, _ = await client.wait_closed()
        ctx.counts[f"{name}: closed {code}"] += 1

    await swarm(ctx, body)
    wrong = {k: n for k, n in ctx.counts.items() if ": closed" in k and not k.endswith("1007")}
    ctx.require(not wrong, f"not closed with 1007: {wrong}")


async def attack_close_codes(ctx: Ctx) -> None:
    """11. Clients close with every code from 3000 to 4999: the node's metric must not
    make a series per code."""
    before = ctx.node.baseline_series
    codes = itertools.cycle(range(3000, 5000))

    async def body(rng: random.Random, worker: int) -> None:
        code = next(codes)
        async with websocket(ctx.port) as client:
            await client.hello()
            await client.close(code, "mine")
            with trio.fail_after(10):
                await client.wait_closed()
        ctx.counts["client close codes sent"] += 1

    await swarm(ctx, body)
    await settle(ctx.node, "wsgate_connections_open", ctx.options.bystanders, 10)
    metrics = await ctx.node.scrape()
    after = metrics.series("wsgate_closes_total") if metrics else set()
    new = after - before
    labels = sorted({dict(series).get("code", "") for series in new})
    ctx.notes.append(
        f"wsgate_closes_total: {len(before)} series before, {len(after)} after "
        f"(new codes: {', '.join(labels)})"
    )
    # The bounded set (docs/operations.md): 1000-1015, 4000-4009, and "other" for the
    # rest, so that 2000 client codes make at most 11 series (4000-4009 and "other").
    allowed = {str(code) for code in [*range(1000, 1016), *range(4000, 4010)]} | {"other"}
    strays = {dict(series).get("code") for series in after} - allowed
    ctx.require(
        not strays, f"close-code labels outside the bounded set: {sorted(map(str, strays))[:10]}"
    )
    clean = [series for series in new if dict(series).get("reason") == "clean"]
    ctx.require(len(clean) <= 11, f"client close codes made {len(clean)} new series")


async def attack_api_paths(ctx: Ctx) -> None:
    """12. Unknown /api/... paths without the key on a node WITH ``--api-key``: 401."""
    junk = ["nope", "", "stats/../publish", "%2e%2e/metrics", "publish/x", "x" * 2000]
    wrong = [{}, {"Authorization": "apikey wrong"}, {"Authorization": "Bearer x"}]

    async def body(rng: random.Random, worker: int) -> None:
        method = rng.choice(["GET", "POST", "DELETE", "PUT"])
        if rng.random() < 0.1:
            path, headers, expected = f"/api/nope-{rng.randrange(10**6)}", ctx.api_headers(), 404
        else:
            path = "/api/" + rng.choice([*junk, str(rng.randrange(10**9))])
            headers, expected = rng.choice(wrong), 401
        status, _ = await http(ctx.node.admin_port, method, path, b"{}", headers)
        ctx.counts[f"{'with' if expected == 404 else 'without'} the key: {status}"] += 1
        if status != expected:
            ctx.counts[f"UNEXPECTED {method} {path[:30]} {headers}: {status}"] += 1

    await swarm(ctx, body)
    ctx.require_no_unexpected()


async def attack_ping_before_hello(ctx: Ctx) -> None:
    """13. ``--heartbeat-interval 1``, below the hello timeout (10 s): no ping may come
    before ``welcome``; a pong before hello is a protocol error."""

    async def body(rng: random.Random, worker: int) -> None:
        variant = rng.choice(["silent", "pong first", "late hello"])
        if variant == "silent":
            wait = 12.0  # past the hello timeout (10 s)
        elif variant == "pong first":
            wait = rng.uniform(0.0, 2.0)
        else:
            wait = rng.uniform(1.2, 3.0)  # past the first heartbeat interval
        async with websocket(ctx.port, reset=rng.random() < 0.3) as client:
            early, code = await recv_for(client, min(wait, max(0.0, ctx.remaining())))
            pings = sum(1 for envelope in early if envelope.get("type") == "ping")
            ctx.counts["PINGS BEFORE WELCOME"] += pings
            ctx.counts["envelopes before hello (none expected)"] += len(early) - pings
            if code is not None:
                ctx.counts[f"{variant}: closed {code} before hello"] += 1
                return
            if variant == "silent":
                ctx.counts["silent: still waiting at the end"] += 1
                return
            if variant == "pong first":
                await client.send({"type": "pong", "ts": 0})
                with trio.fail_after(10):
                    code, _ = await client.wait_closed()
                ctx.counts[f"pong before hello: closed {code}"] += 1
                return
            await client.send({"type": "hello"})
            first = await client.recv()
            ctx.counts[f"late hello: first answer {first.get('type')}"] += 1
            with trio.fail_after(5):
                ping = await client.recv()
                while ping.get("type") != "ping":
                    ping = await client.recv()
            reply = await ctx.echo(client, 1, "after the ping", {"type": "pong", "ts": ping["ts"]})
            ctx.counts["late hello: pinged after welcome, answered"] += 1
            await client.send({"type": "bye", "ack": reply["seq"]})
            with trio.move_on_after(5):
                await client.wait_closed()

    await swarm(ctx, body)
    ctx.require(ctx.counts["PINGS BEFORE WELCOME"] == 0, "a ping came before welcome")
    firsts = {k: n for k, n in ctx.counts.items() if k.startswith("late hello: first answer")}
    ctx.require(set(firsts) <= {"late hello: first answer welcome"}, f"after hello: {firsts}")


async def attack_cut_proxy(ctx: Ctx) -> None:
    """14. The Python client through a proxy that cuts the link every 0.3 s: rounds of
    300 requests, 20 in flight, each round within 30 s."""
    rounds: list[float] = []
    clients = 1 if ctx.options.quick else 5
    # Each of the 20 workers waits 0.2 s between its requests, so that a round of 300
    # spans about ten cuts (the echo handler itself takes no time).
    pause = 0.2

    async def requests(client: Client, todo: Iterator[list[int]], answers: list[Any]) -> None:
        for request in todo:
            ctx.uncertain_echoes += 1  # until answered: a round cut short may leave some
            answers.append(await client.request("echo", request))
            ctx.uncertain_echoes -= 1
            ctx.extra_echoes += 1
            await trio.sleep(pause)

    async def one_round(client: Client, index: int, number: int) -> None:
        """300 requests, 20 in flight: all answered, each once, within 30 s."""
        todo = iter([[index, number, n] for n in range(300)])
        answers: list[Any] = []
        started = trio.current_time()
        with trio.move_on_after(30) as scope:
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(requests, client, todo, answers)
        rounds.append(trio.current_time() - started)
        good = sorted(answers) == [[index, number, n] for n in range(300)]
        ctx.counts["rounds of 300 done in < 30 s, every answer once"] += good
        if scope.cancelled_caught or not good:
            ctx.counts["ROUNDS FAILED"] += 1

    async def proxied(index: int, proxy_port: int) -> None:
        url = f"ws://127.0.0.1:{proxy_port}/ws"
        async with open_client(url, seed=1000 + index) as client:
            with trio.fail_after(30):
                await client.wait_connected()
            for number in range(MAX_ROUNDS):
                if number and (ctx.options.quick or ctx.remaining() < 300 / 20 * pause):
                    break
                await one_round(client, index, number)
            ctx.counts["proxied client: connections"] += client.statistics().connects
            ctx.counts["proxied client: sessions lost"] += client.statistics().sessions_lost

    async with trio.open_nursery() as nursery:
        proxy = FaultProxy("127.0.0.1", ctx.port)
        await nursery.start(proxy.serve)

        async def cutter() -> None:
            for _ in range(MAX_ROUNDS):
                await trio.sleep(0.3)
                proxy.cut()

        nursery.start_soon(cutter)
        async with trio.open_nursery() as group:
            for index in range(clients):
                group.start_soon(proxied, index, proxy.port)
        ctx.counts["cuts"] += proxy.stats.faults.get("cut", 0)
        nursery.cancel_scope.cancel()
    if rounds:
        ctx.notes.append(f"rounds took {min(rounds):.1f} to {max(rounds):.1f} s")
    ctx.require(bool(rounds) and ctx.counts["ROUNDS FAILED"] == 0, f"rounds failed: {rounds}")


async def attack_hostile(ctx: Ctx) -> None:
    """15. examples/hostile.py's attacks (garbage, drips, random frames and envelopes,
    bursts, forged resumes), from ``--sockets`` sockets for the whole duration."""
    report = await attack_node(ctx.port, ctx.remaining(), ctx.sockets, ctx.options.seed)
    for kind, count in report.attacks.items():
        ctx.counts[f"hostile: {kind}"] += count
    for how, count in report.endings.items():
        ctx.counts[f"ended with {how}"] += count


async def attack_upgrade_reset(ctx: Ctx) -> None:
    """16. A well-formed upgrade, then a reset (RST) while the node answers it: on the
    WebSocket port, and a probe on the admin port (found while building this battery)."""

    async def body(rng: random.Random, worker: int) -> None:
        admin = rng.random() < 0.2
        stream = await trio.open_tcp_stream("127.0.0.1", ctx.node.admin_port if admin else ctx.port)
        try:
            request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" if admin else UPGRADE
            await stream.send_all(request)
            await trio.sleep(rng.random() * 0.002)  # the node is reading it, or answering
        finally:
            set_reset(stream)
            await trio.aclose_forcefully(stream)
        ctx.counts[f"{'admin' if admin else 'websocket'} port: request, then a reset"] += 1

    await swarm(ctx, body)


@dataclass(frozen=True)
class Attack:
    number: int
    name: str
    about: str
    run: Callable[[Ctx], Awaitable[None]]
    flags: tuple[str, ...] = ()
    jwt: bool = False
    api_key: bool = False
    redis: bool = False
    #: The attackers run no echo handler of their own (but ``extra_echoes``): the
    #: node's count of handler runs must equal the requests made.
    exact: bool = True


ATTACKS = [
    Attack(
        1,
        "admin-upgrade",
        "an upgrade with one byte more, or a NUL, to the admin port",
        attack_admin_upgrade,
    ),
    Attack(
        2,
        "redis-handover",
        "2**64 then a resume on the other node; hand-overs; a SIGTERM drain that parks",
        attack_redis,
        redis=True,
        exact=False,
    ),
    Attack(
        3,
        "jwt-times",
        "signed tokens with exp NaN or 1e400: 401 or 4001",
        attack_jwt_times,
        jwt=True,
    ),
    Attack(
        4,
        "ping-flood",
        "WebSocket pings as fast as they go, never read, some before hello",
        attack_ping_flood,
    ),
    Attack(
        5,
        "echo-flood",
        "echos of 63 KB never read, ~1000 at a time",
        attack_echo_flood,
        exact=False,
    ),
    Attack(
        6,
        "resume-encoding",
        "a session full of unacked replies resumed in the other encoding",
        attack_resume_encoding,
        exact=False,
    ),
    Attack(
        7,
        "publish-flood",
        "pub of 60 KB payloads to many distinct topics",
        attack_publish_flood,
        flags=("--allow-publish", "*"),
    ),
    Attack(
        8,
        "subscribe-many",
        "one session subscribes to as many topics as it can",
        attack_subscribe_many,
    ),
    Attack(
        9,
        "idle-flood",
        "1000 idle sockets from 127.0.0.1, fresh clients from 127.0.0.2",
        attack_idle_flood,
    ),
    Attack(
        10,
        "bad-values",
        "values that decode but cannot be encoded: 1007",
        attack_bad_values,
        jwt=True,
    ),
    Attack(
        11,
        "close-codes",
        "client close codes 3000-4999: a bounded set of series",
        attack_close_codes,
    ),
    Attack(
        12, "api-paths", "unknown /api/ paths without the key: 401", attack_api_paths, api_key=True
    ),
    Attack(
        13,
        "ping-before-hello",
        "heartbeat 1 s, below the hello timeout: no ping before welcome",
        attack_ping_before_hello,
        flags=("--heartbeat-interval", "1"),
    ),
    Attack(
        14,
        "cut-proxy",
        "the client through a proxy cutting every 0.3 s: 300 requests in < 30 s",
        attack_cut_proxy,
    ),
    Attack(15, "hostile", "examples/hostile.py's attacks", attack_hostile),
    Attack(
        16,
        "upgrade-reset",
        "an upgrade, then a RST while the node answers it",
        attack_upgrade_reset,
    ),
]


# -- one attack, start to end ---------------------------------------------------------


@dataclass
class Result:
    attack: Attack
    skipped: str = ""
    lived: bool = True
    exit_codes: list[int | None] = field(default_factory=list)
    rss_growth: float = 0.0
    internal_errors: float = 0.0
    tasks: list[tuple[float, float | None]] = field(default_factory=list)
    figures: Figures = field(default_factory=Figures)
    failures: list[str] = field(default_factory=list)
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tasks_back(self) -> bool:
        return all(after is not None and after <= before for before, after in self.tasks)

    @property
    def ok(self) -> bool:
        return bool(self.skipped) or not self.failures


def node_settings(
    attack: Attack, ctx: Ctx, redis: RedisServer | None
) -> tuple[list[str], dict[str, str]]:
    flags = ["--allow-subscribe", "*", *attack.flags]
    env: dict[str, str] = {}
    if attack.api_key:
        ctx.api_key = env["WSGATE_API_KEY"] = "k" + os.urandom(16).hex()
    else:
        flags.append("--open-api")
    if attack.jwt:
        ctx.jwt_secret = env["WSGATE_JWT_SECRET"] = os.urandom(32).hex()
    if attack.redis:
        assert redis is not None
        env["WSGATE_REDIS"] = redis.url
        env["WSGATE_SECRET"] = os.urandom(16).hex()
    return flags, env


async def snapshot(node: BatteryNode) -> None:
    """The idle node's figures, before the attack."""
    metrics = await node.scrape()
    if metrics is None:
        raise RuntimeError("the node does not answer /metrics")
    node.baseline = {
        "tasks": metrics.value("wsgate_tasks"),
        "internal_errors": metrics.value("wsgate_internal_errors_total"),
        "handler_ok": metrics.value("wsgate_handler_seconds_count", outcome="ok"),
        "refused_503": metrics.value("wsgate_handshakes_refused_total", status="503"),
    }
    node.baseline_series = metrics.series("wsgate_closes_total")


async def wind_down(node: BatteryNode, ctx: Ctx, result: Result) -> None:
    """With every socket gone: connections and tasks back down, the figures after."""
    if node.drained_early:  # its exit code is the attack's to check
        result.internal_errors += node.final.get("wsgate_internal_errors_total", 0)
        result.exit_codes.append(node.exit_code)
        result.rss_growth = max(result.rss_growth, node.sampler.growth)
        return
    alive = node.process.poll() is None and not node.sampler.died
    if alive:
        left = await settle(node, "wsgate_connections_open", 0, SETTLE_SECONDS)
        if left:
            ctx.failures.append(f"{left:.0f} connections still open after {SETTLE_SECONDS:.0f} s")
        tasks = await settle(node, "wsgate_tasks", node.baseline["tasks"], SETTLE_SECONDS)
        result.tasks.append((node.baseline["tasks"], tasks))
        metrics = await node.scrape()
        if metrics is not None:
            node.final = {
                "internal_errors": metrics.value("wsgate_internal_errors_total"),
                "handler_ok": metrics.value("wsgate_handler_seconds_count", outcome="ok"),
            }
            result.internal_errors += node.final["internal_errors"]
        alive = await node.answers()
    else:
        result.tasks.append((node.baseline["tasks"], None))
    node.sampler.stop()
    result.rss_growth = max(result.rss_growth, node.sampler.growth)
    code = await node.drain()
    result.exit_codes.append(code)
    result.lived = result.lived and alive and code == 0


def judge(result: Result, ctx: Ctx) -> None:
    """Issue 18's "Done when", and the attack's own checks."""
    figures = result.figures
    failures = result.failures
    if not result.lived:
        failures.append(f"the node did not live through it (exit codes {result.exit_codes})")
    if result.rss_growth >= RSS_BOUND_MIB:
        failures.append(f"peak RSS {result.rss_growth:.0f} MiB over the baseline")
    if result.internal_errors:
        failures.append(f"{result.internal_errors:.0f} internal errors")
    if not result.tasks_back:
        failures.append(f"wsgate_tasks not back to the baseline: {result.tasks}")
    if not figures.ok:
        failures.append(
            f"well-behaved clients: {figures.ready}/{figures.clients} started, "
            f"{figures.once}/{figures.requests} answered once ({figures.failed} failed, "
            f"{figures.wrong} wrong, {figures.duplicated} twice; {dict(figures.errors)}), "
            f"{figures.lost} lost and {figures.doubled} doubled of {figures.expected} messages"
            + (f", {figures.other_epoch} of another epoch" if figures.other_epoch else "")
        )
    if result.attack.exact and figures.failed == 0 and ctx.node.final:
        runs = ctx.node.final["handler_ok"] - ctx.node.baseline["handler_ok"]
        made = figures.requests + ctx.extra_echoes
        maybe = ctx.uncertain_echoes  # sent, unanswered: ran once or not at all
        result.notes.append(
            f"echo handler runs {runs:.0f}, requests {made}"
            + (f" (and {maybe} unanswered)" if maybe else "")
        )
        if not made <= runs <= made + maybe:
            failures.append(
                f"the echo handler ran {runs:.0f} times for {made} requests answered"
                + (f" and {maybe} unanswered" if maybe else "")
            )
    if result.attack.redis:
        # The drain: every well-behaved client was on the first node, and came back
        # ``resumed: true`` on the second.
        result.notes.append(
            f"well-behaved clients resumed on the other node: {figures.resumed_clients} of "
            f"{figures.ready}, sessions lost {figures.sessions_lost}"
        )
        if figures.resumed_clients != figures.ready or figures.sessions_lost:
            failures.append(
                f"{figures.ready - figures.resumed_clients} well-behaved clients did not come "
                f"back resumed on the other node ({figures.sessions_lost} sessions lost)"
            )
    failures.extend(ctx.failures)


async def run_one(attack: Attack, options: Options, redis: RedisServer | None) -> Result:
    result = Result(attack)
    if attack.redis and redis is None:
        result.skipped = "needs --redis"
        return result
    started = time.monotonic()
    ctx = Ctx(options, [], random.Random(options.seed * 100 + attack.number))
    ctx.figures = result.figures
    nodes = ctx.nodes
    try:
        if redis is not None and attack.redis:
            redis.flush()
        flags, env = node_settings(attack, ctx, redis)
        for _ in range(2 if attack.redis else 1):
            nodes.append(BatteryNode(flags, env))
        ctx.target[:] = [nodes[0].port]
        ctx.admin[:] = [nodes[0].admin_port]
        for node in nodes:
            await warm_up(ctx, node)
            await snapshot(node)
            node.sampler.start()
        phases = [time.monotonic()]
        published = Published()
        stop = trio.Event()
        ready = trio.Event()
        started_clients = [0]

        def one_ready() -> None:
            started_clients[0] += 1
            if started_clients[0] == options.bystanders:
                ready.set()

        async with trio.open_nursery() as nursery:
            for index in range(options.bystanders):
                nursery.start_soon(bystander, ctx, index, published, one_ready, stop)
                await trio.sleep(0.01)
            with trio.move_on_after(60):
                await ready.wait()
            phases.append(time.monotonic())
            cpu = [own_cpu_seconds(), *(node.cpu_seconds() for node in nodes)]
            nursery.start_soon(publisher, ctx, published, stop)
            ctx.deadline = trio.current_time() + options.duration
            try:
                # The attack ends by itself at its deadline; this bounds a stuck one.
                with trio.move_on_at(ctx.deadline + 60) as scope:
                    await attack.run(ctx)
                if scope.cancelled_caught:
                    ctx.failures.append("the attack did not end within 60 s of its time")
            finally:
                stop.set()
                phases.append(time.monotonic())
                spent = phases[-1] - phases[-2]
                battery = (own_cpu_seconds() - cpu[0]) / spent
                used = [(n.cpu_seconds() - c) / spent for n, c in zip(nodes, cpu[1:], strict=True)]
                result.notes.append(
                    f"CPU during the attack (of one core): the battery {battery:.0%}, "
                    + ("the nodes " if len(nodes) > 1 else "the node ")
                    + ", ".join(f"{c:.0%}" for c in used)
                )
        phases.append(time.monotonic())
        result.notes.append(f"{len(published.offsets)} publications through /api/publish")
        if published.refused:
            result.notes.append(f"publications refused: {dict(published.refused)}")
        for node in nodes:
            await wind_down(node, ctx, result)
        phases.append(time.monotonic())
        took = [b - a for a, b in itertools.pairwise([started, *phases])]
        result.notes.append(
            "seconds: {:.1f} start and warm-up, {:.1f} clients connecting, {:.1f} attack, "
            "{:.1f} clients leaving, {:.1f} settling and drain".format(*took)
        )
    except Exception as exc:  # the battery's own failure: reported, and the run goes on
        ctx.failures.append(f"the battery failed: {exc!r}")
    finally:
        for node in nodes:
            node.sampler.stop()
            node.stop()
    result.counts = ctx.counts
    result.notes = ctx.notes + result.notes
    judge(result, ctx)
    for number, node in enumerate(nodes, 1):
        if options.logs is not None:
            node.save_log(options.logs / f"attack-{attack.number}-node-{number}.log")
        if node.errors_logged():
            result.failures.append(
                "the node logged errors:\n      " + "\n      ".join(node.errors_logged())
            )
    result.seconds = time.monotonic() - started
    return result


# -- the report -----------------------------------------------------------------------


def _yes(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def table(results: list[Result]) -> str:
    head = (
        "| # | attack | lived | peak RSS over base | internal errors "
        "| `wsgate_tasks` before → after | requests answered | exactly once "
        "| messages lost / doubled | p99 | result |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    ran = [r for r in results if not r.skipped]
    for r in results:
        if r.skipped:
            rows.append(
                f"| {r.attack.number} | {r.attack.name} | | | | | | | | | skipped: {r.skipped} |"
            )
            continue
        f = r.figures
        tasks = (
            ", ".join(
                f"{before:.0f} → {'?' if after is None else f'{after:.0f}'}"
                for before, after in r.tasks
            )
            or "(drained)"
        )
        rows.append(
            f"| {r.attack.number} | {r.attack.name} | {_yes(r.lived)} | +{r.rss_growth:.1f} MiB "
            f"| {r.internal_errors:.0f} | {tasks} | {f.answered:,}/{f.requests:,} | {f.once:,} "
            f"| {f.lost} / {f.doubled} of {f.expected:,} | {f.p99_ms:.0f} ms "
            f"| {'ok' if r.ok else '**FAILED**'} |"
        )
    if ran:
        total = Figures()
        for r in ran:
            for name in (
                "requests",
                "answered",
                "wrong",
                "duplicated",
                "expected",
                "lost",
                "doubled",
            ):
                setattr(total, name, getattr(total, name) + getattr(r.figures, name))
        p99 = max(r.figures.p99_ms for r in ran)
        rows.append(
            f"| | **overall** | {_yes(all(r.lived for r in ran))} "
            f"| +{max(r.rss_growth for r in ran):.1f} MiB (max) "
            f"| {sum(r.internal_errors for r in ran):.0f} | {_yes(all(r.tasks_back for r in ran))} "
            f"| {total.answered:,}/{total.requests:,} | {total.once:,} "
            f"| {total.lost} / {total.doubled} of {total.expected:,} | {p99:.0f} ms (max) "
            f"| {'ok' if all(r.ok for r in results) else '**FAILED**'} |"
        )
    return head + "\n".join(rows) + "\n"


def details(results: list[Result]) -> str:
    lines = []
    for r in results:
        if r.skipped:
            continue
        counts = ", ".join(f"{k} {n:,}" for k, n in sorted(r.counts.items()) if n)
        name = f"**{r.attack.number}. {r.attack.name}**"
        lines.append(f"- {name} ({r.attack.about}; {r.seconds:.0f} s): {counts}")
        for note in r.notes:
            lines.append(f"  - {note}")
        for failure in r.failures:
            lines.append(f"  - FAILED: {failure}")
    return "\n".join(lines) + "\n"


def write_docs(path: Path, text: str) -> None:
    doc = path.read_text()
    begin, end = "<!-- attack:begin -->", "<!-- attack:end -->"
    if begin not in doc or end not in doc:
        raise SystemExit(f"{path} has no {begin} ... {end} section")
    head, _, rest = doc.partition(begin)
    _, _, tail = rest.partition(end)
    path.write_text(head + begin + "\n" + text + end + tail)


def select(only: str | None) -> list[Attack]:
    if not only:
        return ATTACKS
    chosen = []
    for item in only.split(","):
        item = item.strip()
        matches = [a for a in ATTACKS if item in (str(a.number), a.name)]
        if not matches:
            names = ", ".join(f"{a.number}={a.name}" for a in ATTACKS)
            raise SystemExit(f"no attack {item!r} (there are {names})")
        chosen.extend(matches)
    return chosen


async def run_all(
    attacks: list[Attack], options: Options, redis: RedisServer | None
) -> list[Result]:
    results = []
    for index, attack in enumerate(attacks, 1):
        print(
            f"[{index}/{len(attacks)}] {attack.number}. {attack.name} ...",
            file=sys.stderr,
            flush=True,
        )
        result = await run_one(attack, options, redis)
        verdict = result.skipped or ("ok" if result.ok else "FAILED")
        print(f"    {verdict} ({result.seconds:.0f} s)", file=sys.stderr, flush=True)
        for failure in result.failures:
            print(f"    - {failure}", file=sys.stderr, flush=True)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, help="seconds per attack (default 15; --quick 3)")
    parser.add_argument(
        "--sockets", type=int, help="attacking sockets at once (default 100; --quick 20)"
    )
    parser.add_argument(
        "--bystanders", type=int, help="well-behaved clients (default 50; --quick 10)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few seconds per attack, fewer sockets"
    )
    parser.add_argument("--only", help="attacks to run, by number or name: 1,4,ping-flood")
    parser.add_argument("--redis", action="store_true", help="run attack 2 (needs redis-server)")
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--write", type=Path, help="put the table in this file's attack section")
    parser.add_argument("--logs", type=Path, help="keep each node's log in this directory")
    parser.add_argument("--list", action="store_true", help="list the attacks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for attack in ATTACKS:
            print(f"{attack.number:2}. {attack.name}: {attack.about}")
        return
    options = Options(seed=args.seed, quick=args.quick, logs=args.logs)
    if args.logs is not None:
        args.logs.mkdir(parents=True, exist_ok=True)
    if args.quick:
        options.duration, options.sockets, options.bystanders = 3.0, 20, 10
        options.idle_sockets = 200
    options.duration = args.duration or options.duration
    options.sockets = args.sockets or options.sockets
    options.bystanders = args.bystanders or options.bystanders
    attacks = select(args.only)
    # The nodes get only the settings the battery gives them.
    for name in [name for name in os.environ if name.startswith("WSGATE_")]:
        del os.environ[name]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    redis = None
    if args.redis and any(a.redis for a in attacks):
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("--redis needs a redis-server binary (apt-get install redis-server)")
        redis = RedisServer(binary)
    started = time.monotonic()
    try:
        results = trio.run(run_all, attacks, options, redis)
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt) or (
            isinstance(exc, BaseExceptionGroup) and exc.subgroup(KeyboardInterrupt) is not None
        )
        if interrupted:  # every node is killed already (the finally blocks, and PDEATHSIG)
            raise SystemExit("interrupted") from None
        raise
    finally:
        if redis is not None:
            redis.stop()
    summary = (
        f"{time.strftime('%Y-%m-%d')}, {revision()}, {os.cpu_count()} cores: "
        f"{len(results)} attacks, "
        f"{options.duration:g} s each, {options.sockets} attacking sockets, "
        f"{options.bystanders} well-behaved clients; {time.monotonic() - started:.0f} s in "
        f"all (the battery's own CPU: {own_cpu_seconds():.0f} s). The nodes keep the default "
        "--resume-ttl (120 s): a detached session holds no task.\n"
    )
    text = summary + "\n" + table(results) + "\n" + details(results)
    print(text)
    if args.write:
        write_docs(args.write, text)
    sys.exit(0 if all(r.ok for r in results) else 1)


if __name__ == "__main__":
    main()
