"""A Redis Cluster as the broker (brokers/cluster.py): three real primaries.

Each test starts a cluster of its own (three ``redis-server --cluster-enabled yes`` on
free ports, joined by ``redis-cli --cluster create``; they skip without the binary, and
fail under ``WSGATE_REQUIRE_REDIS=1``) and two nodes that name it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import coredis
import pytest
import trio
from coredis._utils import hash_slot

from trio_wsgate import BrokerUnavailable, Server
from trio_wsgate.brokers import cluster
from trio_wsgate.brokers.cluster import ClusterBroker, ClusterUrl, _tag
from trio_wsgate.brokers.redis import _Position
from trio_wsgate.testing import open_memory_connection

from .redis_server import RedisClusterServers, RedisServer, redis_binary
from .test_auth import token
from .test_redis import (
    migrate_with_traffic_in_flight,
    node_at,
    park_one,
    resume_parked,
    user,
    users_span_the_nodes,
)
from .test_redis_sharded import drain_with_one_down, topics_cross_nodes_and_recover
from .test_topics import Seq, msgs, request

pytestmark = pytest.mark.redis


def test_a_cluster_url_names_its_nodes_and_hides_its_credentials() -> None:
    where = ClusterUrl.parse("redis+cluster://app:p%40ss@10.0.0.1:7000,10.0.0.2,[::1]:7002")
    assert where is not None
    assert where.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))
    assert (where.username, where.password) == ("app", "p@ss")
    assert "p@ss" not in repr(where)
    assert ClusterUrl.parse("redis://a:6379") is None
    with pytest.raises(ValueError, match="needs host:port"):
        ClusterUrl.parse("redis+cluster://")
    with pytest.raises(ValueError, match="may not hold"):
        ClusterBroker("redis+cluster://a:7000", prefix="app{1}")


def test_every_key_of_a_name_shares_one_slot_whatever_the_name_holds() -> None:
    broker = ClusterBroker("redis+cluster://a:7000")
    for name in ("room:1", "}{", "{a}", "}", "x}y{z}", "é"):
        keys = [broker._meta(name), broker._log(name), broker._channel(name)]
        keys.append(broker._presence_key(name))
        assert len({hash_slot(key.encode()) for key in keys}) == 1, name
        assert broker._topic_of(broker._channel(name).encode()) == name
        session = [broker._session_key(name), broker._parked_key(name)]
        assert len({hash_slot(key.encode()) for key in session}) == 1, name
    # Names spread over the slots (a tag is a hash, not the name).
    assert len({hash_slot(_tag(f"room:{n}").encode()) for n in range(100)}) > 90


def test_the_watchdog_wants_the_channels_of_the_topics_followed_now(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = ClusterBroker("redis+cluster://a:7000")
    positions = broker._positions

    def wanted() -> set[bytes]:
        return {broker._control_channel.encode()} | {
            broker._channel(topic).encode() for topic in positions
        }

    for n in range(50):
        positions[f"user:{n}"] = _Position("e", n)
    assert broker._wanted_channels() == wanted()
    # Each topic's name is hashed once, not at every check.
    expected = wanted()
    hashed: list[str] = []
    monkeypatch.setattr(cluster, "_tag", lambda name: hashed.append(name) or _tag(name))
    assert broker._wanted_channels() == expected
    assert hashed == []
    # Topics no longer followed are forgotten; a new one is hashed once.
    for n in range(10):
        del positions[f"user:{n}"]
    positions["room:new"] = _Position("e", 0)
    got = broker._wanted_channels()
    assert hashed == ["room:new"]
    monkeypatch.undo()
    assert got == wanted()
    assert set(broker._channel_names) == set(positions)


@pytest.fixture
def redis_cluster() -> Iterator[RedisClusterServers]:
    # A primary that stops answering is failed over within 2 s.
    servers = RedisClusterServers(redis_binary(), node_timeout_ms=1000)
    try:
        servers.start()
        yield servers
    finally:
        servers.kill()


def node(where: RedisClusterServers, name: str, **settings: Any) -> Server:
    settings.setdefault("allow_publish", ("room:*",))
    return node_at(where.url, name, **settings)


@asynccontextmanager
async def nodes(
    where: RedisClusterServers, **settings: Any
) -> AsyncIterator[tuple[trio.Nursery, list[Server]]]:
    async with trio.open_nursery() as nursery:
        servers = [node(where, f"node-{i}", **settings) for i in range(2)]
        for server in servers:
            await nursery.start(server.serve)
        yield nursery, servers
        nursery.cancel_scope.cancel()


async def slot_owners(where: RedisClusterServers) -> dict[int, int]:
    """Which of ``where.nodes`` (by index) holds each slot."""
    ports = {server.port: index for index, server in enumerate(where.nodes)}
    async with coredis.Redis(port=where.nodes[0].port) as redis:
        ranges = await redis.cluster_slots()
    owners: dict[int, int] = {}
    for (first, last), (primary, *_) in ranges.items():
        for slot in range(first, last + 1):
            owners[slot] = ports[int(primary["port"])]
    return owners


def topic_on(owners: dict[int, int], index: int, prefix: str = "room:") -> str:
    """A topic name whose slot is on primary ``index``."""
    return next(f"{prefix}{n}" for n in range(10_000) if owners[slot_of(f"{prefix}{n}")] == index)


def slot_of(topic: str) -> int:
    return hash_slot(_tag(topic).encode())


async def test_topics_on_every_primary_cross_nodes_with_one_numbering_and_recover(
    redis_cluster: RedisClusterServers,
) -> None:
    owners = await slot_owners(redis_cluster)
    topics = [topic_on(owners, i) for i in range(3)]
    async with nodes(redis_cluster) as (nursery, (a, b)):
        assert isinstance(a.hub.broker, ClusterBroker)
        await topics_cross_nodes_and_recover(a, b, nursery, topics)
    # Each primary holds its own topic's keys, and only those.
    for index, server in enumerate(redis_cluster.nodes):
        async with coredis.Redis(port=server.port) as redis:
            keys = {key.decode() for key in await redis.keys("wsgate:t:*}room:*:meta")}
        assert keys == {ClusterBroker("redis+cluster://x:1")._meta(topics[index])}


async def test_send_to_user_presence_kick_and_a_migrating_session_span_the_cluster(
    redis_cluster: RedisClusterServers,
) -> None:
    owners = await slot_owners(redis_cluster)
    async with nodes(redis_cluster) as (nursery, (a, b)):
        async with users_span_the_nodes(a, b, nursery, topic_on(owners, 2)):
            pass
        for _ in range(4):
            async with open_memory_connection(a, nursery) as old:
                first = await old.hello(token=token("cy"))
                await old.send({"type": "msg", "seq": 1, "event": "echo", "data": "x"})
                await old.recv_type("reply")
                resume = {"session": first["session"], "token": first["resume_token"], "ack": 1}
                async with open_memory_connection(b, nursery) as new:
                    welcome = await new.hello(token=token("cy"), resume=resume)
                    assert welcome["resumed"] is True
                    await new.send({"type": "bye"})


async def test_a_drained_node_parks_its_sessions_in_the_cluster(
    redis_cluster: RedisClusterServers,
) -> None:
    async with nodes(redis_cluster, heartbeat_interval=None, drain_timeout=30) as (
        nursery,
        (a, b),
    ):
        first, _, _, before = await park_one(a, nursery)
        await resume_parked(b, nursery, first, before)


async def test_a_session_migrates_between_nodes_with_traffic_in_flight(
    redis_cluster: RedisClusterServers,
) -> None:
    async with nodes(redis_cluster, heartbeat_interval=None) as (nursery, (a, b)):
        await migrate_with_traffic_in_flight(a, b, nursery)


class Traffic:
    """Publications of one topic from node ``a``, numbered 0, 1, 2...; and what a
    subscriber at node ``b`` receives."""

    def __init__(self, a: Server, topic: str) -> None:
        self.a, self.topic = a, topic
        self.accepted: list[int] = []
        self.offsets: list[int] = []
        self.refused = 0
        self.got: list[dict[str, Any]] = []

    @classmethod
    async def start(
        cls, a: Server, topic: str, client: Any, nursery: trio.Nursery, publications: int
    ) -> Traffic:
        """``client`` (at the other node) follows ``topic``, received in the background,
        and ``publications`` are published from ``a``."""
        await request(client, Seq(), "sub", topic=topic)
        traffic = cls(a, topic)
        nursery.start_soon(traffic.receive, client)
        for _ in range(publications):
            await traffic.publish()
        return traffic

    async def publish(self) -> None:
        n = len(self.accepted) + self.refused
        try:
            publication = await self.a.gateway.publish(self.topic, n)
        except BrokerUnavailable:
            self.refused += 1
        else:
            self.accepted.append(n)
            self.offsets.append(publication.offset)

    async def receive(self, client: Any) -> None:
        while True:
            self.got.extend(await msgs(client, 1))

    async def received_all(self) -> None:
        with trio.fail_after(15):
            while [m["data"] for m in self.got[-1:]] != self.accepted[-1:]:  # noqa: ASYNC110
                await trio.sleep(0.02)

    def check(self, epochs: int = 1) -> None:
        """Every publication accepted reached the subscriber once, in order, and each
        of the ``epochs`` numbered them from 1 without a gap."""
        assert [m["data"] for m in self.got] == self.accepted
        assert [m["offset"] for m in self.got] == self.offsets
        seen = list(dict.fromkeys(m["epoch"] for m in self.got))
        assert len(seen) == epochs
        for epoch in seen:
            offsets = [m["offset"] for m in self.got if m["epoch"] == epoch]
            assert offsets == list(range(1, len(offsets) + 1))


async def test_a_slot_moved_during_traffic_loses_nothing(
    redis_cluster: RedisClusterServers,
) -> None:
    # `redis-cli --cluster reshard` moves the lowest slots of the primary it takes
    # them from: the topic is one of those, so it moves while it is published to.
    owners = await slot_owners(redis_cluster)
    lowest = min(slot for slot, owner in owners.items() if owner == 1)
    topic = next(
        f"room:{n}" for n in range(100_000) if lowest <= slot_of(f"room:{n}") < lowest + 50
    )
    async with nodes(redis_cluster) as (nursery, (a, b)), user(b, nursery, "bob") as bob:
        for server in (a, b):
            # No periodic catching up: what reaches bob after the move reaches him
            # because the watchdog subscribed again on the slot's new primary.
            server.hub.broker.sync_interval = 3600  # type: ignore[attr-defined]
        traffic = await Traffic.start(a, topic, bob, nursery, publications=20)
        ids = [await _node_id(server) for server in redis_cluster.nodes]
        source, target = redis_cluster.nodes[1], redis_cluster.nodes[2]
        reshard = [
            "redis-cli",
            "--cluster",
            "reshard",
            f"127.0.0.1:{source.port}",
            "--cluster-from",
            ids[1],
            "--cluster-to",
            ids[2],
            "--cluster-slots",
            "50",
            "--cluster-yes",
        ]
        async with trio.open_nursery() as moving:
            done = trio.Event()

            async def move() -> None:
                await trio.run_process(reshard, capture_stdout=True, capture_stderr=True)
                done.set()

            moving.start_soon(move)
            with trio.fail_after(60):
                while not done.is_set():
                    await traffic.publish()
                    # A slot on the move is no outage: neither node counts Redis lost.
                    assert a.hub.broker.healthy
                    assert b.hub.broker.healthy
                    await trio.sleep(0.005)
        assert (await slot_owners(redis_cluster))[slot_of(topic)] == 2  # it did move
        for _ in range(20):
            await traffic.publish()
        await traffic.received_all()
        traffic.check()
        # A subscriber new to the topic at the node that never followed it: its
        # SSUBSCRIBE goes to the slot's new primary at once.
        async with user(a, nursery, "cy") as cy:
            await request(cy, Seq(), "sub", topic=topic)
            await traffic.publish()
            (got,) = await msgs(cy, 1)
            assert got["data"] == traffic.accepted[-1]
        await traffic.received_all()
        traffic.check()
        assert a.hub.broker.healthy
        assert b.hub.broker.healthy
        assert traffic.accepted[-20:] == list(
            range(traffic.accepted[-1] - 19, traffic.accepted[-1] + 1)
        )
        # Both nodes listen on the slot's new primary, and none on the old one.
        channel = b.hub.broker._channel(topic)  # type: ignore[attr-defined]
        assert await subscribers(target, channel) == 2  # a (for cy) and b (for bob)
        assert await subscribers(source, channel) == 0


async def subscribers(server: Any, channel: str) -> int:
    """How many connections ``server`` has subscribed to the shard channel."""
    async with coredis.Redis(port=server.port) as redis:
        counts = await redis.pubsub_shardnumsub(channel)
    return int(counts[channel.encode()])


async def _node_id(server: Any) -> str:
    async with coredis.Redis(port=server.port) as redis:
        return (await redis.cluster_myid()).decode()


async def test_a_primary_killed_and_restarted_loses_nothing_it_accepted(
    redis_cluster: RedisClusterServers, tmp_path: Any
) -> None:
    owners = await slot_owners(redis_cluster)
    topic = topic_on(owners, 0)
    primary = redis_cluster.nodes[0]
    # It keeps what it acknowledged (an append-only file fsynced on every write).
    primary.data_dir = str(tmp_path)
    primary.kill()
    primary.start()
    redis_cluster.wait_ok()
    async with nodes(redis_cluster) as (nursery, (a, b)), user(b, nursery, "bob") as bob:
        traffic = await Traffic.start(a, topic, bob, nursery, publications=10)
        primary.kill()
        with trio.fail_after(15):
            while a.hub.broker.healthy:
                await traffic.publish()
                await trio.sleep(0.05)
        await traffic.publish()
        assert traffic.refused  # its topics are unavailable while it is down
        primary.start()
        with trio.fail_after(30):
            while not (a.hub.broker.healthy and b.hub.broker.healthy):  # noqa: ASYNC110
                await trio.sleep(0.05)
        with trio.fail_after(30):
            while len(traffic.accepted) < 30:
                await traffic.publish()
                await trio.sleep(0.01)
        await traffic.received_all()
        # Restarted from its own file, the primary goes on with its numbering.
        traffic.check()


async def topic_with_replica(
    redis_cluster: RedisClusterServers,
) -> tuple[str, RedisServer, RedisServer]:
    """A topic whose slot the first primary holds, that primary, and a replica of it."""
    primary = redis_cluster.nodes[0]
    topic = topic_on(await slot_owners(redis_cluster), 0)
    return topic, primary, redis_cluster.add_replica(primary)


async def test_a_failover_during_traffic_is_followed_and_starts_a_new_epoch(
    redis_cluster: RedisClusterServers,
) -> None:
    topic, _, replica = await topic_with_replica(redis_cluster)
    async with nodes(redis_cluster) as (nursery, (a, b)), user(b, nursery, "bob") as bob:
        for server in (a, b):  # no periodic catching up: the watchdog must follow
            server.hub.broker.sync_interval = 3600  # type: ignore[attr-defined]
        traffic = await Traffic.start(a, topic, bob, nursery, publications=20)
        async with coredis.Redis(port=replica.port) as redis:
            await redis.cluster_failover()  # the replica takes over, in step with it
        with trio.fail_after(20):
            while (await slot_owners(redis_cluster)).get(slot_of(topic)) != len(
                redis_cluster.nodes
            ) - 1:
                await traffic.publish()
                await trio.sleep(0.02)
        for _ in range(20):
            await traffic.publish()
        assert traffic.accepted[-1] == len(traffic.accepted) + traffic.refused - 1
        await traffic.received_all()
        # The promoted replica numbered its first publication in a new epoch.
        traffic.check(epochs=2)
        channel = b.hub.broker._channel(topic)  # type: ignore[attr-defined]
        with trio.fail_after(10):  # b listens on the promoted replica (once rebuilt)
            while await subscribers(replica, channel) != 1:  # noqa: ASYNC110
                await trio.sleep(0.1)


async def test_a_primary_killed_is_replaced_by_its_replica_and_the_nodes_follow(
    redis_cluster: RedisClusterServers,
) -> None:
    topic, primary, replica = await topic_with_replica(redis_cluster)
    async with nodes(redis_cluster) as (nursery, (a, b)), user(b, nursery, "bob") as bob:
        traffic = await Traffic.start(a, topic, bob, nursery, publications=20)
        await traffic.received_all()
        primary.kill()  # no goodbye: the replica takes over after the node timeout
        started = trio.current_time()
        with trio.fail_after(30):
            while (await slot_owners_from(replica)).get(slot_of(topic)) != replica.port:  # noqa: ASYNC110
                await trio.sleep(0.1)
        promoted = trio.current_time() - started
        with trio.fail_after(20):
            while True:  # until publications go through again
                before = len(traffic.accepted)
                await traffic.publish()
                if len(traffic.accepted) > before:
                    break
                await trio.sleep(0.1)
        followed = trio.current_time() - started
        for _ in range(20):
            await traffic.publish()
        assert traffic.accepted[-20:] == list(
            range(traffic.accepted[-1] - 19, traffic.accepted[-1] + 1)
        )
        await traffic.received_all()
        # Everything accepted reached bob once, in order; the promoted replica numbered
        # in a new epoch.
        traffic.check(epochs=2)
        with trio.fail_after(20):
            while not (a.hub.broker.healthy and b.hub.broker.healthy):  # noqa: ASYNC110
                await trio.sleep(0.1)
        assert followed - promoted < 10, (promoted, followed)


async def slot_owners_from(server: Any) -> dict[int, int]:
    """Which port holds each slot, as ``server`` sees the cluster."""
    async with coredis.Redis(port=server.port) as redis:
        ranges = await redis.cluster_slots()
    return {
        slot: int(primary["port"])
        for (first, last), (primary, *_) in ranges.items()
        for slot in range(first, last + 1)
    }


async def test_a_node_started_while_the_cluster_is_away_serves_degraded_and_catches_up(
    redis_cluster: RedisClusterServers,
) -> None:
    owners = await slot_owners(redis_cluster)
    topic = topic_on(owners, 1)
    for server in redis_cluster.nodes:
        server.kill()
    async with nodes(redis_cluster) as (nursery, (a, b)):
        assert not a.hub.broker.healthy  # started all the same: degraded
        async with user(a, nursery, "ada") as ada:
            seq = Seq()
            reply = await request(ada, seq, "sub", topic=topic)
            assert reply["error"]["code"] == "unavailable"
            for server in redis_cluster.nodes:
                server.start()  # back as themselves: the node files were kept
            await trio.to_thread.run_sync(redis_cluster.wait_ok)
            with trio.fail_after(20):
                while not (a.hub.broker.healthy and b.hub.broker.healthy):  # noqa: ASYNC110
                    await trio.sleep(0.1)
            with trio.fail_after(10):  # as a client does: again, after `unavailable`
                while "error" in await request(ada, seq, "sub", topic=topic):  # noqa: ASYNC110
                    await trio.sleep(0.2)
            await b.gateway.publish(topic, "back")
            (got,) = await msgs(ada, 1)
            assert (got["topic"], got["data"], got["offset"]) == (topic, "back", 1)


async def test_a_primary_down_at_drain_leaves_the_other_slots_sessions_parked() -> None:
    # Parking goes slot by slot: the slots whose primary answers take their sessions
    # (which then resume on another node); those of the primary that is down stay on
    # the draining node, and no session is both parked and kept.
    where = RedisClusterServers(redis_binary(), node_timeout_ms=1000)
    where.extra_options = ["--cluster-require-full-coverage", "no"]
    try:
        where.start()
        owners = await slot_owners(where)
        settings = {"heartbeat_interval": None, "drain_timeout": 2}
        async with nodes(where, **settings) as (nursery, (a, b)):
            broker = a.hub.broker
            assert isinstance(broker, ClusterBroker)
            await drain_with_one_down(
                a,
                b,
                nursery,
                where=lambda session: owners[hash_slot(broker._parked_key(session).encode())],
                kill=lambda index: where.nodes[index].kill(),
            )
    finally:
        where.kill()


async def test_a_cluster_that_accepts_but_never_answers_leaves_the_node_starting_degraded() -> None:
    # Opening a cluster's client asks for its layout: bounded, so that the broker
    # starts (degraded) and its health check reports, rather than waiting forever.
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        broker = ClusterBroker(f"redis+cluster://127.0.0.1:{port}", command_timeout=0.5)
        with trio.fail_after(10):
            await nursery.start(broker.run)
        assert not broker.healthy
        with pytest.raises(BrokerUnavailable):
            await broker.publish("room:1", "x")
        nursery.cancel_scope.cancel()
