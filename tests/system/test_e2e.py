"""The real server process, driven by an independent client (websockets' sync client).

These tests start ``python -m trio_wsgate serve`` on 127.0.0.1 with the chat example,
as a user would, and talk to it only through the network: WebSocket, /healthz,
/metrics, and signals.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from examples.cluster_chaos import free_run, wait_for_port
from trio_wsgate.testing import free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Node:
    process: subprocess.Popen[str]
    port: int
    admin_port: int
    log: list[str]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def get(self, path: str, admin: bool = True) -> tuple[int, str]:
        port = self.admin_port if admin else self.port
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str) -> float:
        _, text = self.get("/metrics")
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        assert match, name
        return float(match.group(1))

    def settle(self, name: str, value: float) -> float:
        """Poll a metric until it is at most ``value`` (bounded: 10 s, 200 reads).

        At most, not equal: a reading taken as a baseline may include a transient
        task (the previous scrape's, say); a leak still shows as more.
        """
        seen = self.metric(name)
        for _ in range(200):
            if seen <= value:
                break
            time.sleep(0.05)
            seen = self.metric(name)
        return seen


SERVE = [sys.executable, "-m", "trio_wsgate", "serve", "--app", "examples/chat.py:gateway"]


def start_node(*flags: str, env: dict[str, str] | None = None, command: list[str] = SERVE) -> Node:
    admin_port = free_port()
    process = subprocess.Popen(
        [*command, "--port", "0", "--admin-port", str(admin_port), *flags],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    log: list[str] = []
    port = 0
    ready = threading.Event()

    def read() -> None:
        nonlocal port
        assert process.stderr is not None
        for line in process.stderr:
            log.append(line)
            match = re.search(r"listening on ws://127\.0\.0\.1:(\d+)/", line)
            if match:
                port = int(match.group(1))
            if "admin on" in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    assert ready.wait(30), "".join(log)
    assert port, "".join(log)
    return Node(process, port, admin_port, log)


def stop_node(node: Node) -> None:
    if node.process.poll() is None:
        node.process.kill()
    node.process.wait(10)
    if node.process.stderr:
        node.process.stderr.close()


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    started = start_node("--heartbeat-interval", "1", "--heartbeat-timeout", "5")
    yield started
    stop_node(started)


def hello(ws: ClientConnection) -> dict[str, Any]:
    ws.send(json.dumps({"type": "hello"}))
    return receive(ws, "welcome")


_UNREAD: weakref.WeakKeyDictionary[ClientConnection, list[dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)


def receive(ws: ClientConnection, kind: str) -> dict[str, Any]:
    """The next envelope of this type, answering pings on the way like a client must.

    Envelopes after it in the same batch wait for the next call.
    """
    unread = _UNREAD.setdefault(ws, [])
    for _ in range(100):
        if not unread:
            value = json.loads(ws.recv(timeout=10))
            unread.extend(value if isinstance(value, list) else [value])
        while unread:
            envelope = unread.pop(0)
            if envelope["type"] == kind:
                return envelope
            if envelope["type"] == "ping":
                ws.send(json.dumps({"type": "pong", "ts": envelope.get("ts")}))
    raise AssertionError(f"no {kind}")


def close_code(ws: ClientConnection) -> int | None:
    """Read until the server closes; return the code it sent."""
    try:
        for _ in range(100):
            ws.recv(timeout=10)
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None
    raise AssertionError("the server did not close")


def test_hello_call_reply_ack_and_ping(node: Node) -> None:
    with connect(node.url, subprotocols=["wsgate.v1.json"]) as ws:  # type: ignore[list-item]
        welcome = hello(ws)
        assert welcome["heartbeat"]["interval"] == 1.0
        ws.send(json.dumps({"type": "msg", "seq": 1, "event": "echo", "data": [1, "two"]}))
        reply = receive(ws, "reply")
        # The chat's on_connect sent "joined" first, so the reply's own seq varies.
        assert (reply["re"], reply["data"], reply["ack"]) == (1, [1, "two"], 1)
        ping = receive(ws, "ping")  # the server's heartbeat, every second here
        assert isinstance(ping["ts"], int)
        ws.send(json.dumps({"type": "pong", "ts": ping["ts"]}))


def test_chat_between_two_clients(node: Node) -> None:
    with connect(node.url) as alice, connect(node.url) as bob:
        hello(alice)
        hello(bob)
        alice.send(json.dumps({"type": "msg", "seq": 1, "event": "say", "data": "hi bob"}))
        for ws in (alice, bob):
            for _ in range(20):
                said = receive(ws, "msg")
                if said.get("event") == "said":
                    break
            assert said["topic"] == "room:lobby"
            assert said["data"]["text"] == "hi bob"
            assert said["data"]["from"].startswith("guest-")  # an anonymous node


@pytest.mark.parametrize(
    ("payload", "code"),
    [("{nope", 1007), (b"binary", 1003), (json.dumps({"type": "msg", "seq": 7}), 1002)],
)
def test_bad_input_codes(node: Node, payload: str | bytes, code: int) -> None:
    with connect(node.url) as ws:
        hello(ws)
        ws.send(payload)
        assert close_code(ws) == code
    # The node still serves.
    assert node.get("/healthz", admin=False)[0] == 200


def frame(payload: bytes) -> bytes:
    """A masked text frame, as a client sends it (mask key zero: payload as is)."""
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + b"\x00\x00\x00\x00" + payload


def _raw_handshake(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert sock.recv(4096).startswith(b"HTTP/1.1 101 ")
    return sock


def test_killing_the_peer_socket_any_way_leaves_wsgate_tasks_where_it_was(node: Node) -> None:
    assert node.settle("wsgate_connections_open", 0) == 0
    baseline = node.metric("wsgate_tasks")
    for _ in range(20):
        # RST: SO_LINGER zero.
        sock = _raw_handshake(node.port)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        # FIN without a close frame.
        _raw_handshake(node.port).close()
        # Dropped mid-handshake.
        half = socket.create_connection(("127.0.0.1", node.port), timeout=10)
        half.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpg")
        half.close()
        # Connected to a handler that is running when the socket dies.
        busy = _raw_handshake(node.port)
        busy.sendall(frame(b'{"type":"hello"}'))
        busy.sendall(frame(b'{"type":"msg","seq":1,"event":"who"}'))
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        busy.close()
    assert node.settle("wsgate_connections_open", 0) == 0
    assert node.settle("wsgate_tasks", baseline) <= baseline
    _, text = node.get("/metrics")
    assert 'wsgate_closes_total{code="1006",reason="reset"}' in text


def test_settings_come_from_the_environment() -> None:
    node = start_node(env={"WSGATE_PATH": "/gateway", "WSGATE_WINDOW": "32"})
    try:
        with connect(f"ws://127.0.0.1:{node.port}/gateway") as ws:
            assert hello(ws)["window"] == 32
    finally:
        stop_node(node)


def test_sigterm_drains_with_1001_and_exits_0() -> None:
    node = start_node("--close-timeout", "1")
    try:
        with connect(node.url) as ws:
            hello(ws)
            assert node.get("/readyz")[0] == 200
            node.process.send_signal(signal.SIGTERM)
            assert close_code(ws) == 1001
        assert node.process.wait(15) == 0
        assert any("draining" in line for line in node.log)
    finally:
        stop_node(node)


def test_a_second_signal_exits_at_once() -> None:
    node = start_node("--close-timeout", "30", "--drain-timeout", "60")
    try:
        deaf = _raw_handshake(node.port)  # never answers the close: the drain would wait 30 s
        deaf.sendall(frame(b'{"type":"hello"}'))
        node.process.send_signal(signal.SIGTERM)
        for _ in range(200):  # bounded: until the first signal has turned /readyz
            if node.get("/readyz")[0] == 503:
                break
            time.sleep(0.05)
        assert node.get("/readyz")[0] == 503
        node.process.send_signal(signal.SIGTERM)
        assert node.process.wait(10) == 1
        deaf.close()
    finally:
        stop_node(node)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_wsgate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_the_cli_client_makes_one_request(node: Node) -> None:
    done = run_cli("client", node.url, "echo", '{"a": [1, 2]}')
    assert (done.returncode, json.loads(done.stdout)) == (0, {"a": [1, 2]})
    # Options may come before the event, as the README writes it (an anonymous node
    # ignores the token).
    done = run_cli("client", node.url, "--token", "t", "echo", '{"a": 3}')
    assert (done.returncode, json.loads(done.stdout)) == (0, {"a": 3}), done.stderr
    done = run_cli("client", node.url, "--token", "t", "echo", "1", "2")
    assert done.returncode == 2
    assert "unrecognized arguments: 2" in done.stderr
    refused = run_cli("client", node.url, "join", '""')
    assert refused.returncode == 1
    assert "error bad_room" in refused.stderr
    nowhere = run_cli("client", f"ws://127.0.0.1:{free_port()}/ws", "echo", "--max-attempts", "1")
    assert nowhere.returncode == 2
    assert "gave up after 1 attempts" in nowhere.stderr


def test_the_cli_client_reads_commands_from_stdin(node: Node) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "trio_wsgate", "client", node.url],
        cwd=ROOT,
        input='join "rust"\nwho "rust"\n!sub room:go\n!pub room:go 1\n',
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    (joined,) = [line for line in done.stdout.splitlines() if line.startswith("< reply join: ")]
    assert json.loads(joined.removeprefix("< reply join: "))["room"] == "room:rust"
    (who,) = [line for line in done.stdout.splitlines() if line.startswith("< reply who: ")]
    assert json.loads(who.removeprefix("< reply who: "))[0].startswith("guest-")
    assert '< sub room:go: {"offset": 0' in done.stdout
    # No --allow-publish: clients may not publish.
    assert "< error pub room:go: forbidden" in done.stdout


def test_an_independent_client_resumes_after_its_socket_dies(node: Node) -> None:
    """websockets' own client, knowing only docs/protocol.md §5."""
    with connect(node.url) as ws:
        welcome = hello(ws)
        ws.send(json.dumps({"type": "msg", "seq": 1, "event": "echo", "data": "kept"}))
        reply = receive(ws, "reply")
        ws.socket.shutdown(socket.SHUT_RDWR)  # dies without a close frame, reply unacked
    with connect(node.url) as ws:
        resume = {"session": welcome["session"], "token": welcome["resume_token"], "ack": 0}
        ws.send(json.dumps({"type": "hello", "resume": resume}))
        again = receive(ws, "welcome")
        assert (again["resumed"], again["ack"]) == (True, 1)
        assert receive(ws, "reply") == reply  # resent, above our ack of 0
        ws.send(json.dumps({"type": "bye"}))


def test_the_secret_never_shows_in_help_or_logs() -> None:
    secret = "a-very-secret-resume-key-0123456789"
    env = {**os.environ, "WSGATE_SECRET": secret}
    shown = subprocess.run(
        [sys.executable, "-m", "trio_wsgate", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert shown.returncode == 0
    assert secret not in shown.stdout
    started = start_node("--log-level", "debug", env={"WSGATE_SECRET": secret})
    try:
        with connect(started.url) as ws:
            hello(ws)
    finally:
        stop_node(started)
    assert secret not in "".join(started.log)


def _api(node: Node, method: str, path: str, body: Any = None, key: str = "") -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{node.admin_port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"apikey {key}"} if key else {},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _call(ws: ClientConnection, seq: int, event: str, data: Any) -> Any:
    ws.send(json.dumps({"type": "msg", "seq": seq, "event": event, "data": data}))
    reply = receive(ws, "reply")
    assert reply["re"] == seq, reply
    return reply.get("data", reply.get("error"))


def _next_event(ws: ClientConnection, event: str) -> dict[str, Any]:
    for _ in range(50):
        message = receive(ws, "msg")
        if message.get("event") == event:
            return message
    raise AssertionError(f"no {event}")


def test_the_chat_of_the_readme_users_rooms_presence_and_the_http_api() -> None:
    """What the README walks through: scripts/serve, tokens, rooms, who, the server API."""
    secrets = {"WSGATE_JWT_SECRET": "s" * 32 + "-readme-chat", "WSGATE_API_KEY": "api-key-of-test"}
    node = start_node(env=secrets, command=["bash", "scripts/serve"])
    try:
        assert not any("ANONYMOUS" in line for line in node.log)
        ada_token = run_cli("token", "ada", env=secrets).stdout.strip()
        bob_token = run_cli("token", "bob", "--ttl", "600", env=secrets).stdout.strip()
        # A bad token is refused at the handshake with 401.
        with pytest.raises(InvalidStatus) as refused:
            connect(node.url, additional_headers={"Authorization": "Bearer nope"})
        assert refused.value.response.status_code == 401
        with (
            connect(node.url, additional_headers={"Authorization": f"Bearer {ada_token}"}) as ada,
            connect(f"{node.url}?token={bob_token}") as bob,
        ):
            assert hello(ada)["user"] == "ada"
            assert hello(bob)["user"] == "bob"
            assert _call(ada, 1, "join", "rust")["room"] == "room:rust"
            assert _call(bob, 1, "join", "rust")["members"] == ["ada", "bob"]
            assert _call(ada, 2, "who", "rust") == ["ada", "bob"]
            assert _call(bob, 2, "say", {"room": "rust", "text": "hi"})["offset"] == 3
            said = _next_event(ada, "said")
            assert (said["topic"], said["data"]) == ("room:rust", {"from": "bob", "text": "hi"})
            # The server API: without the key, 401; with it, a publication to the room
            # and a message to one user, both delivered.
            note = {"topic": "room:rust", "event": "said", "data": {"from": "ops", "text": "!"}}
            assert _api(node, "POST", "/api/publish", note)[0] == 401
            key = secrets["WSGATE_API_KEY"]
            status, published = _api(node, "POST", "/api/publish", note, key)
            assert (status, published["offset"]) == (200, 4)
            for ws in (ada, bob):
                assert _next_event(ws, "said")["data"] == {"from": "ops", "text": "!"}
            dm = {"user": "bob", "event": "dm", "data": "psst"}
            assert _api(node, "POST", "/api/send", dm, key)[0] == 200
            got = _next_event(bob, "dm")
            assert (got["topic"], got["data"]) == ("user:bob", "psst")
            status, present = _api(node, "GET", "/api/presence?topic=room:rust", key=key)
            assert (status, present["users"]) == (200, ["ada", "bob"])
            status, stats = _api(node, "GET", "/api/stats", key=key)
            assert (stats["connections"], stats["users"]) == (2, 2)
            assert _api(node, "POST", "/api/kick", {"user": "bob"}, key) == (200, {"kicked": 1})
            assert close_code(bob) == 4005
        log = "".join(node.log)
        for secret in (*secrets.values(), ada_token, bob_token):
            assert secret not in log
    finally:
        stop_node(node)


def test_an_anonymous_node_says_so_loudly(node: Node) -> None:
    assert any("ANONYMOUS MODE" in line and "WARNING" in line for line in node.log)


@pytest.mark.redis
def test_scripts_cluster_runs_three_nodes_that_act_as_one(redis_server: Any) -> None:
    """scripts/cluster: three chat nodes through one Redis, clients spread over them."""
    base = free_run(3)
    secrets = {"WSGATE_JWT_SECRET": "c" * 40, "WSGATE_API_KEY": "cluster-api-key"}
    env = {
        **os.environ,
        **secrets,
        "WSGATE_CLUSTER_PORT": str(base),
        "WSGATE_REDIS": redis_server.url,
    }
    process = subprocess.Popen(
        ["bash", "scripts/cluster", "3", "--log-level", "warning"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        urls = [f"ws://127.0.0.1:{base + i}/ws" for i in range(3)]
        for i in range(3):
            wait_for_port(base + 100 + i, timeout=30)
        ada_token = run_cli("token", "ada", env=secrets).stdout.strip()
        bob_token = run_cli("token", "bob", env=secrets).stdout.strip()
        with (
            connect(f"{urls[0]}?token={ada_token}") as ada,
            connect(f"{urls[2]}?token={bob_token}") as bob,
        ):
            hello(ada)
            hello(bob)
            assert _call(ada, 1, "join", "rust")["room"] == "room:rust"
            assert _call(bob, 1, "join", "rust")["members"] == ["ada", "bob"]
            assert _call(ada, 2, "say", {"room": "rust", "text": "across"})["offset"] == 3
            for ws in (ada, bob):
                said = _next_event(ws, "said")
                assert said["data"] == {"from": "ada", "text": "across"}
            middle = Node(process, base + 1, base + 101, [])
            note = {"topic": "room:rust", "event": "said", "data": {"from": "ops", "text": "!"}}
            status, published = _api(middle, "POST", "/api/publish", note, "cluster-api-key")
            assert (status, published["offset"]) == (200, 4)
            for ws in (ada, bob):
                assert _next_event(ws, "said")["data"] == {"from": "ops", "text": "!"}
            status, present = _api(
                middle, "GET", "/api/presence?topic=room:rust", key="cluster-api-key"
            )
            assert present["users"] == ["ada", "bob"]
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(20)
        if process.stderr:
            process.stderr.close()


@pytest.mark.redis
def test_the_owner_killed_the_client_recovers_every_publication_on_another_node(
    redis_server: Any,
) -> None:
    """SIGKILL the node holding a session: the client carries on at another, losing nothing."""
    import jwt
    import trio

    from trio_wsgate import Backoff, ClientState, open_client

    secrets = {
        "WSGATE_JWT_SECRET": "k" * 40,
        "WSGATE_API_KEY": "kill-test-key",
        "WSGATE_SECRET": "r" * 32,
        "WSGATE_REDIS": redis_server.url,
    }
    first, second = start_node(env=secrets), start_node(env=secrets)
    token = jwt.encode({"sub": "ada", "exp": int(time.time()) + 600}, "k" * 40, algorithm="HS256")

    def publish(text: str) -> int:
        note = {"topic": "room:1", "data": text}
        status, answer = _api(second, "POST", "/api/publish", note, "kill-test-key")
        assert status == 200, answer
        return int(answer["offset"])

    async def scenario() -> None:
        target = [first.port]

        async def connect() -> trio.abc.Stream:
            return await trio.open_tcp_stream("127.0.0.1", target[0])

        backoff = Backoff(base=0.05, cap=0.2)
        async with open_client(first.url, token=token, connect=connect, backoff=backoff) as client:
            await client.wait_connected()
            await client.subscribe("room:1")
            got: list[tuple[int | None, Any]] = []

            async def receive(count: int) -> None:
                with trio.fail_after(30):
                    async for message in client.messages():
                        if message.topic == "room:1":
                            got.append((message.offset, message.data))
                            if len(got) == count:
                                return

            for i in range(5):
                await trio.to_thread.run_sync(publish, f"m{i}")
            await receive(5)
            first.process.kill()  # SIGKILL: the session's owner is gone, mid-stream
            target[0] = second.port
            for i in range(5, 10):
                await trio.to_thread.run_sync(publish, f"m{i}")
            await receive(10)
            assert got == [(i + 1, f"m{i}") for i in range(10)]  # once each, in order
            assert client.recovered == {"room:1": True, "user:ada": True}
            assert client.state in (ClientState.SESSION_LOST, ClientState.CONNECTED)

    try:
        trio.run(scenario)
    finally:
        stop_node(first)
        stop_node(second)


@pytest.mark.transports("websockets", "trio-websocket", "asgi")
def test_each_transport_serves_drains_and_logs_no_secret(transport: str) -> None:
    """The standalone server on each ``--transport``, logging at DEBUG."""
    jwt_secret, api_key = "an-e2e-jwt-secret-of-32-bytes-or-more!", "an-e2e-api-key"
    started = start_node(
        "--transport",
        transport,
        "--log-level",
        "debug",
        "--close-timeout",
        "1",
        "--allowed-origin",
        "https://chat.example.com",
        env={"WSGATE_JWT_SECRET": jwt_secret, "WSGATE_API_KEY": api_key},
    )
    tokens = []
    try:
        for user in ("ada", "bob"):
            made = run_cli("token", user, env={"WSGATE_JWT_SECRET": jwt_secret})
            tokens.append(made.stdout.strip())
        with pytest.raises(InvalidStatus) as refused:
            connect(f"{started.url}?token={tokens[0]}", origin="https://evil.example.com")  # type: ignore[arg-type]
        assert refused.value.response.status_code == 403
        with connect(f"{started.url}?token={tokens[0]}", origin="https://chat.example.com") as ws:  # type: ignore[arg-type]
            assert hello(ws)["user"] == "ada"
            assert _call(ws, 1, "echo", "over " + transport) == "over " + transport
            ws.send(json.dumps({"type": "refresh", "token": tokens[1]}))  # another user: 4001
            assert close_code(ws) == 4001
        assert _api(started, "GET", "/api/stats", key="not-the-key")[0] == 401
        assert _api(started, "GET", "/api/stats", key=api_key)[0] == 200
        with connect(started.url) as ws:
            ws.send(json.dumps({"type": "hello", "token": tokens[1]}))
            assert receive(ws, "welcome")["user"] == "bob"
            started.process.send_signal(signal.SIGTERM)
            assert close_code(ws) == 1001
        assert started.process.wait(15) == 0
    finally:
        stop_node(started)
    log = "".join(started.log)
    assert "listening on" in log
    for secret in (jwt_secret, api_key, *tokens):
        assert secret not in log


def test_a_port_in_use_is_one_line_not_a_traceback() -> None:
    # Found by a hostile review: a busy --port (or --admin-port) of a single node
    # ended in an exception group's traceback.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("serve", "--port", str(port), "--admin-port", "0")
    assert done.returncode == 1
    assert "trio-wsgate: cannot listen:" in done.stderr
    assert "Traceback" not in done.stderr
