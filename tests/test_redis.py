"""Several nodes through one real Redis act as one gateway.

docs/protocol.md §6 and docs/architecture.md, "Session migration".
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import coredis
import msgpack
import pytest
import trio
from trio.testing import MockClock

from trio_wsgate import BrokerUnavailable, Config, JwtAuthenticator, Server
from trio_wsgate.brokers.base import History, Publication
from trio_wsgate.brokers.redis import _PUBLISH, RedisBroker, _Position
from trio_wsgate.testing import RawClient, open_memory_connection

from .conftest import make_gateway
from .helpers import http_get
from .redis_server import RedisServer
from .test_auth import SECRET, now, token
from .test_topics import Seq, msgs, offsets, request

pytestmark = pytest.mark.redis


def node_at(url: str, name: str, **settings: Any) -> Server:
    """A node with JWT users over the Redis at ``url`` (any form ``--redis`` takes)."""
    gateway = make_gateway()
    gateway.authenticate(JwtAuthenticator(secret=SECRET, clock=now))
    settings.setdefault("allow_subscribe", ("room:*",))
    settings.setdefault("admin_port", None)
    config = Config(port=0, node_id=name, redis_url=url, secret="s" * 32, **settings)
    return Server(gateway, config)


def node(redis: RedisServer, name: str, **settings: Any) -> Server:
    return node_at(redis.url, name, **settings)


@asynccontextmanager
async def cluster(
    redis: RedisServer, count: int = 2, **settings: Any
) -> AsyncIterator[tuple[trio.Nursery, list[Server]]]:
    async with trio.open_nursery() as nursery:
        servers = [node(redis, f"node-{i}", **settings) for i in range(count)]
        for server in servers:
            await nursery.start(server.serve)
        yield nursery, servers
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def user(server: Server, nursery: trio.Nursery, name: str) -> AsyncIterator[RawClient]:
    async with open_memory_connection(server, nursery) as client:
        await client.hello(token=token(name))
        yield client


async def test_publications_cross_nodes_with_one_numbering(redis_server: RedisServer) -> None:
    async with (
        cluster(redis_server) as (nursery, (a, b)),
        user(a, nursery, "ada") as ada,
        user(b, nursery, "bob") as bob,
    ):
        sa = await request(ada, Seq(), "sub", topic="room:1")
        sb = await request(bob, Seq(), "sub", topic="room:1")
        epoch = sa["data"]["epoch"]
        assert sb["data"] == {"offset": 0, "epoch": epoch}
        for i in range(6):
            publication = await (a, b)[i % 2].gateway.publish("room:1", i)
            assert (publication.offset, publication.epoch) == (i + 1, epoch)
        for client in (ada, bob):
            got = await msgs(client, 6)
            assert [(m["offset"], m["data"], m["epoch"]) for m in got] == [
                (i + 1, i, epoch) for i in range(6)
            ]


@asynccontextmanager
async def users_span_the_nodes(
    a: Server, b: Server, nursery: trio.Nursery, room: str
) -> AsyncIterator[RawClient]:
    """Ada on both nodes and Bob on ``b``: send_to_user reaches both of Ada's devices,
    presence in ``room`` shows both users, a kick of Ada closes both; then Bob, still
    following ``room``, for the block."""
    async with (
        user(a, nursery, "ada") as phone,
        user(b, nursery, "ada") as laptop,
        user(b, nursery, "bob") as bob,
    ):
        await b.gateway.send_to_user("ada", "hi", event="dm")
        for device in (phone, laptop):
            (dm,) = await msgs(device, 1)
            assert (dm["topic"], dm["data"], dm["offset"]) == ("user:ada", "hi", 1)
        await request(phone, Seq(), "sub", topic=room)
        await request(bob, Seq(), "sub", topic=room)
        present = await a.gateway.presence(room)
        assert sorted(present.values()) == ["ada", "bob"]
        assert len(await b.gateway.presence("user:ada")) == 2
        assert await b.gateway.kick(user="ada") == 2
        assert await phone.wait_closed() == (4005, "kicked")
        assert await laptop.wait_closed() == (4005, "kicked")
        yield bob


async def test_send_to_user_presence_and_kick_span_the_cluster(
    redis_server: RedisServer,
) -> None:
    async with (
        cluster(redis_server) as (nursery, (a, b)),
        users_span_the_nodes(a, b, nursery, "room:1") as bob,
    ):
        for _ in range(100):  # the kicked sessions leave room:1 on node a's side
            if sorted((await a.gateway.presence("room:1")).values()) == ["bob"]:
                break
            await trio.sleep(0.05)
        assert sorted((await b.gateway.presence("room:1")).values()) == ["bob"]
        bob_session = next(iter(b.hub.users["bob"])).id
        assert await a.gateway.kick(session=bob_session) == 0  # held by b: kicked, not counted
        assert await bob.wait_closed() == (4005, "kicked")


async def test_recovery_on_another_node(redis_server: RedisServer) -> None:
    async with cluster(redis_server) as (nursery, (a, b)):
        async with user(a, nursery, "ada") as ada:
            sub = await request(ada, Seq(), "sub", topic="room:1")
            await a.gateway.publish("room:1", "seen")
            assert offsets(await msgs(ada, 1)) == [1]
            await ada.send({"type": "bye"})
        for i in range(3):
            await a.gateway.publish("room:1", f"missed {i}")
        async with user(b, nursery, "ada") as ada:
            since = {"offset": 1, "epoch": sub["data"]["epoch"]}
            reply = await request(ada, Seq(), "sub", topic="room:1", since=since)
            assert reply["data"]["recovered"] is True
            assert [m["data"] for m in await msgs(ada, 3)] == ["missed 0", "missed 1", "missed 2"]


async def publish_raw(
    redis: Any,
    broker: RedisBroker,
    topic: str,
    data: str,
    *,
    maxlen: int = 100,
    heard: bool = False,
) -> None:
    """The broker's publish script, run on Redis directly: its PUBLISH goes to a channel
    nobody listens to (what pub/sub lost), unless ``heard``; the log keeps ``maxlen``."""
    channel = broker._channel(topic) if heard else "nowhere"
    keys = [broker._meta(topic), broker._log(topic), channel]
    payload = msgpack.packb([None, data])  # [event, data]
    await redis.eval(_PUBLISH, keys=keys, args=["x", payload, maxlen, 60000])


async def test_a_lost_live_message_is_filled_from_the_log(redis_server: RedisServer) -> None:
    """Redis pub/sub is at-most-once: gaps are filled from the topic's log."""
    async with (
        cluster(redis_server, count=1) as (nursery, (a,)),
        user(a, nursery, "ada") as ada,
        coredis.Redis.from_url(redis_server.url) as redis,
    ):
        broker = a.hub.broker
        assert isinstance(broker, RedisBroker)
        broker.sync_interval = 0.2
        await request(ada, Seq(), "sub", topic="room:1")
        await publish_raw(redis, broker, "room:1", "lost 1")
        await publish_raw(redis, broker, "room:1", "lost 2")
        await a.gateway.publish("room:1", "heard")  # reveals the gap at once
        got = await msgs(ada, 3)
        assert [(m["offset"], m["data"]) for m in got] == [
            (1, "lost 1"),
            (2, "lost 2"),
            (3, "heard"),
        ]
        await publish_raw(
            redis, broker, "room:1", "lost 4"
        )  # nothing comes after it: the periodic check finds it
        with trio.fail_after(5):
            (late,) = await msgs(ada, 1)
        assert (late["offset"], late["data"]) == (4, "lost 4")


async def test_chores_while_redis_is_down_still_do_their_local_part(
    redis_server: RedisServer,
) -> None:
    """Found by a review of this fix's first version: chores dropped while Redis was
    down took their local part with them, and the broker's refreshes then kept a left
    topic's presence, and a released session's claim, in Redis for good."""
    async with cluster(redis_server, count=1) as (nursery, (a,)):
        broker = a.hub.broker
        assert isinstance(broker, RedisBroker)
        async with user(a, nursery, "ada") as ada:
            seq = Seq()
            await request(ada, seq, "sub", topic="room:1")
            (session,) = a.hub.sessions.values()
            assert session.id in broker._presence["room:1"]
            broker.healthy = False  # (as the health check says after three lost pings)
            await request(ada, seq, "unsub", topic="room:1")
            await ada.send({"type": "bye"})
            await ada.wait_closed()
        with trio.fail_after(5):
            await a.hub.do_chores()
        assert "room:1" not in broker._presence  # no ghost for the refresh to write
        assert session.id not in broker._owned  # nor a claim refreshed for ever
        broker.healthy = True


async def test_a_new_epochs_first_live_message_brings_those_before_it(
    redis_server: RedisServer,
) -> None:
    """Found by a hostile review, and by the Sentinel failover test in CI: a topic
    that started a new epoch (a failover, a restart without its data) whose first
    live message pub/sub handed over was not its first was delivered at once, and
    those before it in the new epoch were lost here. They come from the log first."""
    async with (
        cluster(redis_server, count=1) as (nursery, (a,)),
        user(a, nursery, "ada") as ada,
        coredis.Redis.from_url(redis_server.url) as redis,
    ):
        broker = a.hub.broker
        assert isinstance(broker, RedisBroker)
        await request(ada, Seq(), "sub", topic="room:1")
        await a.gateway.publish("room:1", "old")
        (old,) = await msgs(ada, 1)
        await redis.delete([broker._meta("room:1"), broker._log("room:1")])  # lost by Redis
        for data in ("new 1", "new 2"):  # the new epoch's first two, not heard here
            await publish_raw(redis, broker, "room:1", data)
        await a.gateway.publish("room:1", "new 3")  # heard: offset 3 of the new epoch
        got = await msgs(ada, 3)
        assert [(m["offset"], m["data"]) for m in got] == [(1, "new 1"), (2, "new 2"), (3, "new 3")]
        assert got[0]["epoch"] != old["epoch"]


async def test_publications_lost_beyond_the_history_end_the_sessions_that_miss_them(
    redis_server: RedisServer,
) -> None:
    """Found by a hostile review: when pub/sub lost more than the history keeps, the
    node filled from the log what it still held and moved on: the subscribers got
    offsets 3, 4, 5... without 1 and 2, and a later recovery said recovered: true.
    Now the session that missed them ends as a moved session whose history is lost
    (1011), and its client, told resumed: false, learns recovered: false."""
    async with (
        cluster(redis_server, count=1, history_size=3) as (nursery, (a,)),
        user(a, nursery, "ada") as ada,
        coredis.Redis.from_url(redis_server.url) as redis,
    ):
        broker = a.hub.broker
        assert isinstance(broker, RedisBroker)
        sub = await request(ada, Seq(), "sub", topic="room:1")
        epoch = sub["data"]["epoch"]
        (session,) = a.hub.sessions.values()
        for i in range(5):  # offsets 1-5, heard by nobody; the log keeps 3-5
            await publish_raw(redis, broker, "room:1", f"to {i}", maxlen=3)
        await a.gateway.publish("room:1", "heard")  # offset 6 reveals the gap
        with trio.fail_after(5):
            code, reason = await ada.wait_closed()
        assert (code, reason) == (1011, "topic history lost: resume")
        assert session.ended
        assert broker.statistics()["gaps"] == 1
        async with open_memory_connection(a, nursery) as again:
            resume = {"session": session.id, "token": session.resume_token, "ack": 1}
            welcome = await again.hello(token=token("ada"), resume=resume)
            assert welcome["resumed"] is False
            since = {"offset": 0, "epoch": epoch}
            reply = await request(again, Seq(), "sub", topic="room:1", since=since)
            assert reply["data"]["recovered"] is False
            assert offsets(await msgs(again, 3)) == [4, 5, 6]  # what the history keeps


async def test_a_node_behind_its_pubsub_is_not_made_to_skip_what_it_holds(
    redis_server: RedisServer,
) -> None:
    """Found by a hostile review: the periodic check filled every topic from its log
    and moved it to the log's end, though the node was only behind, with the rest
    still in its pub/sub: those were then dropped as already delivered, and what
    the log no longer held was lost (3,621 of 6,000 delivered). Only a topic whose
    position has not moved for an interval is filled now."""
    broker = RedisBroker(redis_server.url, history_size=10, sync_interval=0.05)
    got: list[int] = []
    done = trio.Event()

    def slow(publication: Publication) -> None:
        got.append(publication.offset)
        time.sleep(0.004)  # the node's fan-out of it: the node falls behind
        if publication.offset == 300:
            done.set()

    broker.bind(slow)
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.run)
        await broker.subscribe("room:1")
        async with coredis.Redis.from_url(redis_server.url) as redis:
            for i in range(300):
                await publish_raw(redis, broker, "room:1", str(i % 10), maxlen=10, heard=True)
        with trio.fail_after(10):
            await done.wait()
        nursery.cancel_scope.cancel()
    assert got == list(range(1, 301))
    assert broker.statistics()["gaps"] == 0


async def test_a_park_that_went_through_late_makes_the_node_let_go(
    redis_server: RedisServer,
) -> None:
    """Found by a hostile review: a park that timed out was still carried out by
    Redis. The draining node kept its sessions and went on claiming them: its
    refresh wrote itself back as the holder over the node that had resumed one, and
    a third node then got the stale copy (a request processed twice). A refresh now
    claims a session only while its holder key still names this node, or no one and
    no state is parked for it; the node lets go of the others. A session whose client
    is connected here is claimed again whatever Redis says."""
    async with (
        cluster(redis_server, count=2, heartbeat_interval=None) as (nursery, (a, b)),
        coredis.Redis.from_url(redis_server.url, decode_responses=True) as redis,
    ):
        broker = a.hub.broker
        assert isinstance(broker, RedisBroker)
        async with user(a, nursery, "ada") as ada:
            (kept,) = a.hub.sessions.values()
            assert (await request(ada, Seq(), "msg", event="echo", data=1))["data"] == 1
        async with user(a, nursery, "bob") as bob:
            live = next(s for s in a.hub.sessions.values() if s.user == "bob")
            # Redis: ada's session parked (as a late park script leaves it), and bob's
            # holder key naming another node (a failover that lost the last claims).
            state = msgpack.packb(a.hub._export(kept), use_bin_type=True)
            await redis.set(broker._parked_key(kept.id), state, px=60_000)
            await redis.delete([broker._session_key(kept.id)])
            await redis.set(broker._session_key(live.id), "node-x", px=60_000)
            broker._recovered["presence"].set()  # its refresh now, not in 20 s
            for _ in range(100):  # (each try at most 50 ms: 5 s in all)
                holder = await redis.get(broker._session_key(live.id))
                if kept.id not in a.hub.sessions and holder == a.hub.node_id:
                    break
                await trio.sleep(0.05)
            else:
                raise AssertionError("the refresh did not let go, or did not claim again")
            assert kept.id not in broker._owned
            assert await redis.get(broker._session_key(kept.id)) is None  # not claimed back
            assert live.id in a.hub.sessions  # its client is here
            assert (await request(bob, Seq(), "msg", event="echo", data=2))["data"] == 2
        async with open_memory_connection(b, nursery) as again:
            resume = {"session": kept.id, "token": kept.resume_token, "ack": 1}
            welcome = await again.hello(token=token("ada"), resume=resume)
            assert welcome["resumed"] is True
            assert await redis.get(broker._session_key(kept.id)) == b.hub.node_id


async def test_a_hand_over_answered_late_is_left_parked(redis_server: RedisServer) -> None:
    """Found by a hostile review: a holder's answer that came after the asking node
    stopped waiting (2 x close_timeout) left the state under a key of that request,
    which nobody read again: the session was gone. The state is parked now, where
    the asking node's second look, or the client's next resume anywhere, finds it."""
    async with cluster(redis_server, count=2, heartbeat_interval=None, close_timeout=0.2) as (
        nursery,
        (a, b),
    ):
        async with user(a, nursery, "ada") as ada:
            (session,) = a.hub.sessions.values()
            assert (await request(ada, Seq(), "msg", event="echo", data=1))["data"] == 1
        holder = a.hub.broker
        answer = holder.answer_handover

        async def late(request_id: str, to: str, state: dict[str, Any] | None) -> None:
            await trio.sleep(1)  # the asking node waits 0.4 s
            await answer(request_id, to, state)

        holder.answer_handover = late  # type: ignore[method-assign]
        async with open_memory_connection(b, nursery) as again:
            resume = {"session": session.id, "token": session.resume_token, "ack": 1}
            welcome = await again.hello(token=token("ada"), resume=resume)
            assert welcome["resumed"] is False  # b stopped waiting
            await again.send({"type": "bye"})
            await again.wait_closed()
        await trio.sleep(1.5)
        state, _ = await b.hub.broker.find_session(session.id)
        assert state is not None
        assert state["id"] == session.id


def test_a_wait_of_coredis_that_times_out_is_slow_not_lost() -> None:
    """Found by a hostile review: coredis waited 1 s for a subscription's
    acknowledgement, which comes behind whatever the pub/sub holds, then raised the
    builtin TimeoutError, an OSError: the node declared Redis lost, tore its pub/sub
    down and dropped its backlog. Such a wait is as long as any command's now, and
    its TimeoutError is a slow answer, for the caller alone."""
    broker = RedisBroker("redis://127.0.0.1:1", command_timeout=2.0)
    broker.healthy = True
    refused = broker._unavailable(TimeoutError("no acknowledgement of subscription"))
    assert "did not answer within 2.0 s" in str(refused)
    assert broker.healthy
    broker._unavailable(ConnectionRefusedError())  # (while a refused connection is lost)
    assert not broker.healthy


async def test_lost_pubsub_connections_never_use_up_the_commands_connections(
    redis_server: RedisServer,
) -> None:
    """coredis 6.9 keeps a pool slot for each pooled connection that broke while lent
    out, as a pub/sub's is: on the commands' client, 64 such losses left every command
    waiting forever. The pub/sub now has a client of its own per connection; here the
    commands may use 2 connections, and the pub/sub is cut 6 times."""
    received: list[Any] = []
    all_six = trio.Event()

    def receive(publication: Publication) -> None:
        received.append(publication.data)
        if len(received) == 6:
            all_six.set()

    broker = RedisBroker(redis_server.url, health_interval=0.2, max_connections=2)
    broker.bind(receive)
    async with (
        trio.open_nursery() as nursery,
        coredis.Redis.from_url(redis_server.url) as redis,
    ):
        await nursery.start(broker.run)
        await broker.subscribe("t")
        for n in range(6):
            with trio.fail_after(10):  # the node's pub/sub is there again
                while not await redis.client_list(type_=coredis.PureToken.PUBSUB):  # noqa: ASYNC110 - Redis's state
                    await trio.sleep(0.05)
            assert await redis.client_kill(type_=coredis.PureToken.PUBSUB) == 1
            with trio.fail_after(10):
                await broker.publish("t", n)  # waited forever from the third cut on
        broker.sync_interval = 0.2  # what pub/sub missed while cut comes from the log
        with trio.fail_after(10):
            await all_six.wait()
        assert received == list(range(6))
        nursery.cancel_scope.cancel()


async def test_a_topic_followed_while_the_pubsub_opens_again_is_heard_live(
    redis_server: RedisServer,
) -> None:
    """A subscription whose pub/sub was replaced while it read the topic's position (Redis
    came back): the new pub/sub had listed its channels without it, and the topic was
    heard only from the log, every ``sync_interval``. Here that is an hour. Then the
    same for a topic followed after a new pub/sub listed its channels, before it was
    open."""
    heard: list[str] = []
    received = trio.Event()

    def receive(publication: Publication) -> None:
        heard.append(publication.topic)
        received.set()

    broker = RedisBroker(redis_server.url, health_interval=0.2, sync_interval=3600)
    broker.bind(receive)
    history = broker._history
    async with (
        trio.open_nursery() as nursery,
        coredis.Redis.from_url(redis_server.url) as redis,
    ):

        async def history_while_reopened(
            topic: str, since: int | None, until: int | None = None
        ) -> History:
            if since is None:
                old = broker._pubsub
                assert await redis.client_kill(type_=coredis.PureToken.PUBSUB) == 1
                with trio.fail_after(10):
                    while broker._pubsub is None or broker._pubsub is old:  # noqa: ASYNC110
                        await trio.sleep(0.05)
            return await history(topic, since, until)

        await nursery.start(broker.run)
        broker._history = history_while_reopened  # type: ignore[method-assign]
        await broker.subscribe("t")
        broker._history = history  # type: ignore[method-assign]
        await broker.publish("t", "live")
        with trio.fail_after(5):
            await received.wait()

        open_pubsub = broker._open_pubsub

        def open_after_a_follow(listener: Any, channels: list[str]) -> Any:
            broker._positions.setdefault("late", _Position("", 0))  # as subscribe() does
            return open_pubsub(listener, channels)

        broker._open_pubsub = open_after_a_follow  # type: ignore[method-assign]
        old = broker._pubsub
        assert await redis.client_kill(type_=coredis.PureToken.PUBSUB) == 1
        with trio.fail_after(10):
            while broker._pubsub is None or broker._pubsub is old:  # noqa: ASYNC110
                await trio.sleep(0.05)
        await broker.publish("late", "live")
        with trio.fail_after(5):
            while heard[-1] != "late":  # noqa: ASYNC110
                await trio.sleep(0.05)
        broker._open_pubsub = open_pubsub  # type: ignore[method-assign]

        # Listening on the new pub/sub fails: subscribe() does not (the hub would not
        # know to unsubscribe), and the next pub/sub lists the topic.
        listen_to = broker._listen_to

        async def fails_on_a_new_pubsub(pubsub: Any, channel: str) -> None:
            if pubsub is not first:
                raise BrokerUnavailable("no answer")
            await listen_to(pubsub, channel)

        async def history_while_reopened_again(
            topic: str, since: int | None, until: int | None = None
        ) -> History:
            if since is None:
                assert await redis.client_kill(type_=coredis.PureToken.PUBSUB) == 1
                with trio.fail_after(10):
                    while broker._pubsub is None or broker._pubsub is first:  # noqa: ASYNC110
                        await trio.sleep(0.05)
            return await history(topic, since, until)

        first = broker._pubsub
        broker._listen_to = fails_on_a_new_pubsub  # type: ignore[method-assign]
        broker._history = history_while_reopened_again  # type: ignore[method-assign]
        await broker.subscribe("third")
        broker._listen_to, broker._history = listen_to, history  # type: ignore[method-assign]
        with trio.fail_after(10):
            while "third" not in str(await redis.pubsub_channels()):  # noqa: ASYNC110
                await trio.sleep(0.05)
        await broker.publish("third", "live")
        with trio.fail_after(5):
            while heard[-1] != "third":  # noqa: ASYNC110
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


async def test_a_herd_of_resumes_takes_the_states_a_few_at_a_time(
    redis_server: RedisServer,
) -> None:
    # 300 resumes at once: as many takes under way as the broker has connections, the
    # rest waiting their turn (not on the clock: command_timeout counts from the send),
    # and every state taken exactly once.
    broker = RedisBroker(redis_server.url, health_interval=0.2, max_connections=4)
    broker.bind(lambda publication: None)
    under_way = most = 0
    take_now = broker._take_now

    async def counted(script: str, keys: list[str], put_back: str) -> Any:
        nonlocal under_way, most
        under_way += 1
        most = max(most, under_way)
        try:
            return await take_now(script, keys, put_back)
        finally:
            under_way -= 1

    broker._take_now = counted  # type: ignore[method-assign]
    states = [{"id": f"s{i}", "user": None, "outbox": {}, "subscriptions": {}} for i in range(300)]
    found: list[dict[str, Any] | None] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.run)
        await broker.park_sessions([(state, 60.0) for state in states], "a")

        async def resume(session: str) -> None:
            state, _ = await broker.find_session(session)
            found.append(state)

        with trio.fail_after(30):
            async with trio.open_nursery() as herd:
                for state in states:
                    herd.start_soon(resume, state["id"])
        assert 1 < most <= 4
        assert sorted(state["id"] for state in found if state) == sorted(s["id"] for s in states)
        assert await broker.find_session("s0") == (None, None)  # taken: gone from Redis
        nursery.cancel_scope.cancel()


def test_redis_settings_stay_out_of_reprs() -> None:
    config = Config(redis_url="redis://:hunter2@127.0.0.1:6379/0")
    assert "hunter2" not in repr(config)
    assert "hunter2" not in repr(RedisBroker(config.redis_url or ""))


async def test_a_redis_restart_mid_stream_loses_nothing_it_accepted(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Redis killed and restarted: refused publications are refused, accepted ones arrive.

    Redis keeps an append-only file fsynced on every write here: what it acknowledged
    survives the SIGKILL (without it, a publication acknowledged an instant before the
    crash can die with Redis; the topic then starts a new epoch, see docs/operations.md).
    """
    redis_server.kill()
    redis_server.data_dir = str(tmp_path)
    redis_server.start()
    async with (
        cluster(redis_server, allow_publish=("room:*",)) as (nursery, (a, b)),
        user(a, nursery, "ada") as ada,
        user(a, nursery, "bob") as bob,
    ):
        for server in (a, b):
            broker = server.hub.broker
            assert isinstance(broker, RedisBroker)
            broker.sync_interval = broker.health_interval = 0.1
        await request(ada, Seq(), "sub", topic="room:1")
        accepted: list[str] = []
        refused: list[str] = []
        half_way = trio.Event()

        async def publisher() -> None:
            for i in range(60):
                try:
                    await b.gateway.publish("room:1", f"p{i}")
                    accepted.append(f"p{i}")
                except BrokerUnavailable:
                    refused.append(f"p{i}")
                if i == 20:
                    half_way.set()
                await trio.sleep(0.02)

        async with trio.open_nursery() as publishing:
            publishing.start_soon(publisher)
            await half_way.wait()
            redis_server.kill()
            for _ in range(100):
                if a.degraded:
                    break
                await trio.sleep(0.02)
            # Degraded, still ready; local connections still served; pub refused.
            port = a.listen_addresses[0][1]
            status, _, body = await http_get(port, "/readyz")
            assert (status, b"degraded" in body) == (200, True)
            assert a.metrics.registry.get_sample_value("wsgate_broker_up") == 0
            bob_seq = Seq()
            reply = await request(bob, bob_seq, "pub", topic="room:1", data=1)
            assert reply["error"]["code"] == "unavailable"
            reply = await request(bob, bob_seq, "msg", event="echo", data="still here")
            assert reply["data"] == "still here"
            await trio.sleep(0.3)
            redis_server.start()
        assert refused, "the outage refused nothing: it was too short to test anything"
        assert accepted[-1] == "p59"
        got: list[str] = []
        epochs: set[str] = set()
        with trio.fail_after(10):
            while len(set(got) & set(accepted)) < len(accepted):
                message = await ada.recv_type("msg")
                got.append(message["data"])
                epochs.add(message["epoch"])
        assert len(got) == len(set(got)), "a publication arrived twice"
        assert [g for g in got if g in accepted] == accepted  # every one, in order
        assert set(got) <= set(accepted) | set(refused)
        assert len(epochs) == 1  # the topic's history survived: one epoch throughout
        assert not a.degraded
        assert a.metrics.registry.get_sample_value("wsgate_broker_up") == 1


async def test_a_session_migrates_between_live_nodes_with_traffic_in_flight(
    redis_server: RedisServer,
) -> None:
    async with cluster(redis_server, heartbeat_interval=None) as (nursery, (a, b)):
        await migrate_with_traffic_in_flight(a, b, nursery)


async def migrate_with_traffic_in_flight(a: Server, b: Server, nursery: trio.Nursery) -> None:
    """Ada's session, following room:1, resumes at ``b`` while its connection to ``a``
    still looks open, having acknowledged only part of what it saw: every message above
    its ack comes again once, in order, then what was published meanwhile, once."""
    async with open_memory_connection(a, nursery) as old:
        first = await old.hello(token=token("ada"))
        seq = Seq()
        await request(old, seq, "sub", topic="room:1")
        await request(old, seq, "msg", event="push", data=3)  # msgs pushed, then the reply
        for i in range(2):
            await b.gateway.publish("room:1", f"before {i}")
        seen = [await old.recv_type("msg") for _ in range(5)]
        highest = max(m["seq"] for m in seen)
        a.hub.sessions[first["session"]].state["colour"] = "green"
        # The client acks only part of what it saw (the rest is lost with the wire),
        # and sends one more request the server never gets an answer out for.
        acked = highest - 2
        # Resume at node b while the connection to a still looks open.
        async with open_memory_connection(b, nursery) as new:
            resume = {"session": first["session"], "token": first["resume_token"], "ack": acked}
            welcome = await new.hello(token=token("ada"), resume=resume)
            assert welcome["resumed"] is True
            assert welcome["session"] == first["session"]
            assert welcome["ack"] == 2  # both requests were processed at a
            assert await old.wait_closed() == (4006, "session taken over")
            await a.gateway.publish("room:1", "after")  # published at a, after the move
            again = [await new.recv_type("msg") for _ in range(3)]
            # Everything above the client's ack, in order, with the original seqs...
            assert [m["seq"] for m in again[:2]] == [acked + 1, acked + 2]
            assert [m.get("data") for m in again[:2]] == [m.get("data") for m in seen[-2:]]
            # ... then the publication made meanwhile, once, with the next offset.
            assert (again[2]["data"], again[2]["offset"]) == ("after", 3)
            assert again[2]["seq"] == highest + 1
            # The session lives at b now, with its state; a let go of it.
            session = b.hub.sessions[first["session"]]
            assert session.state == {"colour": "green"}
            assert first["session"] not in a.hub.sessions
            assert sorted(session.topics) == ["room:1", "user:ada"]
            assert (await request(new, seq, "msg", event="echo", data=1))["data"] == 1
            await b.gateway.publish("room:1", "later")
            (later,) = await msgs(new, 1)
            assert (later["data"], later["offset"]) == ("later", 4)
    for server, direction in ((a, "out"), (b, "in")):
        assert (
            server.metrics.registry.get_sample_value(
                "wsgate_sessions_migrated_total", {"direction": direction}
            )
            == 1
        )
    assert b.metrics.registry.get_sample_value("wsgate_resumes_total", {"result": "migrated"}) == 1


async def park_one(
    a: Server, nursery: trio.Nursery
) -> tuple[dict[str, Any], Seq, dict[str, Any], dict[str, Any]]:
    """Ada's session on ``a``, following room:1 with one message unacknowledged, left in
    Redis by a's drain: its welcome, its numbering, the sub's reply and that message."""
    async with open_memory_connection(a, nursery) as old:
        first = await old.hello(token=token("ada"))
        seq = Seq()
        sub = await request(old, seq, "sub", topic="room:1")
        await a.gateway.publish("room:1", "before")
        (before,) = await msgs(old, 1)  # not acknowledged: it must come again
        with trio.fail_after(10):
            await a.drain()  # returns once the node has stopped
        assert await old.wait_closed() == (1001, "server draining")
    return first, seq, sub, before


async def resume_parked(
    b: Server, nursery: trio.Nursery, first: dict[str, Any], before: dict[str, Any]
) -> None:
    """Ada's session, parked by :func:`park_one`, resumes on ``b``: the message she
    never acknowledged comes again, with its number."""
    async with open_memory_connection(b, nursery) as new:
        resume = {"session": first["session"], "token": first["resume_token"], "ack": 1}
        welcome = await new.hello(token=token("ada"), resume=resume)
        assert welcome["resumed"] is True
        (again,) = await msgs(new, 1)  # never acknowledged: it comes again
        assert (again["seq"], again["data"]) == (before["seq"], "before")


async def test_a_drain_keeps_time_to_park_the_sessions_of_connections_slow_to_close(
    redis_server: RedisServer,
) -> None:
    """Found by the herd on a machine short of CPU: closing 5,000 connections took most
    of the drain's budget, parking had the same deadline and was cut short, and 3,880
    sessions ended with the process. A connection whose peer never answers the close is
    the same case, on time: with a shared broker the last part of the budget (here half
    of 2 s) is the parking's, and what is still closing then is cut and parked."""
    async with cluster(
        redis_server, heartbeat_interval=None, drain_timeout=2, close_timeout=60
    ) as (nursery, (a, b)):
        async with open_memory_connection(a, nursery) as old:
            first = await old.hello(token=token("ada"))
            started = trio.current_time()
            with trio.fail_after(10):
                await a.drain()  # the client reads nothing: it never answers the close
            assert 1.0 <= trio.current_time() - started < 2.5
        assert not a.hub.sessions
        async with open_memory_connection(b, nursery) as new:
            resume = {"session": first["session"], "token": first["resume_token"], "ack": 0}
            welcome = await new.hello(token=token("ada"), resume=resume)
            assert welcome["resumed"] is True


async def test_a_drained_node_parks_its_sessions_for_the_next_node(
    redis_server: RedisServer,
) -> None:
    # Drain closes the connections with 1001 (sessions kept, docs/protocol.md §8); with a
    # shared broker the node leaves their state in Redis and exits. The node the client
    # comes back to takes it from there: the session resumes with its unacknowledged
    # messages, and publications made after the drain follow without a gap or a double.
    async with cluster(redis_server, heartbeat_interval=None, drain_timeout=30) as (
        nursery,
        (a, b),
    ):
        first, seq, sub, before = await park_one(a, nursery)
        assert not a.hub.sessions
        assert (
            a.metrics.registry.get_sample_value(
                "wsgate_sessions_migrated_total", {"direction": "parked"}
            )
            == 1
        )
        await b.gateway.publish("room:1", "after")
        async with open_memory_connection(b, nursery) as new:
            resume = {
                "session": first["session"],
                "token": first["resume_token"],
                "ack": sub["seq"],
            }
            welcome = await new.hello(token=token("ada"), resume=resume)
            assert (welcome["resumed"], welcome["ack"]) == (True, 1)
            again, after = await msgs(new, 2)
            assert (again["seq"], again["offset"], again["data"]) == (before["seq"], 1, "before")
            assert (after["offset"], after["data"]) == (2, "after")
            assert (await request(new, seq, "msg", event="echo", data=2))["data"] == 2
            assert not new.received  # nothing more than those two
        # Taken: no other node can resume it from Redis a second time.
        assert await b.hub.broker.find_session(first["session"]) == (None, b.hub.node_id)


async def test_a_draining_node_that_cannot_park_stays_to_hand_its_sessions_over(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with cluster(redis_server, heartbeat_interval=None, drain_timeout=30) as (
        nursery,
        (a, b),
    ):

        async def refused(*args: Any) -> None:
            raise BrokerUnavailable("Redis refused the script")

        monkeypatch.setattr(a.hub.broker, "park_sessions", refused)
        async with open_memory_connection(a, nursery) as old:
            first = await old.hello(token=token("ada"))
            seq = Seq()
            assert (await request(old, seq, "msg", event="echo", data=1))["data"] == 1
            drained = trio.Event()

            async def drain() -> None:
                await a.drain()
                drained.set()

            nursery.start_soon(drain)
            assert await old.wait_closed() == (1001, "server draining")
        assert not drained.is_set()  # the session is still a's to hand over
        async with open_memory_connection(b, nursery) as new:
            resume = {"session": first["session"], "token": first["resume_token"], "ack": 1}
            welcome = await new.hello(token=token("ada"), resume=resume)
            assert (welcome["resumed"], welcome["ack"]) == (True, 1)
            assert (await request(new, seq, "msg", event="echo", data=2))["data"] == 2
            with trio.fail_after(10):
                await drained.wait()  # a left as soon as its last session had moved
        assert not a.hub.sessions


async def test_a_hand_over_asked_for_while_parking_finds_the_parked_session(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # b asks a for the session just as a parks it: a answers "not here" only once the
    # state is in Redis, and b takes it from there.
    async with cluster(redis_server, heartbeat_interval=None, drain_timeout=30) as (
        nursery,
        (a, b),
    ):
        park = a.hub.broker.park_sessions
        parking, go = trio.Event(), trio.Event()

        async def held(*args: Any) -> None:
            parking.set()
            await go.wait()
            await park(*args)

        monkeypatch.setattr(a.hub.broker, "park_sessions", held)
        hand_over, asked = a.hub._hand_over_one, trio.Event()

        async def ask(*args: Any) -> None:
            asked.set()
            await hand_over(*args)

        monkeypatch.setattr(a.hub, "_hand_over_one", ask)
        async with open_memory_connection(a, nursery) as old:
            first = await old.hello(token=token("ada"))
            seq = Seq()
            assert (await request(old, seq, "msg", event="echo", data=1))["data"] == 1
            nursery.start_soon(a.drain)
            assert await old.wait_closed() == (1001, "server draining")
        with trio.fail_after(10):
            await parking.wait()
        async with open_memory_connection(b, nursery) as new:
            resume = {"session": first["session"], "token": first["resume_token"], "ack": 1}
            hello: dict[str, Any] = {}
            welcomed = trio.Event()

            async def resume_at_b() -> None:
                hello.update(await new.hello(token=token("ada"), resume=resume))
                welcomed.set()

            nursery.start_soon(resume_at_b)
            with trio.fail_after(10):
                await asked.wait()  # a has the request, and waits for the park
            assert not welcomed.is_set()
            go.set()
            with trio.fail_after(10):
                await welcomed.wait()
            assert (hello["resumed"], hello["ack"]) == (True, 1)
            assert (await request(new, seq, "msg", event="echo", data=2))["data"] == 2


@contextmanager
def frozen(redis: RedisServer) -> Iterator[None]:
    """Redis stopped (SIGSTOP) inside the block: connections stay open, nothing answers."""
    redis.freeze()
    try:
        yield
    finally:
        redis.thaw()


async def test_a_command_redis_is_slow_to_answer_fails_alone(redis_server: RedisServer) -> None:
    # A command past command_timeout is refused (BrokerUnavailable), but the node does
    # not declare Redis lost for it: a busy node or a busy Redis is not a lost one.
    async with cluster(redis_server, count=1, allow_publish=("room:*",)) as (_, (a,)):
        broker = a.hub.broker
        assert isinstance(broker, RedisBroker)
        broker.command_timeout = 0.2
        assert broker.healthy  # a node is ready once its first ping was answered
        with frozen(redis_server):
            with pytest.raises(BrokerUnavailable, match=r"did not answer within 0\.2 s"):
                await a.gateway.publish("room:1", "slow")
            assert broker.healthy
            assert not a.degraded
        broker.command_timeout = 2.0  # what follows is not about slowness
        publication = await a.gateway.publish("room:1", "again")
        # The slow one was published after all, once Redis got to it: only the answer
        # came too late (at-most-once towards the caller who was told it failed).
        assert publication.offset in (1, 2)
        assert broker.healthy
        assert not a.degraded
        assert a.metrics.registry.get_sample_value("wsgate_broker_up") == 1


async def test_a_resume_the_broker_cannot_answer_closes_1011_and_loses_nothing(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The session is parked in Redis by a drained node. A resume at b while Redis does
    # not answer is closed with 1011 (session kept, the client comes back) instead of
    # being answered with a new session; the state Redis handed out after b stopped
    # waiting is parked again, and the next resume gets everything.
    async with cluster(redis_server, heartbeat_interval=None, drain_timeout=30) as (
        nursery,
        (a, b),
    ):
        first, _, sub, before = await park_one(a, nursery)
        broker = b.hub.broker
        assert isinstance(broker, RedisBroker)
        broker.command_timeout = 0.2
        assert broker.healthy  # a node is ready once its first ping was answered
        resume = {"session": first["session"], "token": first["resume_token"], "ack": sub["seq"]}
        parked = f"wsgate:parked:{first['session']}"
        with frozen(redis_server):
            async with open_memory_connection(b, nursery) as new:
                await new.send({"type": "hello", "token": token("ada"), "resume": resume})
                with trio.fail_after(10):
                    code, reason = await new.wait_closed()
            assert (code, reason) == (1011, "session store unreachable: try again")
            assert broker.healthy
            assert not b.degraded
        broker.command_timeout = 2.0  # what follows is not about slowness
        # Redis ran the take once it went on; the answer came to no one: parked again.
        # (The key may still be there before the take runs, late under load: wait for
        # the node to say it parks the state again, then for the key.)
        async with coredis.Redis.from_url(redis_server.url) as check:
            for _ in range(1000):
                if any("parking it again" in r.getMessage() for r in caplog.records):
                    break
                await trio.sleep(0.01)
            for _ in range(1000):
                if await check.pttl(parked) > 0:
                    break
                await trio.sleep(0.01)
            assert 0 < await check.pttl(parked) <= 120_000
        async with open_memory_connection(b, nursery) as new:
            welcome = await new.hello(token=token("ada"), resume=resume)
            assert (welcome["resumed"], welcome["ack"]) == (True, 1)
            (again,) = await msgs(new, 1)
            assert (again["seq"], again["data"]) == (before["seq"], "before")
        registry = b.metrics.registry
        assert registry.get_sample_value("wsgate_resumes_total", {"result": "unavailable"}) == 1
        assert (
            registry.get_sample_value(
                "wsgate_closes_total", {"code": "1011", "reason": "broker_unavailable"}
            )
            == 1
        )


class _Pings:
    """Stands for the health check's Redis client: each ping hangs or fails as told."""

    def __init__(self, broker: RedisBroker, answers: list[str]) -> None:
        self.broker, self.answers = broker, answers
        self.sent: list[tuple[float, bool]] = []  # (when, healthy then)
        self._counted: tuple[int, trio.Event] = (0, trio.Event())

    async def until(self, count: int) -> None:
        """Return once ``count`` pings have been sent."""
        if len(self.sent) < count:
            self._counted = (count, trio.Event())
            await self._counted[1].wait()

    async def ping(self) -> bytes:
        self.sent.append((trio.current_time(), self.broker.healthy))
        if len(self.sent) == self._counted[0]:
            self._counted[1].set()
        answer = self.answers.pop(0) if self.answers else "hang"
        if answer == "refused":
            raise ConnectionRefusedError("refused")
        if answer == "hang":
            await trio.sleep_forever()
        return b"PONG"


async def test_redis_counts_as_lost_after_pings_in_a_row_go_unanswered(
    autojump_clock: MockClock,
) -> None:
    # One ping left unanswered is a busy node or a busy Redis. Only unreachable_after
    # of them in a row (or one refused connection) make the node declare Redis lost.
    broker = RedisBroker("redis://127.0.0.1:1/0", health_interval=1.0, max_backoff=1.0)
    pings = _Pings(broker, ["pong", "hang", "hang", "pong", "hang", "hang", "hang", "pong"])

    @asynccontextmanager
    async def health_client(max_connections: int) -> AsyncIterator[_Pings]:
        yield pings  # the health check's own client: these answers

    broker._new_client = health_client  # type: ignore[assignment,method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(broker._watch_health)
        await trio.sleep(0.5)
        assert broker.healthy
        await pings.until(8)
        # Two unanswered, then an answer: never lost. Three in a row: lost at the third.
        assert [healthy for _, healthy in pings.sent] == [
            False, True, True, True, True, True, True, False,
        ]  # fmt: skip
        # Each ping waits a second for its answer; the pause after one is a second.
        assert [when for when, _ in pings.sent] == [0, 1, 3, 5, 6, 8, 10, 12]
        assert broker.healthy  # the last one answered
        pings.answers[:] = ["refused"]
        await pings.until(9)
        assert not broker.healthy  # a refused connection counts at once
        nursery.cancel_scope.cancel()


async def test_a_node_started_while_redis_is_away_serves_degraded_and_catches_up(
    redis_server: RedisServer,
) -> None:
    # Started once its first ping failed: degraded from the first moment, local
    # connections served; healthy once Redis answers.
    redis_server.kill()
    with trio.fail_after(30):  # it used to hang, its pub/sub retrying to connect
        async with cluster(redis_server, count=1) as (nursery, (a,)):
            broker = a.hub.broker
            assert isinstance(broker, RedisBroker)
            assert a.degraded
            async with user(a, nursery, "ada") as ada:
                reply = await request(ada, Seq(), "msg", event="echo", data="here")
                assert reply["data"] == "here"
            broker.health_interval = broker.max_backoff = 0.1
            redis_server.start()
            for _ in range(1000):  # the node's own pings, over real sockets
                if not a.degraded:
                    break
                await trio.sleep(0.01)
            assert not a.degraded
            # And its pub/sub is back: a publication from here reaches a subscriber.
            async with user(a, nursery, "bob") as bob:
                await request(bob, Seq(), "sub", topic="room:1")
                await a.gateway.publish("room:1", "back")
                (message,) = await msgs(bob, 1)
                assert message["data"] == "back"


async def test_a_command_redis_refuses_fails_alone_and_redis_is_not_lost(
    redis_server: RedisServer,
) -> None:
    # The node's Redis user loses the right to run scripts (an operator's ACL change):
    # a publication is refused (unavailable), Redis does not count as lost, and the
    # node goes on; once the right is back, so are publications.
    def acl(*rules: str) -> None:
        command = ["redis-cli", "-p", str(redis_server.port), "ACL", "SETUSER", "app", *rules]
        subprocess.run(command, check=True, capture_output=True, timeout=10)

    acl("on", ">pw", "~*", "&*", "+@all")
    url = f"redis://app:pw@127.0.0.1:{redis_server.port}/0"
    async with trio.open_nursery() as nursery:
        a = node_at(url, "a")
        await nursery.start(a.serve)
        acl("-eval", "-evalsha")
        with pytest.raises(BrokerUnavailable, match="refused"):
            await a.gateway.publish("room:1", "x")
        assert a.hub.broker.healthy
        acl("+@all")
        publication = await a.gateway.publish("room:1", "y")
        assert publication.offset == 1
        nursery.cancel_scope.cancel()
