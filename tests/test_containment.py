"""Nothing one peer causes reaches the node's root nursery (issue 18, the first class).

A failure is injected into each task or callback the node runs on behalf of a session
or a peer: the hand-over to another node, parking during drain, the broker's fan-out
callback, the application's hooks. That session ends (documented: 1011, or
``resumed: false``), and the node serves the next client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from trio_wsgate import Server, Session
from trio_wsgate.testing import Closed, open_memory_connection

from .conftest import make_gateway
from .redis_server import RedisServer
from .test_auth import token
from .test_redis import cluster
from .test_resume import detached, running, sample
from .test_topics import Seq, request


def _failing_for(victim: str, real: Callable[[Session], Any]) -> Callable[[Session], Any]:
    def export(session: Session) -> Any:
        if session.id == victim:
            raise RuntimeError("injected: this session cannot be written out")
        return real(session)

    return export


async def _open(server: Server, nursery: trio.Nursery, name: str) -> dict[str, Any]:
    """A session of ``name`` on ``server``, left detached; its welcome."""
    async with open_memory_connection(server, nursery) as client:
        welcome = await client.hello(token=token(name))
        await request(client, Seq(), "msg", event="echo", data=name)
    return welcome


async def _resume(server: Server, nursery: trio.Nursery, name: str, first: dict[str, Any]) -> bool:
    async with open_memory_connection(server, nursery) as client:
        resume = {"session": first["session"], "token": first["resume_token"], "ack": 0}
        welcome = await client.hello(token=token(name), resume=resume)
        seq = Seq()
        seq.seq = welcome["ack"]  # what the session processed already
        assert (await request(client, seq, "msg", event="echo", data=1))["data"] == 1
        await client.send({"type": "bye"})
        await client.wait_closed()
    return bool(welcome["resumed"])


@pytest.mark.redis
async def test_a_hand_over_that_fails_loses_that_session_only(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with cluster(redis_server, heartbeat_interval=None) as (nursery, (a, b)):
        ada = await _open(a, nursery, "ada")
        bob = await _open(a, nursery, "bob")
        monkeypatch.setattr(a.hub, "_export", _failing_for(ada["session"], a.hub._export))
        assert await _resume(b, nursery, "ada", ada) is False
        assert await _resume(b, nursery, "bob", bob) is True
        assert sample(a, "wsgate_internal_errors_total") == 1
        assert not a.hub.sessions  # ada's ended, bob's moved
        # a still serves.
        assert await _resume(a, nursery, "cy", await _open(a, nursery, "cy")) is True


@pytest.mark.redis
async def test_a_hand_over_task_that_fails_does_not_end_the_node(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with cluster(redis_server, heartbeat_interval=None, close_timeout=0.5) as (
        nursery,
        (a, b),
    ):
        ada = await _open(a, nursery, "ada")

        async def broken(*args: Any) -> None:
            raise RuntimeError("injected: the hand-over task fails")

        monkeypatch.setattr(a.hub, "_hand_over_one", broken)
        # b waits for an answer that never comes: a new session, after twice close_timeout.
        assert await _resume(b, nursery, "ada", ada) is False
        assert sample(a, "wsgate_internal_errors_total") == 1
        assert await _resume(a, nursery, "bob", await _open(a, nursery, "bob")) is True


@pytest.mark.redis
async def test_parking_goes_on_past_a_session_that_cannot_be_parked(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with cluster(redis_server, heartbeat_interval=None, drain_timeout=30) as (
        nursery,
        (a, b),
    ):
        ada = await _open(a, nursery, "ada")
        bob = await _open(a, nursery, "bob")
        monkeypatch.setattr(a.hub, "_export", _failing_for(ada["session"], a.hub._export))
        with trio.fail_after(10):
            await a.drain()  # the node drains and stops normally
        assert not a.hub.sessions
        assert sample(a, "wsgate_internal_errors_total") == 1
        assert await _resume(b, nursery, "bob", bob) is True  # parked, taken by b
        assert await _resume(b, nursery, "ada", ada) is False  # lost alone


async def test_a_subscriber_whose_delivery_fails_ends_alone(
    autojump_clock: MockClock, make_server: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = make_server(allow_subscribe=("room:*",))
    async with running(server) as nursery:
        async with (
            open_memory_connection(server, nursery) as bad,
            open_memory_connection(server, nursery) as good,
        ):
            await bad.hello()
            await good.hello()
            await request(bad, Seq(), "sub", topic="room:1")
            await request(good, Seq(), "sub", topic="room:1")
            victim = next(s for s in server.hub.sessions.values() if s.connection is not None)

            real = Session.deliver

            def broken(session: Session, pub: Any) -> None:
                if session is victim:
                    raise RuntimeError("injected: delivery fails")
                real(session, pub)

            monkeypatch.setattr(Session, "deliver", broken)
            await server.gateway.publish("room:1", "hello")
            codes = []
            for client in (bad, good):
                try:
                    with trio.move_on_after(1):
                        codes.append((await client.recv_type("msg"))["data"])
                except Exception:  # closed: the victim
                    codes.append(await client.wait_closed())
            assert sorted(map(str, codes)) == sorted(["hello", str((1011, "internal error"))])
            assert victim.ended
            assert sample(server, "wsgate_internal_errors_total") == 1
        await detached(server)
        async with open_memory_connection(server, nursery) as client:
            await client.hello()
            assert (await request(client, Seq(), "msg", event="echo", data=7))["data"] == 7
            await client.close()


async def test_a_connect_hook_that_fails_closes_its_connection_only(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    gateway = make_gateway()

    @gateway.on_connect
    async def hook(session: Session) -> None:
        if session.state.get("n", 0) == 0 and not hasattr(gateway, "_failed_once"):
            gateway._failed_once = True  # type: ignore[attr-defined]
            raise RuntimeError("injected: the hook fails")

    server = make_server(gateway)
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as client:
            with pytest.raises(Closed, match="1011 internal error"):
                await client.hello()  # the hook runs before the welcome goes out
        async with open_memory_connection(server, nursery) as client:
            await client.hello()
            assert (await request(client, Seq(), "msg", event="echo", data=1))["data"] == 1
            await client.close()
        assert sample(server, "wsgate_internal_errors_total") == 1
