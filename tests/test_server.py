"""The node over real sockets on 127.0.0.1, with an independent client (websockets)."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
import trio.testing
from websockets.exceptions import InvalidStatus
from websockets.trio.client import connect

from trio_wsgate import Server
from trio_wsgate.server import set_keepalive
from trio_wsgate.testing import RawClient
from trio_wsgate.transports import websockets as websockets_transport

from .conftest import ALL_TRANSPORTS
from .helpers import http_get, metric, scheduled

pytestmark = pytest.mark.transports(*ALL_TRANSPORTS)


@pytest.fixture
async def node(make_server: Callable[..., Server]) -> AsyncIterator[Server]:
    server = make_server(port=0, admin_port=0, close_timeout=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


def ws_url(server: Server, path: str = "/ws") -> str:
    host, port = server.listen_addresses[0]
    return f"ws://{host}:{port}{path}"


async def test_an_independent_client_says_hello_and_calls(node: Server) -> None:
    async with connect(ws_url(node), subprotocols=["wsgate.v1.json"], ping_interval=None) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "wsgate.v1.json"
        await ws.send(json.dumps({"type": "hello"}))
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome"
        await ws.send(json.dumps({"type": "msg", "seq": 1, "event": "echo", "data": "hi"}))
        reply = json.loads(await ws.recv())
        assert reply == {"type": "reply", "seq": 1, "re": 1, "data": "hi", "ack": 1}
        # WebSocket-level pings are answered by the server too.
        with trio.fail_after(5):
            pong = await ws.ping()
            await pong.wait()
    assert ws.close_code == 1000


async def test_no_subprotocol_offered_means_json(node: Server) -> None:
    async with connect(ws_url(node), ping_interval=None) as ws:
        assert ws.subprotocol is None
        await ws.send(json.dumps({"type": "hello"}))
        assert json.loads(await ws.recv())["type"] == "welcome"


async def test_msgpack_is_binary(node: Server) -> None:
    import msgpack

    async with connect(ws_url(node), subprotocols=["wsgate.v1.msgpack"], ping_interval=None) as ws:  # type: ignore[list-item]
        await ws.send(msgpack.packb({"type": "hello"}))
        welcome = await ws.recv()
        assert isinstance(welcome, bytes)
        assert msgpack.unpackb(welcome)["type"] == "welcome"


async def test_foreign_subprotocols_are_refused_with_400(node: Server) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with connect(ws_url(node), subprotocols=["mqtt"]):  # type: ignore[list-item]
            pass
    assert info.value.response.status_code == 400


@pytest.mark.transports("websockets", "asgi")  # trio-websocket: the admin port only
async def test_health_on_both_ports_and_metrics_on_admin(node: Server) -> None:
    _, ws_port = node.listen_addresses[0]
    _, admin_port = node.admin_addresses[0]
    for port in (ws_port, admin_port):
        assert (await http_get(port, "/healthz"))[0] == 200
        assert (await http_get(port, "/readyz"))[0] == 200
    status, headers, body = await http_get(admin_port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    assert metric(body, "wsgate_tasks") > 0
    assert metric(body, "wsgate_connections_open") == 0
    assert (await http_get(admin_port, "/nope"))[0] == 404


async def test_accepted_sockets_get_tcp_keepalive(make_server: Callable[..., Server]) -> None:
    server = make_server(keepalive_idle=60, keepalive_interval=5, keepalive_count=3)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        client = await trio.open_tcp_stream("127.0.0.1", port)
        accepted = await listeners[0].accept()
        set_keepalive(accepted, server.config)
        sock = accepted.socket
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 5
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
        await client.aclose()
        await accepted.aclose()
        await listeners[0].aclose()
        nursery.cancel_scope.cancel()


async def _open_raw(server: Server) -> tuple[RawClient, trio.SocketStream]:
    host, port = server.listen_addresses[0]
    stream = await trio.open_tcp_stream(host, port)
    client = await RawClient.connect(stream)
    await client.hello()
    return client, stream


async def _wait_until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not predicate():  # noqa: ASYNC110 - the server's state, seen over real sockets
            await trio.sleep(0.01)


@pytest.mark.transports("websockets")
async def test_one_message_read_alone_is_answered_in_the_readers_step(node: Server) -> None:
    """A read that holds one message, whose handler never waits, is answered by the
    reader at once. Several messages in one read are a sign of load: they go to the
    dispatcher, whose step lets the replies of more requests leave together
    (docs/architecture.md, "A request that comes alone takes one task step")."""
    client, stream = await _open_raw(node)
    assert (await _call(client, 1, "echo", 1))["data"] == 1
    await trio.testing.wait_all_tasks_blocked()
    async with scheduled("Connection._application") as dispatcher:
        assert (await _call(client, 2, "echo", 2))["data"] == 2
    assert dispatcher.count == 0
    for seq in (3, 4):  # two messages, one write: one read
        client.protocol.send_text(
            client.codec.dumps({"type": "msg", "seq": seq, "event": "echo", "data": seq})
        )
    async with scheduled("Connection._application") as dispatcher:
        await stream.send_all(b"".join(client.protocol.data_to_send()))
        with trio.fail_after(5):
            replies = [await client.recv_type("reply") for _ in range(2)]
    assert [reply["data"] for reply in replies] == [3, 4]
    assert dispatcher.count >= 1
    await stream.aclose()


async def _call(client: RawClient, seq: int, event: str, data: Any) -> dict[str, Any]:
    await client.send({"type": "msg", "seq": seq, "event": event, "data": data})
    with trio.fail_after(5):
        return await client.recv_type("reply")


async def test_a_reset_is_classified_and_leaves_no_task(
    node: Server, tasks: Callable[[], int], transport: str
) -> None:
    await trio.testing.wait_all_tasks_blocked()
    before = tasks()
    _client, stream = await _open_raw(node)
    await _wait_until(lambda: len(node.connections) == 1)
    # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()
    await _wait_until(lambda: not node.connections)
    await trio.testing.wait_all_tasks_blocked()
    assert tasks() == before
    # trio-websocket and hypercorn tell a reset from an end of stream no more
    # (docs/transports.md): both are "eof" there.
    reason = "reset" if transport == "websockets" else "eof"
    assert (
        node.metrics.registry.get_sample_value(
            "wsgate_closes_total", {"code": "1006", "reason": reason}
        )
        == 1
    )


async def test_drain_closes_with_1001_and_readyz_turns_503(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(port=0, admin_port=0, close_timeout=1, drain_timeout=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        _, admin_port = server.admin_addresses[0]
        polite, polite_stream = await _open_raw(server)
        _, deaf_stream = await _open_raw(server)  # will never read the close frame
        await _wait_until(lambda: len(server.connections) == 2)
        done = trio.Event()

        async def drain() -> None:
            await server.drain()
            done.set()

        nursery.start_soon(drain)
        assert await polite.wait_closed() == (1001, "server draining")
        assert (await http_get(admin_port, "/readyz"))[0] == 503
        await done.wait()  # the deaf one is released at close_timeout
        assert not server.connections
        await polite_stream.aclose()
        await deaf_stream.aclose()
    # serve() returned by itself once drained.


async def test_connections_during_drain_get_503_with_retry_after(
    make_server: Callable[..., Server],
) -> None:
    server = make_server()
    server.draining = True
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_stream)
        await client_stream.send_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        response = b""
        while chunk := await client_stream.receive_some():
            response += chunk
    assert response.startswith(b"HTTP/1.1 503 ")
    assert b"\r\nretry-after: 5\r\n" in response.lower()


@pytest.mark.transports("websockets")
async def test_a_write_the_socket_takes_only_part_of_goes_out_whole(
    make_server: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The websockets transport writes what the socket takes at once without yielding
    # and hands the rest to send_all (transports/websockets.py, _write_now).
    partial: list[tuple[int, int]] = []
    write_now = websockets_transport._write_now

    def spy(sock: trio.socket.SocketType, payload: bytes) -> int:
        written = write_now(sock, payload)
        if written < len(payload):
            partial.append((written, len(payload)))
        return written

    monkeypatch.setattr(websockets_transport, "_write_now", spy)
    server = make_server(port=0, max_message_size=2**20)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        client, stream = await _open_raw(server)
        (connection,) = server.connections
        # A send buffer far smaller than the reply: the kernel takes a part at a time.
        sock = connection._transport._stream.socket  # type: ignore[attr-defined]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = "".join(chr(ord("a") + i % 26) for i in range(600_000))
        await client.send({"type": "msg", "seq": 1, "event": "echo", "data": data})
        # Replies queued while the rest of the first is still being written follow it,
        # in order: one writer at a time (connection.py, "one writer").
        for seq in range(2, 7):
            await client.send({"type": "msg", "seq": seq, "event": "echo", "data": seq})
        with trio.fail_after(10):
            replies = [await client.recv_type("reply") for _ in range(6)]
        assert replies[0]["data"] == data
        assert [(r["re"], r["data"]) for r in replies[1:]] == [(n, n) for n in range(2, 7)]
        assert partial, "the reply fitted the socket at once: the test tested nothing"
        assert all(0 <= written < total for written, total in partial)
        await stream.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.transports("websockets")
async def test_quiet_readers_wait_through_the_readiness_watcher(node: Server) -> None:
    # One task and one epoll set wake the node's quiet sockets (readiness.py); each
    # reader parks with one frame. After the handshake, websockets' request parser has
    # made way for its frame parser (the request is not kept).
    from websockets.protocol import Protocol

    from trio_wsgate import readiness

    clients = [await _open_raw(node) for _ in range(3)]
    await _wait_until(lambda: len(node.connections) == 3)
    await trio.testing.wait_all_tasks_blocked()
    watcher = readiness._WATCHER.get()
    assert watcher is not None
    served = {connection._transport._stream.socket.fileno() for connection in node.connections}
    assert served <= set(watcher._waiting)
    for connection in node.connections:
        parser = connection._transport._protocol.parser
        assert parser.gi_code is Protocol.parse.__code__
    # Frames still parse, and each reader wakes for its own.
    for client, _ in clients:
        await client.send({"type": "msg", "seq": 1, "event": "echo", "data": "hi"})
        with trio.fail_after(5):
            reply = await client.recv_type("reply")
        assert reply["data"] == "hi"
    # A connection that was sent requests is busy (the reader ran them itself, the
    # echo never waits): its reader waits through trio, one task step sooner, until a
    # heartbeat interval passes with no request.
    await trio.testing.wait_all_tasks_blocked()
    assert not served & set(watcher._waiting)
    for connection in node.connections:
        connection.heartbeat_passed()  # (what the heartbeat calls at each ping)
    for client, _ in clients:  # a read of no request: the reader waits quietly again
        await client.send({"type": "ping", "ts": 1})
        with trio.fail_after(5):
            assert (await client.recv_type("pong"))["ts"] == 1
    await trio.testing.wait_all_tasks_blocked()
    assert served <= set(watcher._waiting)
    for _, stream in clients:
        await stream.aclose()
    await _wait_until(lambda: not node.connections)
    await trio.testing.wait_all_tasks_blocked()
    assert not served & set(watcher._waiting)


@pytest.mark.transports("websockets")
async def test_frames_sent_with_the_upgrade_request_are_read(node: Server) -> None:
    # A client that sends its first frames in the same packet as the upgrade request:
    # they are parsed with the request, and the request's parser stays on.
    from websockets.frames import Frame, Opcode

    host, port = node.listen_addresses[0]
    stream = await trio.open_tcp_stream(host, port)
    request = (
        f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: wsgate.v1.json\r\n\r\n"
    ).encode()
    frames = b"".join(
        Frame(Opcode.TEXT, json.dumps(envelope).encode()).serialize(mask=True, extensions=[])
        for envelope in (
            {"type": "hello"},
            {"type": "msg", "seq": 1, "event": "echo", "data": "early"},
        )
    )
    await stream.send_all(request + frames)
    received = b""
    with trio.fail_after(5):
        while b'"early"' not in received:
            chunk = await stream.receive_some(65536)
            assert chunk
            received += chunk
    assert received.startswith(b"HTTP/1.1 101")
    assert b'"welcome"' in received
    await stream.aclose()


_UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: wsgate.v1.json\r\n\r\n"
)


async def _accept_after(sent: bytes) -> tuple[websockets_transport.Handshake, trio.SocketStream]:
    """accept_websocket over a socket pair, the client having sent ``sent`` at once."""
    from trio_wsgate.transports.base import Accept

    ours, theirs = trio.socket.socketpair()
    server, client = trio.SocketStream(ours), trio.SocketStream(theirs)

    async def decide(_: object) -> Accept:
        return Accept("wsgate.v1.json")

    await client.send_all(sent)
    result = await websockets_transport.accept_websocket(
        server, decide=decide, max_message_size=2**20, watched=True
    )
    assert isinstance(result, websockets_transport.Handshake)
    return result, client


@pytest.mark.parametrize("split", [2, 6])
async def test_part_of_a_frame_sent_with_the_upgrade_request_is_kept(split: int) -> None:
    # websockets' parser has taken the frame's header (and mask) from its buffer: the
    # buffer is empty, but the request parser must not make way for a fresh one.
    from websockets.frames import Frame, Opcode

    frame = Frame(Opcode.TEXT, b'{"type":"hello"}').serialize(mask=True, extensions=[])
    handshake, client = await _accept_after(_UPGRADE + frame[:split])
    async with client:
        await client.send_all(frame[split:])
        with trio.fail_after(5):
            incoming = await handshake.transport.receive()
        assert incoming.failed is None
        assert incoming.messages == [(b'{"type":"hello"}', False)]
        await handshake.transport.aclose()


async def test_after_a_close_frame_sent_with_the_upgrade_request_the_rest_is_discarded() -> None:
    from websockets.frames import Frame, Opcode

    close = Frame(Opcode.CLOSE, b"\x03\xe8").serialize(mask=True, extensions=[])
    text = Frame(Opcode.TEXT, b'{"type":"hello"}').serialize(mask=True, extensions=[])
    handshake, client = await _accept_after(_UPGRADE + close)
    async with client:
        first = await handshake.transport.receive()
        assert first.peer_close == (1000, "")
        await client.send_all(text)
        with trio.fail_after(5):
            after = await handshake.transport.receive()
        assert after.messages == []  # RFC 6455 §5.5.1: nothing after a close
        await handshake.transport.aclose()


async def test_an_embedder_closing_its_stream_ends_serve_stream() -> None:
    # A stream handed to serve_stream may be closed by its owner, which the readiness
    # watcher would not hear of: its quiet reader waits through trio, which does.
    from trio_wsgate import Config, Gateway

    server = Server(Gateway(), Config(admin_port=None, hello_timeout=None, heartbeat_interval=None))
    ours, theirs = trio.socket.socketpair()
    stream, client = trio.SocketStream(ours), trio.SocketStream(theirs)
    done = trio.Event()

    async def serve() -> None:
        await server.serve_stream(stream, "peer")
        done.set()

    async with client, trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await client.send_all(_UPGRADE)
        assert (await client.receive_some(4096)).startswith(b"HTTP/1.1 101")
        await trio.testing.wait_all_tasks_blocked()
        await stream.aclose()
        with trio.fail_after(5):
            await done.wait()
