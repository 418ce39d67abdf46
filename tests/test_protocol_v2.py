"""Protocol version 2 (docs/protocol.md, "Version 2"): publications as unsequenced
``pub`` envelopes, recovered by the client from the topics' histories."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from trio_wsgate import ClientState, JwtAuthenticator, Server, Session, open_client
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


async def test_sub_of_a_topic_the_session_follows_needs_no_permission(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = open_server(make_server, allow_subscribe=())
    async with (
        running(server) as nursery,
        open_memory_connection(server, nursery, subprotocols=[JSON_V2_SUBPROTOCOL]) as client,
    ):
        await client.hello()
        seq = Seq()
        refused = await request(client, seq, "sub", topic="room:1")
        assert refused["error"]["code"] == "forbidden"
        (session,) = server.hub.sessions.values()
        await session.subscribe("room:1")
        await server.gateway.publish("room:1", "a")
        answered = await request(
            client, seq, "sub", topic="room:1", since={"offset": 0, "epoch": ""}
        )
        assert "error" not in answered
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
