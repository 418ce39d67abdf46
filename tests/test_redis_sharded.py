"""Several Redis instances as one broker (brokers/sharded.py): three real shards.

Each test starts three redis-servers of its own on free ports (they skip without the
binary, and fail under ``WSGATE_REQUIRE_REDIS=1``) and two nodes that list them in the
same order. Topics are picked so that each lands on the shard the test needs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import coredis
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trio_wsgate import Config, Server
from trio_wsgate.brokers.sharded import ShardedBroker, jump_hash, shard_key, shard_name
from trio_wsgate.testing import open_memory_connection

from .helpers import http_get
from .redis_server import RedisServer, redis_binary
from .test_auth import token
from .test_redis import (
    migrate_with_traffic_in_flight,
    node_at,
    park_one,
    resume_parked,
    user,
    users_span_the_nodes,
)
from .test_topics import Seq, msgs, offsets, request

pytestmark = pytest.mark.redis


# -- the hash ------------------------------------------------------------------------


@given(st.integers(0, 2**64 - 1), st.integers(1, 50))
def test_jump_hash_moves_a_key_only_to_a_new_bucket(key: int, buckets: int) -> None:
    before, after = jump_hash(key, buckets), jump_hash(key, buckets + 1)
    assert 0 <= before < buckets
    assert after in (before, buckets)  # it stays, or goes to the bucket just added


def test_jump_hash_spreads_names_evenly() -> None:
    counts = [0, 0, 0]
    for n in range(30_000):
        counts[jump_hash(shard_key(f"room:{n}"), 3)] += 1
    assert all(9_400 < count < 10_600 for count in counts), counts
    assert shard_key("room:1") == shard_key("room:1")  # the same on every node and run


def test_a_shard_is_named_by_its_address_never_its_password() -> None:
    assert shard_name("redis://:hunter2@10.0.0.5:6380/0") == "10.0.0.5:6380"
    assert shard_name("redis://user:pw@cache") == "cache:6379"
    assert shard_name("unix:///run/redis.sock") == "/run/redis.sock"
    assert shard_name("redis+sentinel://:pw@s1:26379,s2:26379/orders?db=1") == "sentinel:orders/1"
    # A password with the characters a URL parser trips on never shows, nor raises.
    assert shard_name("redis://:a/b#c?d@cache:6380/2") == "cache:6380/2"
    assert shard_name("redis://[::1]") == "[::1]:6379"


def test_several_urls_split_where_a_new_one_starts() -> None:
    config = Config(
        redis_url="redis://a:6379/0, redis+sentinel://s1:26379,s2:26379/svc,unix:///r.sock"
    )
    assert config.redis_urls == [
        "redis://a:6379/0",
        "redis+sentinel://s1:26379,s2:26379/svc",
        "unix:///r.sock",
    ]
    assert Config().redis_urls == []


# -- three shards --------------------------------------------------------------------


@pytest.fixture
def shards() -> Iterator[list[RedisServer]]:
    binary = redis_binary()
    servers = [RedisServer(binary) for _ in range(3)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.kill()


def topic_on(shard: int, prefix: str = "room:") -> str:
    """A topic name that lives on ``shard`` of three."""
    return next(
        f"{prefix}{n}" for n in range(1000) if jump_hash(shard_key(f"{prefix}{n}"), 3) == shard
    )


def node(shards: list[RedisServer], name: str, **settings: Any) -> Server:
    settings.setdefault("allow_publish", ("room:*",))
    return node_at(",".join(server.url for server in shards), name, **settings)


@asynccontextmanager
async def sharded(
    shards: list[RedisServer], **settings: Any
) -> AsyncIterator[tuple[trio.Nursery, list[Server]]]:
    settings.setdefault("admin_port", None)
    async with trio.open_nursery() as nursery:
        servers = [node(shards, f"node-{i}", **settings) for i in range(2)]
        for server in servers:
            await nursery.start(server.serve)
        yield nursery, servers
        nursery.cancel_scope.cancel()


async def test_topics_on_every_shard_cross_nodes_with_one_numbering_and_recover(
    shards: list[RedisServer],
) -> None:
    async with sharded(shards) as (nursery, (a, b)):
        assert isinstance(a.hub.broker, ShardedBroker)
        topics = [topic_on(i) for i in range(3)]
        await topics_cross_nodes_and_recover(a, b, nursery, topics)
        # What lives where: each shard holds its own topic's keys, and only those.
        for index, server in enumerate(shards):
            async with coredis.Redis.from_url(server.url) as redis:
                keys = {key.decode() for key in await redis.keys("wsgate:t:room:*:meta")}
            assert keys == {f"wsgate:t:{topics[index]}:meta"}


async def topics_cross_nodes_and_recover(
    a: Server, b: Server, nursery: trio.Nursery, topics: list[str]
) -> None:
    """Ada at ``a`` and Bob at ``b`` follow three topics (each on a different Redis):
    publications from either node reach both, numbered per topic; then Ada, back at
    ``b``, recovers what she missed of each by offset."""
    async with user(a, nursery, "ada") as ada, user(b, nursery, "bob") as bob:
        seq_a, seq_b = Seq(), Seq()
        epochs = {}
        for topic in topics:
            reply = await request(ada, seq_a, "sub", topic=topic)
            epochs[topic] = reply["data"]["epoch"]
            await request(bob, seq_b, "sub", topic=topic)
        for i in range(6):
            topic = topics[i % 3]
            publication = await (a, b)[i % 2].gateway.publish(topic, i)
            assert publication.offset == i // 3 + 1  # each topic numbered by its shard
        for client in (ada, bob):
            got = await msgs(client, 6)
            assert [(m["topic"], m["offset"], m["data"]) for m in got] == [
                (topics[i % 3], i // 3 + 1, i) for i in range(6)
            ]
        await ada.send({"type": "bye"})
    # Each topic's history is on its shard: a client that saw offset 1 recovers.
    for topic in topics:
        await a.gateway.publish(topic, f"missed on {topic}")
    async with user(b, nursery, "ada") as ada:
        seq = Seq()
        for topic in topics:
            since = {"offset": 2, "epoch": epochs[topic]}
            reply = await request(ada, seq, "sub", topic=topic, since=since)
            assert reply["data"]["recovered"] is True
        got = await msgs(ada, 3)
        assert sorted((m["topic"], m["offset"], m["data"]) for m in got) == sorted(
            (topic, 3, f"missed on {topic}") for topic in topics
        )


async def test_send_to_user_presence_kick_and_a_migrating_session_span_the_shards(
    shards: list[RedisServer],
) -> None:
    async with sharded(shards) as (nursery, (a, b)):
        async with users_span_the_nodes(a, b, nursery, topic_on(2)):
            pass  # the user topic, the room and the kick on the shards they hash to
        # Sessions are sharded by id: each of several migrates from a to b.
        for _ in range(4):
            async with open_memory_connection(a, nursery) as old:
                first = await old.hello(token=token("cy"))
                await old.send({"type": "msg", "seq": 1, "event": "echo", "data": "x"})
                await old.recv_type("reply")
                resume = {"session": first["session"], "token": first["resume_token"], "ack": 1}
                async with open_memory_connection(b, nursery) as new:
                    welcome = await new.hello(token=token("cy"), resume=resume)
                    assert welcome["resumed"] is True
                    assert welcome["session"] == first["session"]
                    await new.send({"type": "bye"})
        migrated = b.metrics.registry.get_sample_value(
            "wsgate_resumes_total", {"result": "migrated"}
        )
        taken = b.metrics.registry.get_sample_value(
            "wsgate_resumes_total", {"result": "taken_over"}
        )
        assert (migrated or 0) + (taken or 0) == 4


async def test_a_session_migrates_across_shards_with_traffic_in_flight(
    shards: list[RedisServer],
) -> None:
    # Exactly once through a client that reconnects to the other node.
    async with sharded(shards, heartbeat_interval=None) as (nursery, (a, b)):
        await migrate_with_traffic_in_flight(a, b, nursery)


async def test_a_drained_node_parks_its_sessions_on_their_shards(
    shards: list[RedisServer],
) -> None:
    async with sharded(shards, heartbeat_interval=None, drain_timeout=30) as (nursery, (a, b)):
        first, _, _, before = await park_one(a, nursery)
        await resume_parked(b, nursery, first, before)


async def test_one_shard_down_degrades_only_its_topics(shards: list[RedisServer]) -> None:
    async with sharded(shards, admin_port=0) as (nursery, (a, b)):
        down, up = topic_on(1), topic_on(0)
        async with user(a, nursery, "ada") as ada, user(b, nursery, "bob") as bob:
            seq_a, seq_b = Seq(), Seq()
            for topic in (down, up):
                await request(ada, seq_a, "sub", topic=topic)
            await request(bob, seq_b, "sub", topic=up)
            shards[1].kill()
            with trio.fail_after(15):
                while a.hub.broker.healthy:  # noqa: ASYNC110 - the health check's finding
                    await trio.sleep(0.05)
            health = a.hub.broker_health()
            assert health == {
                shard_name(shards[0].url): True,
                shard_name(shards[1].url): False,
                shard_name(shards[2].url): True,
            }
            registry = a.metrics.registry
            name = shard_name(shards[1].url)
            assert registry.get_sample_value("wsgate_broker_up", {"shard": name}) == 0
            other = shard_name(shards[0].url)
            assert registry.get_sample_value("wsgate_broker_up", {"shard": other}) == 1
            host, port = a.admin_addresses[0]
            status, _, body = await http_get(port, "/readyz", host)
            assert status == 200
            assert f"degraded: the broker is unreachable (shards {name})" in body.decode()
            # The other shards' topics go on, across both nodes.
            for i in range(3):
                await b.gateway.publish(up, i)
            got = await msgs(bob, 3)
            assert [m["data"] for m in got] == [0, 1, 2]
            reply = await request(ada, seq_a, "pub", topic=down, data="lost?")
            assert reply["error"]["code"] == "unavailable"
            shards[1].start()  # empty: the topic starts a new epoch there
            with trio.fail_after(15):
                while not a.hub.broker.healthy:  # noqa: ASYNC110 - the health check's finding
                    await trio.sleep(0.05)
            publication = await a.gateway.publish(down, "back")
            assert publication.offset == 1
            got = await msgs(ada, 4)
            assert [(m["topic"], m["data"]) for m in got] == [
                (up, 0),
                (up, 1),
                (up, 2),
                (down, "back"),
            ]
            assert offsets(got[:3]) == [1, 2, 3]


async def test_a_shard_down_at_drain_leaves_the_other_shards_sessions_parked(
    shards: list[RedisServer],
) -> None:
    # Parking goes shard by shard: those that answer take their sessions (which then
    # resume on another node), the one that does not leaves its own on the draining
    # node, and no session is both parked and kept.
    async with sharded(shards, heartbeat_interval=None, drain_timeout=2) as (nursery, (a, b)):
        await drain_with_one_down(
            a,
            b,
            nursery,
            where=lambda session: jump_hash(shard_key(session), 3),
            kill=lambda index: shards[index].kill(),
        )


async def drain_with_one_down(
    a: Server,
    b: Server,
    nursery: trio.Nursery,
    where: Callable[[str], int],
    kill: Callable[[int], None],
) -> None:
    """Nine sessions at ``a``; the Redis instance holding most of them (``where`` names
    a session's, ``kill`` kills one) is killed, then ``a`` drains: the sessions of the
    other instances are parked and resume at ``b``, the dead one's are not parked."""
    welcomes = []
    async with trio.open_nursery() as clients:
        for _ in range(9):
            welcomes.append(await clients.start(_hold, a))
        on = [where(w["session"]) for w in welcomes]
        dead = max(set(on), key=on.count)
        assert len(set(on)) > 1, on  # 9 sessions over 3 instances: they spread
        kill(dead)
        with trio.fail_after(15):
            while a.hub.broker.healthy:  # noqa: ASYNC110 - the health check's finding
                await trio.sleep(0.05)
        with trio.fail_after(30):
            await a.drain()
        clients.cancel_scope.cancel()
    parked = a.metrics.registry.get_sample_value(
        "wsgate_sessions_migrated_total", {"direction": "parked"}
    )
    assert parked == sum(1 for index in on if index != dead)
    for welcome, index in zip(welcomes, on, strict=True):
        if index == dead:
            continue
        async with open_memory_connection(b, nursery) as new:
            resume = {"session": welcome["session"], "token": welcome["resume_token"], "ack": 0}
            back = await new.hello(token=token("ada"), resume=resume)
            assert back["resumed"] is True


async def _hold(server: Server, task_status: trio.TaskStatus[dict[str, Any]]) -> None:
    """A client of ``server`` that says hello and stays, until its node drains it."""
    async with trio.open_nursery() as nursery, open_memory_connection(server, nursery) as client:
        task_status.started(await client.hello(token=token("ada")))
        await client.wait_closed()
