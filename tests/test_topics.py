"""Topics (docs/protocol.md §6): sub, unsub, pub, offsets and epochs, history and recovery."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from trio.testing import MockClock

from trio_wsgate import JwtAuthenticator, MemoryBroker, Server, Session
from trio_wsgate.brokers import History
from trio_wsgate.protocol import JsonCodec, MsgpackCodec
from trio_wsgate.protocol.codecs import MSGPACK_SUBPROTOCOL
from trio_wsgate.testing import RawClient, open_memory_connection

from .conftest import make_gateway
from .test_auth import SECRET, now, token
from .test_resume import running


def open_server(make_server: Callable[..., Server], **settings: Any) -> Server:
    settings.setdefault("allow_subscribe", ("news", "room:*"))
    settings.setdefault("allow_publish", ("room:*", "*"))
    return make_server(**settings)


class Seq:
    """Numbers a client's sequenced envelopes."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "seq": self.seq, **fields}


async def request(client: RawClient, seq: Seq, kind: str, **fields: Any) -> dict[str, Any]:
    """Send a sequenced envelope; return its reply (msgs received meanwhile are kept)."""
    envelope = seq(kind, **fields)
    await client.send(envelope)
    kept = []
    with trio.fail_after(60):
        while True:
            got = await client.recv()
            if got["type"] == "reply" and got["re"] == envelope["seq"]:
                client.received.extendleft(reversed(kept))
                return got
            if got["type"] != "ack" and got["type"] != "ping":
                kept.append(got)


async def msgs(client: RawClient, count: int) -> list[dict[str, Any]]:
    """The next ``count`` topic messages (failing, in virtual time, if they never come)."""
    with trio.fail_after(60):
        return [await client.recv_type("msg") for _ in range(count)]


def offsets(messages: list[dict[str, Any]]) -> list[int]:
    return [m["offset"] for m in messages]


async def test_publications_carry_topic_consecutive_offsets_and_epoch(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = open_server(make_server)
    async with (
        running(server) as nursery,
        open_memory_connection(server, nursery) as reader,
        open_memory_connection(server, nursery) as writer,
    ):
        await reader.hello()
        await writer.hello()
        rs, ws = Seq(), Seq()
        sub = await request(reader, rs, "sub", topic="room:1")
        epoch = sub["data"]["epoch"]
        assert sub["data"] == {"offset": 0, "epoch": epoch}
        for i in range(5):
            pub = await request(writer, ws, "pub", topic="room:1", data={"n": i})
            assert pub["data"] == {"offset": i + 1, "epoch": epoch}
        got = await msgs(reader, 5)
        assert [(m["topic"], m["offset"], m["epoch"], m["data"]) for m in got] == [
            ("room:1", i + 1, epoch, {"n": i}) for i in range(5)
        ]
        assert [m["seq"] for m in got] == [2, 3, 4, 5, 6]  # the session's own numbering
        # The API of the gateway publishes the same way, with an event.
        publication = await server.gateway.publish("room:1", "from the server", event="note")
        assert (publication.offset, publication.epoch) == (6, epoch)
        (note,) = await msgs(reader, 1)
        assert (note["event"], note["data"], note["offset"]) == ("note", "from the server", 6)
        registry = server.metrics.registry
        assert registry.get_sample_value("wsgate_publications_total") == 6
        assert registry.get_sample_value("wsgate_topics") == 1
        assert registry.get_sample_value("wsgate_fanout_subscribers_count") == 6
        assert registry.get_sample_value("wsgate_fanout_subscribers_sum") == 6


async def test_sub_and_pub_are_authorised(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = open_server(make_server, allow_publish=("room:*",))
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        seq = Seq()
        for kind, topic, code in [
            ("sub", "secret", "forbidden"),
            ("sub", "user:bob", "forbidden"),
            ("pub", "news", "forbidden"),
            ("sub", "", "bad_topic"),
            ("sub", "x" * 300, "bad_topic"),
            ("pub", "room:\x00", "bad_topic"),
        ]:
            reply = await request(client, seq, kind, topic=topic, data=1)
            assert reply["error"]["code"] == code, (kind, topic)
        assert (await request(client, seq, "sub", topic="news"))["data"]["offset"] == 0
        assert (await request(client, seq, "pub", topic="room:9", data=1))["data"]["offset"] == 1


async def test_user_topics_are_reserved(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    gateway = make_gateway()
    gateway.authenticate(JwtAuthenticator(secret=SECRET, clock=now))
    server = make_server(gateway, allow_subscribe=("*",), allow_publish=("*",))
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        welcome = await client.hello(token=token("ada"))
        session = server.hub.sessions[welcome["session"]]
        assert session.topics == ["user:ada"]  # every session follows its user's topic
        seq = Seq()
        # Patterns never open other users' topics, nor publishing to any user topic.
        assert (await request(client, seq, "sub", topic="user:bob"))["error"]["code"] == "forbidden"
        for topic in ("user:ada", "user:bob"):
            reply = await request(client, seq, "pub", topic=topic, data="spoof")
            assert reply["error"]["code"] == "forbidden"
        # Its own topic: subscribing again just says where it stands; no leaving it.
        assert (await request(client, seq, "sub", topic="user:ada"))["data"]["offset"] == 0
        assert (await request(client, seq, "unsub", topic="user:ada"))["error"]["code"] == (
            "forbidden"
        )


async def test_the_topics_claim_and_the_application_hooks_authorise(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    gateway = make_gateway()
    gateway.authenticate(JwtAuthenticator(secret=SECRET, clock=now))
    asked: list[tuple[str | None, str]] = []

    @gateway.authorize_subscribe
    async def vip(session: Session, topic: str) -> bool:
        asked.append((session.user, topic))
        return topic.startswith("vip:") and session.user == "ada"

    @gateway.authorize_publish
    async def whispers(session: Session, topic: str) -> bool:
        if topic == "crash":
            raise RuntimeError("the hook broke")
        return topic == "user:bob" and session.user == "ada"

    server = make_server(gateway)
    async with (
        running(server) as nursery,
        open_memory_connection(server, nursery) as ada,
        open_memory_connection(server, nursery) as bob,
    ):
        await ada.hello(token=token("ada", topics=["room:*", "news"]))
        await bob.hello(token=token("bob"))
        sa, sb = Seq(), Seq()
        for topic, ok in [("room:1", True), ("news", True), ("newsroom", False)]:
            reply = await request(ada, sa, "sub", topic=topic)
            assert ("data" in reply) is ok, topic
        assert "data" in await request(ada, sa, "sub", topic="vip:lounge")
        assert (await request(bob, sb, "sub", topic="vip:lounge"))["error"]["code"] == ("forbidden")
        assert (await request(bob, sb, "sub", topic="room:1"))["error"]["code"] == "forbidden"
        # The hook is asked only where the claim and the patterns said no.
        assert ("ada", "room:1") not in asked
        assert ("ada", "vip:lounge") in asked
        # The publish hook alone opens a user topic: ada may whisper to bob.
        reply = await request(ada, sa, "pub", topic="user:bob", data="psst")
        assert reply["data"]["offset"] == 1
        (whisper,) = await msgs(bob, 1)
        assert (whisper["topic"], whisper["data"]) == ("user:bob", "psst")
        # A hook that raises answers "internal"; the connection carries on.
        reply = await request(ada, sa, "pub", topic="crash", data=1)
        assert reply["error"] == {"code": "internal", "reason": "internal error"}
        assert "data" in await request(ada, sa, "sub", topic="room:2")


async def test_data_that_one_encoding_cannot_carry_is_refused(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = open_server(make_server)
    async with (
        running(server) as nursery,
        open_memory_connection(server, nursery, subprotocols=[MSGPACK_SUBPROTOCOL]) as client,
    ):
        await client.hello()
        # The application's data outside the value domain is refused on publish...
        for data in (float("nan"), 2**53, b"\x00", "\ud800"):
            with pytest.raises(ValueError, match="encodable"):
                await server.gateway.publish("room:1", data)
        # ...and a client's on receipt (1007): bytes are fine in msgpack, but JSON
        # subscribers could not get them.
        await client.send({"type": "pub", "seq": 1, "topic": "room:1", "data": b"\x00\x01"})
        code, reason = await client.wait_closed()
        assert (code, reason) == (
            1007,
            "bytes cannot travel in JSON (send them as a base64 string)",
        )
        with pytest.raises(ValueError, match="topic"):
            await server.gateway.publish("", 1)


async def test_recovery_sends_exactly_what_was_missed_then_live(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = open_server(make_server)
    gateway = server.gateway
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as client:
            await client.hello()
            sub = await request(client, Seq(), "sub", topic="news")
            epoch = sub["data"]["epoch"]
            for i in range(1, 3):
                await gateway.publish("news", i)
            seen = await msgs(client, 2)
            assert offsets(seen) == [1, 2]
            await client.send({"type": "bye"})
        for i in range(3, 6):  # missed while away
            await gateway.publish("news", i)
        async with open_memory_connection(server, nursery) as client:
            await client.hello()
            seq = Seq()
            since = {"offset": 2, "epoch": epoch}
            reply = await request(client, seq, "sub", topic="news", since=since)
            assert reply["data"] == {"offset": 5, "epoch": epoch, "recovered": True}
            # The missed ones came before the reply, in order...
            missed = await msgs(client, 3)
            assert [(m["offset"], m["data"]) for m in missed] == [(3, 3), (4, 4), (5, 5)]
            # ... and live ones follow.
            await gateway.publish("news", 6)
            assert offsets(await msgs(client, 1)) == [6]
            # Up to date already: recovered, nothing sent.
            reply = await request(
                client, seq, "sub", topic="news", since={"offset": 6, "epoch": epoch}
            )
            assert reply["data"] == {"offset": 6, "epoch": epoch, "recovered": True}
            assert not [m for m in client.received if m["type"] == "msg"]
    assert (
        server.metrics.registry.get_sample_value("wsgate_recoveries_total", {"result": "recovered"})
        == 2
    )


async def test_a_too_old_offset_or_another_epoch_is_not_recovered(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = open_server(make_server, history_size=3)
    gateway = server.gateway
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        seq = Seq()
        for i in range(10):
            publication = await gateway.publish("news", i)
        epoch = publication.epoch
        # Offset 2 was pushed out (only 8, 9, 10 are held): not recovered, and the
        # held ones are sent all the same.
        reply = await request(client, seq, "sub", topic="news", since={"offset": 2, "epoch": epoch})
        assert reply["data"] == {"offset": 10, "epoch": epoch, "recovered": False}
        assert offsets(await msgs(client, 3)) == [8, 9, 10]
        # Offset 7 is just before what is held: recovered.
        reply = await request(client, seq, "sub", topic="news", since={"offset": 7, "epoch": epoch})
        assert reply["data"]["recovered"] is True
        assert offsets(await msgs(client, 3)) == [8, 9, 10]
        # Another epoch: offsets from another history mean nothing; nothing is sent.
        reply = await request(
            client, seq, "sub", topic="news", since={"offset": 9, "epoch": "another"}
        )
        assert reply["data"] == {"offset": 10, "epoch": epoch, "recovered": False}
        # An offset from the future of this epoch is not recovered either.
        reply = await request(
            client, seq, "sub", topic="news", since={"offset": 99, "epoch": epoch}
        )
        assert reply["data"]["recovered"] is False
        assert not [m for m in client.received if m["type"] == "msg"]


async def test_history_expires_after_its_ttl_and_idle_topics_get_a_new_epoch(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = open_server(make_server, history_ttl=300, heartbeat_interval=None)
    gateway = server.gateway
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        seq = Seq()
        first = await gateway.publish("news", "old")
        await trio.sleep(299)
        reply = await request(
            client, seq, "sub", topic="news", since={"offset": 0, "epoch": first.epoch}
        )
        assert reply["data"]["recovered"] is True
        assert offsets(await msgs(client, 1)) == [1]
        await request(client, seq, "unsub", topic="news")
        await trio.sleep(1)  # 300 s after the publication: gone, and nobody follows the topic
        reply = await request(
            client, seq, "sub", topic="news", since={"offset": 0, "epoch": first.epoch}
        )
        assert reply["data"]["recovered"] is False
        assert reply["data"]["epoch"] != first.epoch
        assert reply["data"]["offset"] == 0


class RacingBroker(MemoryBroker):
    """A memory broker whose history read is slow, with publications racing it."""

    def __init__(self) -> None:
        super().__init__()
        self.during: Callable[[], Awaitable[None]] | None = None
        self.after: Callable[[], Awaitable[None]] | None = None

    async def history(self, topic: str, since: int | None = None) -> History:
        if self.during is not None:
            await self.during()  # live and in the history: must not be sent twice
        history = await super().history(topic, since)
        if self.after is not None:
            await self.after()  # live only, after the history was read: must not be lost
        return history


async def test_publications_racing_a_subscription_are_neither_lost_nor_doubled(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    broker = RacingBroker()
    server = Server(make_gateway(), open_server(make_server).config, broker)
    gateway = server.gateway
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        for i in range(1, 4):
            first = await gateway.publish("news", i)

        async def publish(values: range) -> None:
            for value in values:
                await gateway.publish("news", value)
                await trio.lowlevel.checkpoint()

        broker.during = lambda: publish(range(4, 7))
        broker.after = lambda: publish(range(7, 10))
        seq = Seq()
        reply = await request(
            client, seq, "sub", topic="news", since={"offset": 1, "epoch": first.epoch}
        )
        broker.during = broker.after = None
        assert reply["data"]["recovered"] is True
        await gateway.publish("news", 10)
        got = await msgs(client, 9)
        assert [(m["offset"], m["data"]) for m in got] == [(i, i) for i in range(2, 11)]
        await trio.testing.wait_all_tasks_blocked()
        assert not [m for m in client.received if m["type"] == "msg"]
        # The reply's offset says how far the messages before it went.
        assert reply["data"]["offset"] == 9


async def test_unsubscribe_stops_delivery_and_is_idempotent(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = open_server(make_server)
    gateway = server.gateway
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        welcome = await client.hello()
        session = server.hub.sessions[welcome["session"]]
        seq = Seq()
        await request(client, seq, "sub", topic="news")
        assert list(await gateway.presence("news")) == [session.id]
        await gateway.publish("news", 1)
        for _ in range(2):  # unsubscribing twice is no error
            reply = await request(client, seq, "unsub", topic="news")
            assert "error" not in reply
            assert "data" not in reply
        assert offsets(await msgs(client, 1)) == [1]
        await gateway.publish("news", 2)
        await trio.testing.wait_all_tasks_blocked()
        assert not [m for m in client.received if m["type"] == "msg"]
        assert await gateway.presence("news") == {}
        assert "news" not in server.hub.topics


async def test_presence_follows_sessions_not_connections(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    gateway = make_gateway()
    gateway.authenticate(JwtAuthenticator(secret=SECRET, clock=now))
    server = make_server(gateway, allow_subscribe=("room:*",))
    async with running(server) as nursery:
        async with (
            open_memory_connection(server, nursery) as ada,
            open_memory_connection(server, nursery) as bob,
        ):
            a = await ada.hello(token=token("ada"))
            b = await bob.hello(token=token("bob"))
            await request(ada, Seq(), "sub", topic="room:1")
            await request(bob, Seq(), "sub", topic="room:1")
            assert await gateway.presence("room:1") == {a["session"]: "ada", b["session"]: "bob"}
            await bob.send({"type": "bye"})
            await bob.wait_closed()
            await trio.testing.wait_all_tasks_blocked()
            assert await gateway.presence("room:1") == {a["session"]: "ada"}
        # ada's connection dropped without bye: her session, detached, is still there.
        await trio.testing.wait_all_tasks_blocked()
        assert await gateway.presence("room:1") == {a["session"]: "ada"}
        assert await gateway.presence("user:ada") == {a["session"]: "ada"}
        await trio.sleep(server.config.resume_ttl or 0)
        assert await gateway.presence("room:1") == {}


async def test_send_to_user_reaches_every_device_and_kick_ends_them(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    gateway = make_gateway()
    gateway.authenticate(JwtAuthenticator(secret=SECRET, clock=now))
    server = make_server(gateway)
    async with (
        running(server) as nursery,
        open_memory_connection(server, nursery) as phone,
        open_memory_connection(server, nursery) as laptop,
        open_memory_connection(server, nursery) as other,
    ):
        p = await phone.hello(token=token("ada"))
        await laptop.hello(token=token("ada"))
        o = await other.hello(token=token("bob"))
        publication = await gateway.send_to_user("ada", {"hi": 1}, event="dm")
        assert (publication.topic, publication.offset) == ("user:ada", 1)
        for device in (phone, laptop):
            (dm,) = await msgs(device, 1)
            assert (dm["topic"], dm["event"], dm["data"], dm["offset"]) == (
                "user:ada",
                "dm",
                {"hi": 1},
                1,
            )
        assert await gateway.kick(session=p["session"]) == 1
        assert await phone.wait_closed() == (4005, "kicked")
        assert await gateway.kick(user="ada") == 1
        assert await laptop.wait_closed() == (4005, "kicked")
        await trio.testing.wait_all_tasks_blocked()
        assert set(server.hub.sessions) == {o["session"]}
        assert "ada" not in server.hub.users
        assert await gateway.kick(user="nobody") == 0
        with pytest.raises(ValueError, match="a user or a session"):
            await gateway.kick()


async def test_a_detached_session_gets_its_publications_on_resume(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = open_server(make_server)
    gateway = server.gateway
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as client:
            first = await client.hello()
            await request(client, Seq(), "sub", topic="news")
        await trio.testing.wait_all_tasks_blocked()
        for i in range(3):
            await gateway.publish("news", i)
        async with open_memory_connection(server, nursery) as client:
            resume = {"session": first["session"], "token": first["resume_token"], "ack": 1}
            welcome = await client.hello(resume=resume)
            assert welcome["resumed"] is True
            assert offsets(await msgs(client, 3)) == [1, 2, 3]


async def test_server_side_subscriptions_from_a_hook(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    gateway = make_gateway()

    @gateway.on_connect
    async def follow(session: Session) -> None:
        if not session.resumed:
            result = await session.subscribe("announcements")  # no authorisation asked
            session.send("subscribed", result.to_data())

    server = make_server(gateway)
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        told = await client.recv_type("msg")
        assert told["event"] == "subscribed"
        await gateway.publish("announcements", "hello all")
        (got,) = await msgs(client, 1)
        assert (got["topic"], got["data"]) == ("announcements", "hello all")


async def test_fan_out_encodes_the_data_once_per_encoding(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    for codec in (JsonCodec, MsgpackCodec):
        original = codec.prepare

        def counting(self: Any, fields: dict[str, Any], original: Any = original) -> bytes:
            calls.append(self.subprotocol)
            return bytes(original(self, fields))

        monkeypatch.setattr(codec, "prepare", counting)
    server = open_server(make_server)
    async with running(server) as nursery:
        clients = []
        for i in range(40):
            kind = [MSGPACK_SUBPROTOCOL] if i % 2 else None
            client = await nursery.start(_subscriber, server, nursery, kind)
            clients.append(client)
        calls.clear()
        await server.gateway.publish("news", {"big": "x" * 1000})
        for client in clients:
            (got,) = await msgs(client, 1)
            assert got["data"] == {"big": "x" * 1000}
        assert sorted(calls) == ["wsgate.v1.json", "wsgate.v1.msgpack"]
        nursery.cancel_scope.cancel()


async def _subscriber(
    server: Server,
    nursery: trio.Nursery,
    subprotocols: list[str] | None,
    task_status: trio.TaskStatus[RawClient],
) -> None:
    options: dict[str, Any] = {} if subprotocols is None else {"subprotocols": subprotocols}
    async with open_memory_connection(server, nursery, **options) as client:
        await client.hello()
        await request(client, Seq(), "sub", topic="news")
        task_status.started(client)
        await trio.sleep_forever()


async def test_welcome_of_a_new_session_says_where_its_user_topic_starts(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    # docs/protocol.md §2 and §6: welcome.user_topic is the recovery starting point of
    # user:<sub>, so that a client needs no sub at start to learn the topic's epoch.
    gateway = make_gateway()
    gateway.authenticate(JwtAuthenticator(secret=SECRET, clock=now))
    server = make_server(gateway)
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as first:
            welcome = await first.hello(token=token("ada"))
            start = welcome["user_topic"]
            assert (start["topic"], start["offset"]) == ("user:ada", 0)
            await first.send({"type": "bye"})
        for text in ("one", "two"):  # sent while ada has no session at all
            await gateway.send_to_user("ada", text)
        async with open_memory_connection(server, nursery) as second:
            welcome = await second.hello(token=token("ada"))
            assert welcome["user_topic"] == {
                "topic": "user:ada",
                "offset": 2,
                "epoch": start["epoch"],
            }
            # A client that lost the first session recovers from the first start point.
            reply = await request(second, Seq(), "sub", topic="user:ada", since=start)
            assert reply["data"]["recovered"] is True
            assert [m["data"] for m in second.received if m["type"] == "msg"] == ["one", "two"]
            resume = {"session": welcome["session"], "token": welcome["resume_token"], "ack": 0}
        async with open_memory_connection(server, nursery) as third:
            resumed = await third.hello(token=token("ada"), resume=resume)
            assert resumed["resumed"] is True
            assert "user_topic" not in resumed  # the client has its own position
    anonymous = make_server()
    async with running(anonymous) as nursery, open_memory_connection(anonymous, nursery) as guest:
        assert "user_topic" not in await guest.hello()  # no user, no user topic


class _RoundTripBroker(MemoryBroker):
    """The in-memory broker, whose history comes after a round trip (as Redis's);
    ``meanwhile`` runs once, during the next one."""

    meanwhile: Callable[[], Awaitable[Any]] | None = None

    async def history(self, topic: str, since: int | None = None) -> History:
        found = await super().history(topic, since)
        meanwhile, self.meanwhile = self.meanwhile, None
        if meanwhile is not None:
            await meanwhile()
        await trio.sleep(0.01)
        return found


async def test_a_new_sessions_user_topic_starts_before_what_came_while_it_was_read(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Found by a hostile review (version 1, a broker with a round trip): what was sent
    to the user while the new session read the user topic's history was counted in
    welcome.user_topic, yet came after the welcome, so a client (both of this
    project's) dropped it as already seen."""
    gateway = make_gateway()
    gateway.authenticate(JwtAuthenticator(secret=SECRET, clock=now))
    server = make_server(gateway)
    server.hub.broker = broker = _RoundTripBroker()
    broker.bind(server.hub._receive, server.hub._on_control)
    async with running(server) as nursery:
        await gateway.send_to_user("ada", "before")  # offset 1
        # Offset 2, while the new session reads the user topic's history.
        broker.meanwhile = lambda: gateway.send_to_user("ada", "during")
        async with open_memory_connection(server, nursery) as client:
            welcome = await client.hello(token=token("ada"))
            assert welcome["user_topic"]["offset"] == 1
            during = await client.recv_type("msg")
            assert (during["offset"], during["data"]) == (2, "during")
            await client.close()


async def test_a_recovery_reads_nothing_from_before_a_grant_made_with_since(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Found by a hostile review (version 2): an application that subscribed a session
    to a topic it may not subscribe to itself, with since, recorded no floor, and the
    client's recover read the whole history from before the grant (§14: nothing from
    before that subscription)."""
    from trio_wsgate.protocol import Since

    gateway = make_gateway()
    server = make_server(gateway)

    @gateway.on_connect
    async def grant(session: Session) -> None:
        now = await server.hub.broker.history("private", None)
        await session.subscribe("private", Since(now.offset, now.epoch))  # from now on

    async with running(server) as nursery:
        for i in range(5):
            last = await gateway.publish("private", f"secret {i}")
        async with open_memory_connection(server, nursery, subprotocols=["wsgate.v2.json"]) as c:
            await c.hello()
            since = {"offset": 0, "epoch": last.epoch}
            await c.send(
                {"type": "sub", "seq": 1, "topic": "private", "recover": True, "since": since}
            )
            reply = await c.recv()  # no pub before it
            assert reply["type"] == "reply"
            assert reply["data"]["recovered"] is False
            await c.close()


async def test_the_history_holds_no_more_than_it_counts_with_version_2_subscribers(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Found by a hostile review: the history's copy of a publication shared its dict
    of envelopes with the live one, where version-2 fan-out kept a whole pub per
    subprotocol, uncounted: about twice --history-bytes held. A replay keeps none."""
    server = make_server(allow_subscribe=("t",))
    broker = server.hub.broker
    assert isinstance(broker, MemoryBroker)
    async with (
        running(server) as nursery,
        open_memory_connection(server, nursery, subprotocols=["wsgate.v2.json"]) as a,
        open_memory_connection(server, nursery, subprotocols=["wsgate.v2.msgpack"]) as b,
    ):
        for client in (a, b):
            await client.hello()
            await client.send({"type": "sub", "seq": 1, "topic": "t"})
            await client.recv_type("reply")
        for _ in range(5):
            await server.gateway.publish("t", "x" * 200_000)
        for client in (a, b):
            for _ in range(5):
                await client.recv_type("pub")
        # A recovery replays them from the history: it keeps nothing there either.
        epoch = broker._topics["t"].epoch  # type: ignore[attr-defined]
        since = {"offset": 0, "epoch": epoch}
        await a.send({"type": "sub", "seq": 2, "topic": "t", "recover": True, "since": since})
        await a.recv_type("reply")
        held = 0
        for _, kept, _ in broker._topics["t"].history:  # type: ignore[attr-defined]
            held += sum(len(fields) for fields, _ in kept.encoded.values())
            held += sum(len(v) for v in kept.senders.values() if isinstance(v, bytes))
        assert held <= broker.nbytes
        await a.close()
        await b.close()
