"""A node survives any client, and one client's memory is bounded (issue 18).

Each test is the regression test of one case of the issue, on in-memory streams with
a MockClock; the attack battery (scripts/attack) runs them all against a live node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from trio_wsgate import HandlerError, Server, Session
from trio_wsgate.dispatch import INBOUND_HIGH_WATER
from trio_wsgate.protocol.codecs import MSGPACK_SUBPROTOCOL
from trio_wsgate.testing import open_memory_connection

from .conftest import ALL_TRANSPORTS, make_gateway
from .test_resume import detached, resume_of, running, sample

pytestmark = pytest.mark.transports(*ALL_TRANSPORTS)


def msg(seq: int, event: str, data: Any = None) -> dict[str, Any]:
    return {"type": "msg", "seq": seq, "event": event, "data": data}


async def test_case5_an_echo_flood_never_read_ends_its_session_at_the_byte_bound(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """~1000 echos of 63 KB, never read: closed 4004, and its session is not kept with
    what it buffered (it was over ``max_buffered_bytes``)."""
    server = make_server()
    big = "x" * 63_000
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as client:
            first = await client.hello()
            for seq in range(1, 256):  # the window: more would be a protocol error
                await client.send(msg(seq, "echo", big))
            code, reason = await client.wait_closed()
            assert (code, reason) == (4004, "slow consumer")
        await detached(server)
        # Not kept: the replies it held were over the bound, so it ended.
        assert not server.hub.sessions
        assert server.hub.detached_bytes == 0
        assert sample(server, "wsgate_sessions_ended_total", why="overflow") == 1
        async with open_memory_connection(server, nursery) as client:
            welcome = await client.hello(resume=resume_of(first, 0))
            assert welcome["resumed"] is False


async def test_case5_a_session_keeps_at_most_max_buffered_bytes_while_attached(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server(max_buffered_bytes=10_000)
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as client:
            await client.hello()
            (session,) = server.hub.sessions.values()
            for _ in range(9):
                session.send("news", "y" * 1000)
            assert session.outbox.nbytes < 10_000
            assert not session.connection.closing  # type: ignore[union-attr]
            session.send("news", "y" * 1000)  # over the bound: 4004
            # The session ends at once, and what it held goes with it, while the
            # connection still closes (a peer that does not read takes close_timeout).
            assert session.ended
            assert session.outbox.nbytes == 0
            assert not session.outbox.in_flight
            code, _ = await client.wait_closed()
            assert code == 4004
        await detached(server)
        assert session.ended


async def test_case5_a_peer_faster_than_its_handler_is_not_read_ahead(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Received messages waiting for a slow handler stay in the peer's socket past a
    bound, instead of in the node (the reader waits for the dispatcher)."""
    gateway = make_gateway()
    started = trio.Event()

    @gateway.on("stall")
    async def stall(session: Session, data: Any) -> Any:
        started.set()
        await trio.sleep(100)
        return data

    server = make_server(gateway)
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        await client.send(msg(1, "stall"))
        await started.wait()
        with trio.move_on_after(5):
            for seq in range(2, 200):
                await client.send(msg(seq, "echo", "p" * 60_000))
        await trio.sleep(1)
        (session,) = server.hub.sessions.values()
        (connection,) = server.connections
        # The window would let it send 256; the node read 256 KiB of them, and stopped.
        bound = INBOUND_HIGH_WATER
        assert session.inbox.received <= 2 + bound // 60_000 + 1
        assert connection.inbound_bytes <= bound + 60_100
        # Not closed for silence: the node stopped reading, the peer did not stop.
        await trio.sleep(60)
        assert not connection.closing
        # (It never read its replies either: leaving drops it, with no close handshake.)


async def test_case5_what_waits_for_the_handlers_is_weighed_decoded_not_on_the_wire(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """20 KB of msgpack's one-byte empty arrays decode to over 1.5 MB: the reader
    counts that, and stops after one such message while the handler is busy."""
    gateway = make_gateway()
    started = trio.Event()

    @gateway.on("stall")
    async def stall(session: Session, data: Any) -> Any:
        started.set()
        await trio.sleep(100)

    server = make_server(gateway)
    async with (
        running(server) as nursery,
        open_memory_connection(server, nursery, subprotocols=[MSGPACK_SUBPROTOCOL]) as client,
    ):
        await client.hello()
        await client.send(msg(1, "stall"))
        await started.wait()
        for seq in range(2, 40):
            await client.send(msg(seq, "echo", [[]] * 20_000))
        await trio.sleep(1)
        (session,) = server.hub.sessions.values()
        (connection,) = server.connections
        assert session.inbox.received == 2  # the stall, and one message of arrays
        assert connection.inbound_bytes > 20_000 * 64


async def test_case8_a_client_subscribes_a_session_to_at_most_max_subscriptions(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server(max_subscriptions=3, allow_subscribe=("room:*",))
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        replies = []
        for seq in range(1, 6):
            await client.send({"type": "sub", "seq": seq, "topic": f"room:{seq % 4}"})
            replies.append(await client.recv_type("reply"))
        errors = [reply.get("error") for reply in replies]
        assert errors[:3] == [None, None, None]
        assert errors[3] == {"code": "limit_exceeded", "reason": "at most 3 subscriptions"}
        assert errors[4] is None  # room:1 again: already followed, no new subscription
        (session,) = server.hub.sessions.values()
        assert len(session.subscriptions) == 3
        await client.close()


async def test_subscriptions_the_application_makes_do_not_count_against_the_limit(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Found by a hostile review: §6.3 says so, but every subscription counted, and a
    client whose on_connect joined three rooms could not subscribe to one."""
    gateway = make_gateway()

    @gateway.on_connect
    async def join(session: Session) -> None:
        for room in ("lobby", "news", "help"):
            await session.subscribe(room)

    server = make_server(gateway, max_subscriptions=3, allow_subscribe=("room:*",))
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        replies = []
        for seq in range(1, 5):
            await client.send({"type": "sub", "seq": seq, "topic": f"room:{seq}"})
            replies.append((await client.recv_type("reply")).get("error"))
        assert replies[:3] == [None, None, None]
        assert replies[3] == {"code": "limit_exceeded", "reason": "at most 3 subscriptions"}
        await client.close()


async def test_case7_history_is_bounded_in_bytes_per_topic_and_per_node(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server(history_topic_bytes=50_000, history_bytes=200_000)
    async with running(server):
        broker = server.hub.broker
        for i in range(100):
            await server.gateway.publish(f"topic:{i}", "d" * 6_000)
        assert broker.nbytes <= 200_000  # type: ignore[attr-defined]
        # The oldest topics lost their history first; the newest kept theirs.
        assert (await broker.history("topic:0", 0)).publications == []
        assert len((await broker.history("topic:99", 0)).publications) == 1
        for _ in range(20):
            await server.gateway.publish("hot", "h" * 6_000)
        held = (await broker.history("hot", 0)).publications
        assert 1 <= len(held) < 20
        assert [p.offset for p in held] == list(range(21 - len(held), 21))
        assert broker.nbytes <= 200_000  # type: ignore[attr-defined]


async def test_case13_no_ping_before_welcome(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Pings belong to a session: with the interval below the hello timeout, a client
    that takes its time to say hello gets no ping before its welcome."""
    server = make_server(heartbeat_interval=1.0, heartbeat_timeout=10.0, heartbeat_slack=0)
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        await trio.sleep(5)
        welcome = await client.hello()
        assert welcome["type"] == "welcome"
        start = trio.current_time()
        ping = await client.recv_type("ping")
        assert trio.current_time() - start == pytest.approx(1.0)
        await client.send({"type": "pong", "ts": ping["ts"]})
        await client.close()


async def test_case6_a_session_that_cannot_be_resumed_in_this_encoding_ends_cleanly(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Whatever a kept envelope holds, a resume that cannot re-encode it gives a new
    session; the old one ends (not attached to a dead connection for ever)."""
    server = make_server()
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as client:
            first = await client.hello()
        await detached(server)
        (session,) = server.hub.sessions.values()
        session.send("kept", 1)
        # An envelope no encoding can read back: what the domain rules out, forced.
        (_, item), *_ = session.outbox.unacknowledged()
        item.payload = b'{"type":"msg","seq":1,"data":1e400}'
        errors = sample(server, "wsgate_internal_errors_total") or 0
        async with open_memory_connection(
            server, nursery, subprotocols=[MSGPACK_SUBPROTOCOL]
        ) as client:
            welcome = await client.hello(resume=resume_of(first, 0))
            assert welcome["resumed"] is False
            assert welcome["session"] != first["session"]
            await client.send({"type": "msg", "seq": 1, "event": "echo", "data": "ok"})
            assert (await client.recv_type("reply"))["data"] == "ok"
            await client.send({"type": "bye"})
            await client.wait_closed()
        assert session.ended
        assert session.connection is None
        assert session.id not in server.hub.sessions
        assert sample(server, "wsgate_internal_errors_total") == errors + 1


async def test_case2_a_reply_outside_the_domain_becomes_error_internal(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    gateway = make_gateway()

    @gateway.on("huge")
    async def huge(session: Session, data: Any) -> Any:
        return {"n": 2**64}

    server = make_server(gateway)
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        await client.send(msg(1, "huge"))
        reply = await client.recv_type("reply")
        assert reply["error"] == {"code": "internal", "reason": "the reply could not be encoded"}
        (session,) = server.hub.sessions.values()
        with pytest.raises(ValueError, match="2\\*\\*53"):
            session.send("huge", 2**53)
        await client.close()


async def test_the_applications_events_and_error_codes_are_held_to_the_domain(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    gateway = make_gateway()

    @gateway.on("odd")
    async def odd(session: Session, data: Any) -> Any:
        raise HandlerError(5, "a number for a code")  # type: ignore[arg-type]

    server = make_server(gateway)
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        (session,) = server.hub.sessions.values()
        with pytest.raises(TypeError):
            session.send(5, "x")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="Unicode"):
            session.send("\ud800", "x")
        with pytest.raises(ValueError, match="event"):
            await server.gateway.publish("room", 1, event="\ud800")
        await client.send(msg(1, "odd"))
        reply = await client.recv_type("reply")
        assert reply["error"] == {"code": "internal", "reason": "internal error"}
        await client.close()


async def test_history_keeps_encodings_not_decoded_data(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server()
    async with running(server):
        publication = await server.gateway.publish("news", {"text": "x" * 1000})
        assert publication.data == {"text": "x" * 1000}  # the caller's is whole
        (kept,) = (await server.hub.broker.history("news", 0)).publications
        assert kept.data is None
        assert kept.encoded is publication.encoded


async def test_a_peer_that_resets_while_its_handshake_is_answered_is_no_internal_error(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """The attack battery's upgrade-reset: 481 internal errors in 15 s, each logged with
    a traceback, for peers that left while the node wrote its answer."""
    server = make_server()
    request = (
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    async with running(server) as nursery:
        for _ in range(5):
            client_stream, server_stream = trio.testing.memory_stream_pair()
            nursery.start_soon(server.serve_stream, server_stream, "127.0.0.1:1")
            await client_stream.send_all(request)
            await client_stream.aclose()  # gone before the answer
            await trio.testing.wait_all_tasks_blocked()
        assert not server.connections
        assert (sample(server, "wsgate_internal_errors_total") or 0) == 0
        async with open_memory_connection(server, nursery) as client:
            await client.hello()
            await client.close()
