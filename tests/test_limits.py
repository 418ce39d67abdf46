"""Limits against abuse (issue 6): origins, connection caps, rates, handshake bounds,
frames, and one failing connection never hurting the others. In memory, on MockClock,
over every transport unless a limit is one transport's own."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from trio.testing import MockClock
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.uri import parse_uri

from trio_wsgate import Gateway, Server, Session
from trio_wsgate.limits import ConnectionCounts, TokenBucket
from trio_wsgate.protocol import JSON_SUBPROTOCOL
from trio_wsgate.testing import RawClient, Refused, open_memory_connection

from .conftest import ALL_TRANSPORTS, make_gateway
from .test_auth import jwt_server, token

pytestmark = pytest.mark.transports(*ALL_TRANSPORTS)


async def connect_from(
    server: Server,
    nursery: trio.Nursery,
    remote: str = "10.0.0.1:5000",
    headers: dict[str, str] | None = None,
) -> RawClient:
    """A raw client whose server side sees it coming from ``remote``."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    nursery.start_soon(server.serve_stream, server_stream, remote)
    return await RawClient.connect(client_stream, headers=headers)


async def refused(server: Server, nursery: trio.Nursery, **kwargs: Any) -> Refused:
    with pytest.raises(Refused) as info:
        await connect_from(server, nursery, **kwargs)
    return info.value


# -- the sans-I/O pieces --------------------------------------------------------------


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=2, burst=3, now=0)
    assert [bucket.take(0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait(0) == 0.5
    assert bucket.retry_after(0) == "1"
    assert bucket.take(0.5)
    assert not bucket.take(0.5)
    assert bucket.take(100, 3)  # refilled, but never above the burst
    assert not bucket.take(100)
    assert not bucket.take(100.4, 1)
    assert bucket.take(100.5, 1)


def test_connection_counts_forget_addresses_that_left() -> None:
    counts = ConnectionCounts()
    counts.add("a")
    counts.add("a")
    counts.add("b")
    assert (counts.total, counts.of("a"), counts.of("b")) == (3, 2, 1)
    counts.remove("a")
    counts.remove("b")
    counts.remove("a")
    assert counts.total == 0
    assert counts.by_ip == {}


# -- before the handshake ---------------------------------------------------------------


async def test_origins_not_allowed_get_403(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server(allowed_origins=("https://app.example.com",))
    async with trio.open_nursery() as nursery:
        ok = await connect_from(server, nursery, headers={"Origin": "https://app.example.com"})
        await ok.hello()
        for origin in ("https://evil.example.com", "https://app.example.com.evil.net", "null"):
            answer = await refused(server, nursery, headers={"Origin": origin})
            assert answer.status == 403
        # No Origin: not a browser, which is what the check is for (docs/protocol.md).
        other = await connect_from(server, nursery)
        await other.hello()
        nursery.cancel_scope.cancel()
    assert server.metrics.handshakes_refused.labels("403")._value.get() == 3


async def test_the_node_limit_answers_503_with_retry_after_and_frees_on_close(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server(max_connections=2)
    async with trio.open_nursery() as nursery:
        first = await connect_from(server, nursery, "10.0.0.1:1")
        await first.hello()
        second = await connect_from(server, nursery, "10.0.0.2:1")
        await second.hello()
        answer = await refused(server, nursery, remote="10.0.0.3:1")
        assert answer.status == 503
        assert answer.response.headers["Retry-After"] == "5"
        await first.close()
        await first.wait_closed()
        await trio.testing.wait_all_tasks_blocked()
        third = await connect_from(server, nursery, "10.0.0.3:1")
        assert (await third.hello())["type"] == "welcome"
        nursery.cancel_scope.cancel()


async def test_the_address_limit_holds_each_address_apart(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server(max_connections_per_ip=2)
    async with trio.open_nursery() as nursery:
        for port in (1, 2):
            client = await connect_from(server, nursery, f"10.0.0.1:{port}")
            await client.hello()
        answer = await refused(server, nursery, remote="10.0.0.1:3")
        assert answer.status == 503
        assert "Retry-After" in answer.response.headers
        other = await connect_from(server, nursery, "10.0.0.2:1")
        assert (await other.hello())["type"] == "welcome"
        nursery.cancel_scope.cancel()


async def test_the_accept_rate_is_a_token_bucket(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server(accept_rate=2, accept_burst=3)
    async with trio.open_nursery() as nursery:
        for i in range(3):
            await connect_from(server, nursery, f"10.0.0.{i}:1")
        answer = await refused(server, nursery)
        assert answer.status == 503
        assert answer.response.headers["Retry-After"] == "1"
        await trio.sleep(0.5)  # one more token
        await connect_from(server, nursery)
        assert (await refused(server, nursery)).status == 503
        nursery.cancel_scope.cancel()


async def test_a_dripped_handshake_is_cut_at_handshake_timeout(
    autojump_clock: MockClock, make_server: Callable[..., Server], tasks: Callable[[], int]
) -> None:
    """One byte a second, never finishing: still dropped at exactly 10 s."""
    server = make_server(handshake_timeout=10, hello_timeout=None)
    before = tasks()
    client_stream, server_stream = trio.testing.memory_stream_pair()
    request = b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"p" * 100

    async def drip() -> None:
        for byte in request:
            try:
                await client_stream.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                return
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_stream, "10.0.0.1:1")
        start = trio.current_time()
        nursery.start_soon(drip)
        assert await client_stream.receive_some() == b""
        assert trio.current_time() - start == 10
        nursery.cancel_scope.cancel()
    assert tasks() == before


@pytest.mark.transports("websockets")
@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ({f"X-H{i}": "v" for i in range(65)}, 431),  # more than max_headers
        ({"X-Big": "v" * 7000, "X-Big2": "v" * 7000, "X-Big3": "v" * 3000}, 431),  # > 16 KiB
    ],
)
async def test_request_heads_are_bounded(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    extra: dict[str, str],
    status: int,
) -> None:
    server = make_server()
    async with trio.open_nursery() as nursery:
        answer = await refused(server, nursery, headers=extra)
        assert answer.status == status
        ok = await connect_from(server, nursery, headers={"X-Fine": "v" * 1000})
        assert (await ok.hello())["type"] == "welcome"
        nursery.cancel_scope.cancel()


# -- after the handshake ----------------------------------------------------------------


async def test_the_rate_limit_closes_4009_and_keeps_the_session(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server(rate_limit=10, rate_burst=5, heartbeat_interval=None)
    async with trio.open_nursery() as nursery:
        client = await connect_from(server, nursery)
        welcome = await client.hello()  # hello is the first token
        await client.send(*({"type": "ping", "ts": i} for i in range(4)))  # a batch of four
        assert [(await client.recv_type("pong"))["ts"] for _ in range(4)] == [0, 1, 2, 3]
        await trio.sleep(0.1)  # one token back
        await client.send({"type": "ping", "ts": 4})
        assert (await client.recv_type("pong"))["ts"] == 4
        await client.send({"type": "ping", "ts": 5})
        assert await client.wait_closed() == (4009, "rate limit exceeded")
        await trio.testing.wait_all_tasks_blocked()
        # 4009 keeps the session (docs/protocol.md §8): the client resumes after a pause.
        again = await connect_from(server, nursery)
        resume = {"session": welcome["session"], "token": welcome["resume_token"], "ack": 0}
        assert (await again.hello(resume=resume))["resumed"] is True
        nursery.cancel_scope.cancel()
    assert server.metrics.rate_limited._value.get() == 1


@pytest.mark.transports("websockets")
async def test_websocket_pings_count_against_the_rate_limit(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server(rate_limit=1, rate_burst=4, heartbeat_interval=None)
    async with trio.open_nursery() as nursery:
        client = await connect_from(server, nursery)
        await client.hello()
        for i in range(3):
            client.protocol.send_ping(b"%d" % i)
        await client.flush()
        await trio.lowlevel.checkpoint()
        client.protocol.send_ping(b"over")
        await client.flush()
        assert (await client.wait_closed())[0] == 4009
        nursery.cancel_scope.cancel()


async def test_the_user_limit_refuses_the_newest_by_default(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = jwt_server(make_server, max_connections_per_user=2)
    async with trio.open_nursery() as nursery:
        clients = []
        for _ in range(2):
            client = await connect_from(server, nursery)
            await client.hello(token=token("ada"))
            clients.append(client)
        newest = await connect_from(server, nursery)
        await newest.send({"type": "hello", "token": token("ada")})
        code, reason = await newest.wait_closed()
        assert code == 1008
        assert "too many connections" in reason
        other = await connect_from(server, nursery)
        assert (await other.hello(token=token("bob")))["type"] == "welcome"
        await clients[0].send({"type": "msg", "seq": 1, "event": "echo", "data": "still here"})
        assert (await clients[0].recv_type("reply"))["data"] == "still here"
        nursery.cancel_scope.cancel()
    assert len(server.hub.users["ada"]) == 2  # the refused one left no session


async def test_the_user_limit_can_close_the_oldest_instead(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = jwt_server(make_server, max_connections_per_user=2, user_limit_policy="close-oldest")
    async with trio.open_nursery() as nursery:
        clients = []
        for _ in range(3):
            client = await connect_from(server, nursery)
            await client.hello(token=token("ada"))
            clients.append(client)
            await trio.sleep(1)
        code, _ = await clients[0].wait_closed()
        assert code == 1008
        for seq, client in enumerate(clients[1:], 1):
            await client.send({"type": "msg", "seq": 1, "event": "echo", "data": seq})
            assert (await client.recv_type("reply"))["data"] == seq
        nursery.cancel_scope.cancel()


@pytest.mark.transports("websockets")
async def test_a_message_in_too_many_fragments_is_1009(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server(max_fragments=4)
    async with trio.open_nursery() as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        payload = client.codec.dumps({"type": "ping", "ts": 1})
        pieces = [payload[:3], payload[3:6], payload[6:9], payload[9:]]
        client.protocol.send_text(pieces[0], fin=False)
        for piece in pieces[1:]:
            client.protocol.send_continuation(piece, fin=piece is pieces[-1])
        await client.flush()
        assert (await client.recv_type("pong"))["ts"] == 1  # four fragments are fine
        client.protocol.send_text(b"[", fin=False)
        for _ in range(5):
            client.protocol.send_continuation(b" ", fin=False)
        await client.flush()
        code, reason = await client.wait_closed()
        assert code == 1009
        assert "fragments" in reason


@pytest.mark.transports("websockets")
async def test_compression_is_off_by_default_and_bounded_when_on(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    async def handshake(server: Server, nursery: trio.Nursery) -> ClientProtocol:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        nursery.start_soon(server.serve_stream, server_stream, "10.0.0.1:1")
        protocol = ClientProtocol(
            parse_uri("ws://127.0.0.1/ws"),
            subprotocols=[JSON_SUBPROTOCOL],  # type: ignore[list-item]
            extensions=[ClientPerMessageDeflateFactory()],
            max_size=None,
        )
        request = protocol.connect()
        protocol.send_request(request)
        for chunk in protocol.data_to_send():
            await client_stream.send_all(chunk)
        response = b""
        while b"\r\n\r\n" not in response:
            response += await client_stream.receive_some()
        protocol.receive_data(response)
        events = protocol.events_received()
        extensions = events[0].headers.get("Sec-WebSocket-Extensions")
        protocol.stream = client_stream  # type: ignore[attr-defined]
        protocol.negotiated = extensions  # type: ignore[attr-defined]
        return protocol

    async with trio.open_nursery() as nursery:
        plain = await handshake(make_server(), nursery)
        assert plain.negotiated is None  # type: ignore[attr-defined]
        server = make_server(compression=True, max_message_size=65536)
        deflating = await handshake(server, nursery)
        assert "permessage-deflate" in deflating.negotiated  # type: ignore[attr-defined]
        stream = deflating.stream  # type: ignore[attr-defined]
        deflating.send_text(b'{"type": "hello"}')
        # A bomb: 10 MB of spaces, a few KiB on the wire.
        deflating.send_text(b'"' + b" " * 10_000_000 + b'"')
        for chunk in deflating.data_to_send():
            await stream.send_all(chunk)
        assert len(zlib.compress(b" " * 10_000_000)) < 20_000
        closed = None
        while closed is None:
            data = await stream.receive_some()
            if not data:
                break
            deflating.receive_data(data)
            deflating.events_received()
            closed = deflating.close_rcvd
        assert closed is not None
        assert closed.code == 1009
        nursery.cancel_scope.cancel()


# -- containment ------------------------------------------------------------------------


async def test_a_failing_connection_is_logged_once_with_its_id_counted_and_closed_1011(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = make_gateway()

    @gateway.task
    async def crash(session: Session) -> None:
        await trio.sleep(5)
        raise ValueError("boom")

    server = make_server(gateway, heartbeat_interval=None)
    caplog.set_level(logging.ERROR, logger="trio_wsgate")
    async with trio.open_nursery() as nursery:
        neighbour = await connect_from(make_server(), nursery, "10.0.0.2:1")
        await neighbour.hello()
        client = await connect_from(server, nursery)
        await client.hello()
        (connection,) = server.connections
        assert await client.wait_closed() == (1011, "internal error")
        await neighbour.send({"type": "msg", "seq": 1, "event": "echo", "data": "fine"})
        assert (await neighbour.recv_type("reply"))["data"] == "fine"
        nursery.cancel_scope.cancel()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert connection.id in errors[0].getMessage()
    assert server.metrics.internal_errors._value.get() == 1


async def test_an_authenticator_that_crashes_costs_one_connection_only(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = Gateway()

    @gateway.authenticate
    async def broken(token: str) -> str:
        if token == "crash":
            raise RuntimeError("the identity provider fell over")
        return token

    server = make_server(gateway)
    caplog.set_level(logging.ERROR, logger="trio_wsgate")
    async with trio.open_nursery() as nursery:
        answer = await refused(server, nursery, headers={"Authorization": "Bearer crash"})
        assert answer.status == 500
        client = await connect_from(server, nursery)
        await client.send({"type": "hello", "token": "crash"})
        assert (await client.wait_closed())[0] == 1011
        fine = await connect_from(server, nursery)
        assert (await fine.hello(token="ada"))["user"] == "ada"
        nursery.cancel_scope.cancel()
    assert server.metrics.internal_errors._value.get() == 2


@pytest.mark.transports("trio-websocket")
async def test_a_ping_while_trio_websocket_closes_ends_that_connection_quietly(
    autojump_clock: MockClock, make_server: Callable[..., Server], tasks: Callable[[], int]
) -> None:
    """trio-websocket 0.12 fails its reader task on a ping that arrives during its close
    (found by examples/hostile.py); the connection ends, nothing else happens."""
    server = make_server(heartbeat_interval=None)
    before = tasks()
    async with trio.open_nursery() as nursery:
        client = await connect_from(server, nursery)
        await client.hello()
        (connection,) = server.connections
        connection.close(4005, "kicked")
        await trio.testing.wait_all_tasks_blocked()
        client.protocol.send_ping(b"late")
        await client.flush()
        await connection.wait_released()
        await client.wait_closed()
        nursery.cancel_scope.cancel()
    assert server.metrics.internal_errors._value.get() == 0
    assert connection.close_code == 4005
    await trio.testing.wait_all_tasks_blocked()
    assert tasks() == before


async def test_pongs_a_peer_does_not_read_are_bounded_in_bytes(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Found by a hostile review: a pong echoes its ping's ts, whatever its size, and
    pongs waiting while the write loop waited for a peer that does not read counted
    against --queue-size only: 57 MiB held for one connection. They count against
    --max-buffered-bytes (4004) with what else no outbox counts."""
    server = make_server(max_buffered_bytes=1 << 20)
    async with (
        trio.open_nursery() as nursery,
        open_memory_connection(server, nursery, lockstep=True) as client,
    ):
        await client.hello()
        (connection,) = server.connections
        most = 0
        for _ in range(100):  # 6 MB of pings, if nothing stopped them
            await client.send({"type": "ping", "ts": "x" * 60_000})
            await trio.testing.wait_all_tasks_blocked()
            held = sum(len(payload) for payload, _ in connection._queue)
            most = max(most, held + connection._transport.unsent_bytes)
            if connection.closing:
                break
        assert connection.close_code == 4004
        assert most <= (1 << 20) + 2 * 60_100  # the bound, and what was being written
