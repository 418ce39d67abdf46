"""A primary found through Sentinel (``redis+sentinel://``), followed across a failover.

Each test starts its own primary, replica and Sentinel on free ports of 127.0.0.1
(they skip without ``redis-server``, and fail under ``WSGATE_REQUIRE_REDIS=1``).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import coredis
import pytest
import trio

from trio_wsgate import BrokerUnavailable, Server
from trio_wsgate.brokers.redis import SentinelUrl
from trio_wsgate.testing import free_port, open_memory_connection

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
from .test_redis_sharded import topics_cross_nodes_and_recover
from .test_topics import Seq, msgs, request

pytestmark = pytest.mark.redis


def test_a_sentinel_url_names_its_sentinels_service_and_db() -> None:
    parsed = SentinelUrl.parse("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2/gateway?db=2")
    assert parsed == SentinelUrl(
        (("10.0.0.1", 26379), ("10.0.0.2", 26379)), "gateway", 2, password="pw"
    )
    assert "pw" not in repr(parsed)
    odd = SentinelUrl.parse("redis+sentinel://ann:p%40ss:w@[::1]:26380,s2/svc")
    assert odd is not None
    assert (odd.sentinels, odd.username, odd.password) == (
        (("::1", 26380), ("s2", 26379)),
        "ann",
        "p@ss:w",
    )
    assert SentinelUrl.parse("redis://127.0.0.1:6379/0") is None
    with pytest.raises(ValueError, match="service_name"):
        SentinelUrl.parse("redis+sentinel://127.0.0.1:26379/")


def _port(address: Any) -> int:
    port = address[1]
    return int(port.decode() if isinstance(port, bytes) else port)


@dataclass
class Sentinel:
    primary: RedisServer
    replica: subprocess.Popen[bytes]
    replica_port: int
    sentinel: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/gateway"


def _wait_answering(port: int, what: bytes = b"PING\r\n") -> None:
    import socket

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(what)
                if sock.recv(64):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answers on {port}")


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[Sentinel]:
    binary = redis_binary()
    primary = RedisServer(binary)
    primary.start()
    replica_port, sentinel_port = free_port(), free_port()
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    replica = subprocess.Popen(
        [binary, "--port", str(replica_port), *common],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    config = tmp_path / "sentinel.conf"
    config.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor gateway 127.0.0.1 {primary.port} 1\n"
        "sentinel down-after-milliseconds gateway 1000\n"
        "sentinel failover-timeout gateway 5000\n"
    )
    watcher = subprocess.Popen(
        [binary, str(config), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_answering(replica_port)
        subprocess.run(
            ["redis-cli", "-p", str(replica_port), "replicaof", "127.0.0.1", str(primary.port)],
            check=True,
            capture_output=True,
        )
        _wait_answering(sentinel_port)
        # Until Sentinel knows the replica (so that a failover has somewhere to go).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["redis-cli", "-p", str(sentinel_port), "sentinel", "replicas", "gateway"],
                capture_output=True,
                text=True,
            ).stdout
            if str(replica_port) in out and "s_down" not in out:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("Sentinel never saw the replica")
        yield Sentinel(primary, replica, replica_port, watcher, sentinel_port)
    finally:
        for process in (watcher, replica):
            process.kill()
            process.wait(10)
        primary.kill()


@asynccontextmanager
async def nodes(
    where: Sentinel, **settings: Any
) -> AsyncIterator[tuple[trio.Nursery, list[Server]]]:
    settings.setdefault("allow_publish", ("room:*",))
    async with trio.open_nursery() as nursery:
        servers = [node_at(where.url, f"node-{i}", **settings) for i in range(2)]
        for server in servers:
            await nursery.start(server.serve)
        yield nursery, servers
        nursery.cancel_scope.cancel()


async def test_through_sentinel_nodes_act_as_one_gateway(sentinel: Sentinel) -> None:
    async with nodes(sentinel) as (nursery, (a, b)):
        async with user(a, nursery, "ada") as ada:
            await request(ada, Seq(), "sub", topic="room:1")
            for i in range(3):
                await b.gateway.publish("room:1", i)
            assert [(m["offset"], m["data"]) for m in await msgs(ada, 3)] == [
                (1, 0),
                (2, 1),
                (3, 2),
            ]
        async with open_memory_connection(a, nursery) as old:
            first = await old.hello(token=token("cy"))
            resume = {"session": first["session"], "token": first["resume_token"], "ack": 0}
            async with open_memory_connection(b, nursery) as new:
                welcome = await new.hello(token=token("cy"), resume=resume)
                assert welcome["resumed"] is True
        async with coredis.Redis(port=sentinel.primary.port) as primary:
            assert await primary.exists(["wsgate:t:room:1:meta"]) == 1


async def test_through_sentinel_history_presence_kicks_and_sessions_span_the_nodes(
    sentinel: Sentinel,
) -> None:
    async with nodes(sentinel, heartbeat_interval=None) as (nursery, (a, b)):
        async with users_span_the_nodes(a, b, nursery, "room:5"):
            pass  # send_to_user, presence and a kick, across the nodes
        await topics_cross_nodes_and_recover(a, b, nursery, ["room:2", "room:3", "room:4"])
        # Exactly once through a client that reconnects to the other node.
        await migrate_with_traffic_in_flight(a, b, nursery)


async def test_through_sentinel_a_drained_node_parks_its_sessions(sentinel: Sentinel) -> None:
    async with nodes(sentinel, heartbeat_interval=None, drain_timeout=30) as (nursery, (a, b)):
        first, _, _, before = await park_one(a, nursery)
        await resume_parked(b, nursery, first, before)


async def test_a_failover_during_traffic_is_followed_and_nothing_is_doubled(
    sentinel: Sentinel,
) -> None:
    async with nodes(sentinel) as (nursery, (a, b)), user(b, nursery, "bob") as bob:
        await request(bob, Seq(), "sub", topic="room:1")
        accepted: list[int] = []
        refused = 0
        got: list[dict[str, Any]] = []

        last: list[Any] = []  # the last publication accepted
        epochs: dict[int, str] = {}  # the epoch each accepted publication was numbered in

        async def publish(n: int) -> None:
            nonlocal refused
            try:
                last[:] = [await a.gateway.publish("room:1", n)]
                accepted.append(n)
                epochs[n] = last[0].epoch
            except BrokerUnavailable:
                refused += 1

        async def receive() -> None:
            while True:
                got.extend(await msgs(bob, 1))

        nursery.start_soon(receive)
        for n in range(20):
            await publish(n)
        async with coredis.Redis(port=sentinel.port) as watcher:
            with trio.fail_after(20):  # until Sentinel has seen the replica in sync
                while True:
                    try:
                        await watcher.sentinel_failover("gateway")
                        break
                    except coredis.exceptions.ResponseError as exc:
                        if "NOGOODSLAVE" not in str(exc):
                            raise
                        await publish(len(accepted) + refused)
                        await trio.sleep(0.2)
            deadline = trio.current_time() + 20
            while _port(await watcher.sentinel_get_master_addr_by_name("gateway")) != (
                sentinel.replica_port
            ):
                assert trio.current_time() < deadline, "Sentinel did not fail over"
                await publish(len(accepted) + refused)
                await trio.sleep(0.02)
        # The publishing node follows the new primary within its half-second watch
        # (until then the demoted one may still take its writes): once a publication
        # is numbered by the promoted replica, every one goes through.
        async with coredis.Redis(port=sentinel.replica_port) as promoted:
            with trio.fail_after(15):
                while True:
                    await publish(len(accepted) + refused)
                    meta = await promoted.hgetall("wsgate:t:room:1:meta")
                    numbered = last and meta.get(b"epoch") == last[0].epoch.encode()
                    if numbered and int(meta.get(b"offset", 0)) >= last[0].offset:
                        break
                    await trio.sleep(0.05)
        for _ in range(20):
            n = len(accepted) + refused
            await publish(n)
            assert accepted[-1] == n  # none refused any more
        with trio.fail_after(15):
            while not got or got[-1]["data"] != accepted[-1]:  # noqa: ASYNC110 - receive()'s
                await trio.sleep(0.02)
        # Nothing twice or out of order. The promoted replica numbered its first
        # publication in a new epoch (its replication id changed), so every publication
        # it numbered reached bob: what the demoted primary took after the switch is
        # lost, and the epoch change says so.
        data = [m["data"] for m in got]
        assert data == sorted(set(data))
        assert data[:20] == list(range(20))
        new_epoch = epochs[accepted[-1]]
        assert new_epoch != epochs[0]
        numbered_by_new = [n for n in accepted if epochs[n] == new_epoch]
        assert [m["data"] for m in got if m["epoch"] == new_epoch] == numbered_by_new
        assert [m["offset"] for m in got if m["epoch"] == new_epoch] == list(
            range(1, len(numbered_by_new) + 1)
        )
