"""Protocol version 2 (docs/protocol.md, "Version 2"): publications as unsequenced
``pub`` envelopes, recovered by the client from the topics' histories."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from trio.testing import MockClock

from trio_wsgate import (
    ClientState,
    HandlerError,
    JwtAuthenticator,
    MemoryBroker,
    Server,
    Session,
    open_client,
)
from trio_wsgate.brokers import History
from trio_wsgate.protocol import (
    JSON_V2_SUBPROTOCOL,
    MSGPACK_V2_SUBPROTOCOL,
    JsonCodecV2,
    parse_envelope,
)
from trio_wsgate.protocol.envelopes import Delivery
from trio_wsgate.testing import open_memory_connection

from .conftest import make_gateway
from .test_auth import SECRET, now, token
from .test_client import URL, Wire
from .test_resume import running
from .test_topics import Seq, request


def open_server(make_server: Callable[..., Server], **settings: Any) -> Server:
    settings.setdefault("allow_subscribe", ("room:*",))
    settings.setdefault("allow_publish", ("room:*",))
    return make_server(**settings)


class _SlowAnswers(MemoryBroker):
    """The in-memory broker, whose history answers, once read, wait for ``gate``: what
    is published meanwhile comes live before the answer (a Redis round trip)."""

    gate: trio.Event | None = None

    async def history(self, topic: str, since: int | None = None) -> History:
        answer = await super().history(topic, since)
        if self.gate is not None:
            await self.gate.wait()
        return answer


def slow_answers(server: Server) -> _SlowAnswers:
    """Give ``server``'s hub a :class:`_SlowAnswers` broker."""
    hub = server.hub
    broker = _SlowAnswers(server.config.history_size)
    broker.bind(hub._receive, hub._on_control)
    hub.broker = broker
    return broker


def jwt_node(make_server: Callable[..., Server], **settings: Any) -> tuple[Server, _SlowAnswers]:
    """A node of JWT users whose broker's history answers wait for ``broker.gate``
    (set to a new event here)."""
    gateway = make_gateway()
    gateway.authenticate(JwtAuthenticator(secret=SECRET, clock=now))
    server = open_server(make_server, gateway=gateway, **settings)
    broker = slow_answers(server)
    broker.gate = trio.Event()
    return server, broker


def test_a_delivery_is_a_pub_without_seq_and_round_trips() -> None:
    codec = JsonCodecV2()
    wire = {"type": "pub", "topic": "t", "offset": 3, "epoch": "e", "event": "x", "data": None}
    (parsed,) = codec.decode(codec.dumps(wire))
    assert parsed == Delivery(topic="t", offset=3, epoch="e", data=None, event="x")
    assert parsed.to_wire() == wire
    with pytest.raises(Exception, match="offset"):
        parse_envelope({"type": "pub", "topic": "t", "epoch": "e", "data": 1})


@pytest.mark.parametrize("subprotocol", [JSON_V2_SUBPROTOCOL, MSGPACK_V2_SUBPROTOCOL])
async def test_subscribers_get_one_unsequenced_pub_encoded_once(
    autojump_clock: MockClock, make_server: Callable[..., Server], subprotocol: str
) -> None:
    server = open_server(make_server)
    async with (
        running(server) as nursery,
        open_memory_connection(server, nursery, subprotocols=[subprotocol]) as a,
        open_memory_connection(server, nursery, subprotocols=[subprotocol]) as b,
        open_memory_connection(server, nursery) as old,  # version 1
    ):
        for client in (a, b, old):
            await client.hello()
            await request(client, Seq(), "sub", topic="room:1")
        first = await server.gateway.publish("room:1", {"n": 1}, event="said")
        second = await server.gateway.publish("room:1", None)
        expected = [
            {"type": "pub", "topic": "room:1", "offset": 1, "epoch": first.epoch}
            | {"event": "said", "data": {"n": 1}},
            {"type": "pub", "topic": "room:1", "offset": 2, "epoch": first.epoch, "data": None},
        ]
        for client in (a, b):
            with trio.fail_after(5):
                got = [await client.recv_type("pub") for _ in range(2)]
            assert got == expected
        with trio.fail_after(5):
            got = [await old.recv_type("msg") for _ in range(2)]
        assert [(m["seq"], m["offset"]) for m in got] == [(2, 1), (3, 2)]
        # One encoding of each publication for every version-2 subscriber, and none
        # of them numbered nor kept: the sub's reply is all the session sent in seq.
        assert set(first.senders) == {subprotocol, "wsgate.v1.json"}
        assert isinstance(second.senders[subprotocol], bytes)
        for session in server.hub.sessions.values():
            if session.codec.version == 2:
                assert session.outbox.next_seq == 2
        nursery.cancel_scope.cancel()


async def test_a_client_pub_without_seq_is_a_protocol_error(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = open_server(make_server)
    async with (
        running(server) as nursery,
        open_memory_connection(server, nursery, subprotocols=[JSON_V2_SUBPROTOCOL]) as client,
    ):
        await client.hello()
        await client.send({"type": "pub", "topic": "room:1", "offset": 1, "epoch": "e", "data": 1})
        with trio.fail_after(5):
            code, _ = await client.wait_closed()
        assert code == 1002
        nursery.cancel_scope.cancel()


async def test_a_resume_in_the_other_version_is_a_new_session(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = open_server(make_server)
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as client:
            welcome = await client.hello()
        resume = {"session": welcome["session"], "token": welcome["resume_token"], "ack": 0}
        async with open_memory_connection(
            server, nursery, subprotocols=[JSON_V2_SUBPROTOCOL]
        ) as client:
            again = await client.hello(resume=resume)
        assert again["resumed"] is False
        assert again["session"] != welcome["session"]
        assert server.metrics.registry.get_sample_value(
            "wsgate_resumes_total", {"result": "other_version"}
        )
        # The old session is still there for a resume in its own version.
        async with open_memory_connection(server, nursery) as client:
            third = await client.hello(resume=resume)
        assert third["resumed"] is True
        nursery.cancel_scope.cancel()


async def test_a_subscriber_that_stops_reading_is_closed_4004_past_the_byte_bound(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    # A stuck reader: the socket takes nothing, version-2 pubs are not held back by any
    # window, so their bytes are bounded by max_buffered_bytes; the session is kept.
    server = open_server(make_server, max_buffered_bytes=20_000, queue_size=10_000)
    async with running(server) as nursery:
        async with open_memory_connection(
            server, nursery, subprotocols=[JSON_V2_SUBPROTOCOL], lockstep=True
        ) as client:
            await client.hello()
            await request(client, Seq(), "sub", topic="room:1")
            (session,) = server.hub.sessions.values()
            connection = session.connection
            assert connection is not None
            sent = 0
            while not connection.closing:
                await server.gateway.publish("room:1", "x" * 1000)
                sent += 1
                assert sent < 100
            # Past what the socket took before it blocked, 20 KB of 1 KB pubs.
            assert connection.close_code == 4004
            with trio.fail_after(10):
                await connection.wait_released()
        assert not session.ended
        nursery.cancel_scope.cancel()


async def test_a_resumed_client_recovers_what_was_published_while_it_was_away(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    gateway = make_gateway()
    gateway.authenticate(JwtAuthenticator(secret=SECRET, clock=now))

    @gateway.on_connect
    async def join(session: Session) -> None:
        if not session.resumed:
            await session.subscribe("news")  # a topic the application follows for it

    server = open_server(make_server, gateway=gateway)
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(
            URL, connect=wire.connect, token=token("ada"), protocol=2, seed=3
        ) as client:
            await client.wait_connected()
            await client.subscribe("room:1")
            received: list[tuple[str | None, int | None, Any]] = []

            async def take(count: int) -> None:
                with trio.fail_after(30):
                    async for message in client.messages():
                        received.append((message.topic, message.offset, message.data))
                        if len(received) == count:
                            return

            await gateway.publish("room:1", "one")
            await gateway.publish("news", "n1")
            await gateway.send_to_user("ada", "dm one")
            await take(3)
            for round_ in range(3):
                await wire.cut()
                await client.wait_state(ClientState.CONNECTING)
                # While it is away: nothing is numbered nor kept for the session.
                (session,) = server.hub.sessions.values()
                kept = session.outbox.next_seq, len(session.outbox)
                await gateway.publish("room:1", f"away {round_}")
                await gateway.publish("news", f"n away {round_}")
                await gateway.send_to_user("ada", f"dm away {round_}")
                assert (session.outbox.next_seq, len(session.outbox)) == kept
                assert await client.wait_connected() is ClientState.RESUMED
                await gateway.publish("room:1", f"back {round_}")
                await take(3 + 4 * (round_ + 1))
            assert client.recovered == {"room:1": True, "news": True, "user:ada": True}
        # Exactly once, in order within each topic.
        by_topic: dict[str | None, list[tuple[int | None, Any]]] = {}
        for topic, offset, data in received:
            by_topic.setdefault(topic, []).append((offset, data))
        assert by_topic["room:1"] == [(1, "one")] + [
            pair for r in range(3) for pair in [(2 + 2 * r, f"away {r}"), (3 + 2 * r, f"back {r}")]
        ]
        assert by_topic["news"] == [(1, "n1")] + [(2 + r, f"n away {r}") for r in range(3)]
        assert by_topic["user:ada"] == [(1, "dm one")] + [(2 + r, f"dm away {r}") for r in range(3)]
        nursery.cancel_scope.cancel()


async def test_a_full_buffer_lets_a_topic_fall_behind_and_catch_up_in_order(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = open_server(make_server)
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect, protocol=2, buffer=4) as client:
            await client.wait_connected()
            await client.subscribe("room:1")
            for n in range(30):
                await server.gateway.publish("room:1", n)
            await trio.testing.wait_all_tasks_blocked()
            assert client.statistics().buffered <= 4  # the rest was let go, not kept
            got = []
            with trio.fail_after(30):
                async for message in client.messages():
                    got.append((message.offset, message.data))
                    if len(got) == 30:
                        break
            assert got == [(n + 1, n) for n in range(30)]
            assert len(wire.streams) == 1  # caught up on the same connection
        nursery.cancel_scope.cancel()


async def test_a_recovery_sub_needs_the_topic_followed_and_reads_nothing_from_before(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = open_server(make_server, allow_subscribe=())
    async with (
        running(server) as nursery,
        open_memory_connection(server, nursery, subprotocols=[JSON_V2_SUBPROTOCOL]) as client,
    ):
        await client.hello()
        seq = Seq()
        before = await server.gateway.publish("room:1", "before")
        since = {"offset": 0, "epoch": before.epoch}
        refused = await request(client, seq, "sub", topic="room:1", since=since)
        assert refused["error"]["code"] == "forbidden"  # a plain sub: the rules of §6.2
        refused = await request(client, seq, "sub", topic="room:1", since=since, recover=True)
        assert refused["error"]["code"] == "not_subscribed"  # and it subscribed nothing
        (session,) = server.hub.sessions.values()
        assert "room:1" not in session.subscriptions
        await session.subscribe("room:1")  # the application's subscription, from offset 1
        await server.gateway.publish("room:1", "after")
        with trio.fail_after(5):
            live = await client.recv_type("pub")
        assert live["data"] == "after"
        answered = await request(client, seq, "sub", topic="room:1", since=since, recover=True)
        assert answered["data"] == {"offset": 2, "epoch": before.epoch, "recovered": False}
        # From where the application subscribed it, not from offset 0: what came
        # before is missed (recovered: false), and not sent.
        kept = [e for e in client.received if e["type"] == "pub"]
        assert [e["data"] for e in kept] == ["after"]
        nursery.cancel_scope.cancel()


async def test_an_unsubscribed_topic_is_not_followed_again(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = open_server(make_server)
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect, protocol=2) as client:
            await client.wait_connected()
            await client.subscribe("room:1")
            await client.subscribe("room:2")
            await client.unsubscribe("room:1")
            await wire.cut()
            assert await client.wait_connected() is ClientState.RESUMED
            await server.gateway.publish("room:2", "two")
            async for message in client.messages():
                assert message.topic == "room:2"
                break
            (session,) = server.hub.sessions.values()
            assert set(session.subscriptions) == {"room:2"}
        nursery.cancel_scope.cancel()


async def test_a_version_1_server_sending_pub_is_refused(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    # The client's own check: a pub from a server it speaks version 1 with.
    server = open_server(make_server)
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect) as client:
            await client.wait_connected()
            (session,) = server.hub.sessions.values()
            connection = session.connection
            assert connection is not None
            codec = JsonCodecV2()
            connection.enqueue_unsequenced(
                codec.dumps({"type": "pub", "topic": "t", "offset": 1, "epoch": "e", "data": 1})
            )
            with trio.fail_after(10):
                await client.wait_state(ClientState.CLOSED)
            assert client.close_code == 1002
        nursery.cancel_scope.cancel()


async def test_a_sub_answered_after_a_drop_asks_for_what_came_meanwhile(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    # The server processed the sub, but its reply waited for the window (the client's
    # full buffer stops its acks) when the connection dropped; published meanwhile is
    # not kept for the session. The resent reply places the topic, and the client then
    # asks the history from there.
    server = open_server(make_server, window=1)
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect, protocol=2, buffer=1) as client:
            await client.wait_connected()
            await client.send("push", 2)  # two msgs: the second is never acked for now
            subscribed: list[dict[str, Any]] = []

            async def subscribe() -> None:
                subscribed.append(await client.subscribe("room:1"))

            nursery.start_soon(subscribe)
            await trio.testing.wait_all_tasks_blocked()
            (session,) = server.hub.sessions.values()
            assert "room:1" in session.subscriptions
            assert not subscribed
            await wire.cut()
            await client.wait_state(ClientState.CONNECTING)
            await server.gateway.publish("room:1", "away")
            got = []
            with trio.fail_after(30):
                async for message in client.messages():
                    got.append((message.topic, message.offset, message.data))
                    if len(got) == 3:
                        break
            assert sorted(got, key=str) == sorted(
                [(None, None, 0), (None, None, 1), ("room:1", 1, "away")], key=str
            )
            assert subscribed
            assert subscribed[0]["offset"] == 0
        nursery.cancel_scope.cancel()


class _Peer:
    """A scripted version-2 server's side of one connection."""

    codec = JsonCodecV2()

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.pending: list[dict[str, Any]] = []

    async def recv_type(self, kind: str) -> dict[str, Any]:
        while True:
            while not self.pending:
                incoming = await self.transport.receive()
                for payload, _ in incoming.messages:
                    value = self.codec.loads(payload)
                    self.pending.extend(value if isinstance(value, list) else [value])
                ended = incoming.eof or incoming.peer_close or incoming.failed
                if not self.pending and ended:
                    raise EOFError
            envelope = self.pending.pop(0)
            if envelope["type"] == kind:
                return envelope

    async def send(self, *envelopes: dict[str, Any]) -> None:
        for envelope in envelopes:
            self.transport.send_message(self.codec.dumps(envelope), False)
        await self.transport.flush()


def _pub(offset: int) -> dict[str, Any]:
    return {"type": "pub", "topic": "t", "offset": offset, "epoch": "E", "data": offset}


async def test_a_recovery_answered_on_a_later_connection_moves_nothing(
    autojump_clock: MockClock,
) -> None:
    # The server processed a recovery (sub since 1) and sent 2 and 3, which died with
    # that connection; its reply comes on the next one. The client must not take that
    # reply's offset (3) as its place: its recovery of this connection asks from 1.
    from trio_wsgate.protocol import Welcome
    from trio_wsgate.transports import Accept, UpgradeRequest
    from trio_wsgate.transports.websockets import Handshake, accept_websocket

    async def accept(request: UpgradeRequest) -> Accept:
        return Accept(JSON_V2_SUBPROTOCOL)

    asked: list[dict[str, Any]] = []
    connections = 0

    async def serve(stream: trio.abc.Stream) -> None:
        nonlocal connections
        result = await accept_websocket(stream, decide=accept, max_message_size=65536)
        assert isinstance(result, Handshake)
        peer, connections = _Peer(result.transport), connections + 1
        await peer.recv_type("hello")
        if connections == 1:
            await peer.send(Welcome("s1", "rt", False, 0, 0, 0, 16, 65536).to_wire())
            sub = await peer.recv_type("sub")
            reply = {"type": "reply", "seq": 1, "re": sub["seq"], "ack": sub["seq"]}
            await peer.send(reply | {"data": {"offset": 0, "epoch": "E"}}, _pub(1))
        elif connections == 2:
            await peer.send(Welcome("s1", "rt", True, 1, 0, 0, 16, 65536).to_wire())
            asked.append(await peer.recv_type("sub"))
            await peer.send(_pub(2), _pub(3))  # processed; the reply never leaves
        else:
            await peer.send(Welcome("s1", "rt", True, 2, 0, 0, 16, 65536).to_wire())
            await peer.send(
                {"type": "reply", "seq": 2, "re": 2}
                | {"data": {"offset": 3, "epoch": "E", "recovered": True}}
            )
            sub = await peer.recv_type("sub")
            asked.append(sub)
            await peer.send(_pub(2), _pub(3), _pub(4))
            await peer.send(
                {"type": "reply", "seq": 3, "re": sub["seq"]}
                | {"data": {"offset": 4, "epoch": "E", "recovered": True}}
            )
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        wire = Wire(None, nursery)
        wire.serve = serve
        async with open_client(URL, connect=wire.connect, protocol=2, seed=1) as client:
            await client.wait_connected()
            await client.subscribe("t")
            got = []
            with trio.fail_after(30):
                async for message in client.messages():
                    got.append(message.offset)
                    if len(got) == 1:
                        for _ in range(2):
                            await trio.testing.wait_all_tasks_blocked()
                            await wire.cut()
                            await client.wait_state(ClientState.CONNECTING)
                            await client.wait_connected()
                    if len(got) == 4:
                        break
        assert got == [1, 2, 3, 4]
        assert [(s["since"], s.get("recover")) for s in asked] == [
            ({"offset": 1, "epoch": "E"}, True),
            ({"offset": 1, "epoch": "E"}, True),
        ]
        nursery.cancel_scope.cancel()


async def test_a_full_buffer_asks_again_only_once_there_is_room(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = open_server(make_server)
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect, protocol=2, buffer=4) as client:
            await client.wait_connected()
            await client.subscribe("room:1")
            for _ in range(30):
                await server.gateway.publish("room:1", "x" * 100)
            await trio.testing.wait_all_tasks_blocked()
            await client.subscribe("room:2")  # a sub's reply, while the buffer is full
            for _ in range(2000):
                await trio.lowlevel.checkpoint()
            asked = server.metrics.registry.get_sample_value(
                "wsgate_recoveries_total", {"result": "recovered"}
            )
            assert not asked  # nothing asked again while the application reads nothing
        nursery.cancel_scope.cancel()


async def test_publications_let_go_before_the_sub_reply_are_asked_again(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    # The sub's reply waits for the window (the client's buffer is full of msgs it
    # does not ack), live pubs overtake it and find the buffer full.
    server = open_server(make_server, window=1)
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect, protocol=2, buffer=1) as client:
            await client.wait_connected()
            await client.send("push", 2)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(client.subscribe, "room:1")
            await trio.testing.wait_all_tasks_blocked()
            await server.gateway.publish("room:1", "a")
            await server.gateway.publish("room:1", "b")
            await trio.testing.wait_all_tasks_blocked()
            got = []
            with trio.fail_after(30):
                async for message in client.messages():
                    got.append((message.topic, message.offset, message.data))
                    if len(got) == 4:
                        break
        assert got == [(None, None, 0), (None, None, 1), ("room:1", 1, "a"), ("room:1", 2, "b")]
        nursery.cancel_scope.cancel()


async def test_a_recovery_larger_than_the_queued_bytes_bound_completes(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    # 30 KB to recover against a 20 KB bound on what may wait to be written: a
    # recovery is bounded by the history and paced by the client, not closed 4004.
    server = open_server(make_server, max_buffered_bytes=20_000)
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect, protocol=2) as client:
            await client.wait_connected()
            await client.subscribe("room:1")
            await wire.cut()
            await client.wait_state(ClientState.CONNECTING)
            for n in range(30):
                await server.gateway.publish("room:1", f"{n:03}" + "x" * 1000)
            got = []
            with trio.fail_after(60):
                async for message in client.messages():
                    got.append(message.offset)
                    if len(got) == 30:
                        break
            assert got == list(range(1, 31))
            assert client.statistics().connects == 2
            assert client.recovered == {"room:1": True}
        nursery.cancel_scope.cancel()


async def test_a_topic_the_application_left_is_not_followed_again(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    gateway = make_gateway()

    @gateway.on("move")
    async def move(session: Session, data: object) -> None:
        session.unsubscribe("room:1")
        await session.subscribe("room:2")

    @gateway.on_connect
    async def join(session: Session) -> None:
        if not session.resumed:
            await session.subscribe("room:1")

    server = open_server(make_server, gateway=gateway)
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect, protocol=2) as client:
            await client.wait_connected()
            await server.gateway.publish("room:1", "a")
            async for _ in client.messages():
                break
            await client.request("move")
            (session,) = server.hub.sessions.values()
            await wire.cut()
            await client.wait_state(ClientState.CONNECTING)
            await client.wait_connected()
            await trio.testing.wait_all_tasks_blocked()
            # The recovery of room:1 is answered not_subscribed: it subscribed nothing,
            # and the client lets the topic go.
            assert set(session.subscriptions) == {"room:2"}
            await wire.cut()
            await client.wait_connected()
            await trio.testing.wait_all_tasks_blocked()
            assert set(session.subscriptions) == {"room:2"}
        nursery.cancel_scope.cancel()


async def test_a_new_session_gets_what_its_user_topic_gave_it_after_its_welcome(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    # Published to the user after the new session's subscription read where the topic
    # stood, before that answer came back (a Redis round trip): held, then given to the
    # session before it has a connection. welcome.user_topic starts before it, and it
    # follows the welcome.
    server, broker = jwt_node(make_server)
    gateway, gate = server.gateway, broker.gate
    async with (
        running(server) as nursery,
        open_memory_connection(server, nursery, subprotocols=[JSON_V2_SUBPROTOCOL]) as client,
    ):
        welcomed: list[dict[str, Any]] = []

        async def hello() -> None:
            welcomed.append(await client.hello(token=token("ada")))

        nursery.start_soon(hello)
        await trio.testing.wait_all_tasks_blocked()
        sent = await gateway.send_to_user("ada", "meanwhile")
        gate.set()
        broker.gate = None
        await trio.testing.wait_all_tasks_blocked()
        (welcome,) = welcomed
        assert welcome["user_topic"] == {"topic": "user:ada", "offset": 0, "epoch": sent.epoch}
        with trio.fail_after(5):
            early = await client.recv_type("pub")  # right after the welcome
        assert (early["offset"], early["data"]) == (1, "meanwhile")
        nursery.cancel_scope.cancel()


async def test_a_refused_subscribe_of_a_followed_topic_keeps_it_followed(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    # The application subscribed the session to "news", which its client may not
    # subscribe to itself: the client's own subscribe() is forbidden, and the topic is
    # still recovered after a cut.
    gateway = make_gateway()

    @gateway.on_connect
    async def join(session: Session) -> None:
        if not session.resumed:
            await session.subscribe("news")

    server = open_server(make_server, gateway=gateway)
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect, protocol=2) as client:
            await client.wait_connected()
            await server.gateway.publish("news", 1)
            got = []
            async for message in client.messages():
                got.append(message.data)
                break
            with pytest.raises(HandlerError, match="forbidden"):
                await client.subscribe("news")
            await wire.cut()
            await client.wait_state(ClientState.CONNECTING)
            await server.gateway.publish("news", 2)
            with trio.fail_after(30):
                async for message in client.messages():
                    got.append(message.data)
                    break
            assert got == [1, 2]
            assert client.recovered == {"news": True}
        nursery.cancel_scope.cancel()


async def test_more_than_a_window_before_its_welcome_ends_a_new_session_1013(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server, broker = jwt_node(make_server, window=2)
    gateway, gate = server.gateway, broker.gate
    async with (
        running(server) as nursery,
        open_memory_connection(server, nursery, subprotocols=[JSON_V2_SUBPROTOCOL]) as client,
    ):
        await client.send({"type": "hello", "token": token("ada")})
        await trio.testing.wait_all_tasks_blocked()
        for n in range(3):
            await gateway.send_to_user("ada", n)
        gate.set()
        broker.gate = None
        with trio.fail_after(10):
            code, reason = await client.wait_closed()
        assert (code, reason) == (1013, "try again later")
        assert not server.hub.sessions
        nursery.cancel_scope.cancel()
