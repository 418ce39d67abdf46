"""Leak-free (docs/architecture.md): connections ended every way leave no task behind.

Thousands of in-memory connections on a MockClock, so the heartbeat and close
timeouts cost no real time. The count of live trio tasks (what ``wsgate_tasks``
exports) must come back to where it started. Real sockets, reset with RST, are in
test_server.py and system/test_e2e.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from trio_wsgate import Config, Gateway, Server, Session
from trio_wsgate.testing import RawClient

from .conftest import make_gateway

PER_KIND = 300
CONCURRENCY = 50


def leak_gateway() -> Gateway:
    gateway = make_gateway()

    @gateway.on("forever")
    async def forever(session: Session, data: Any) -> None:
        await trio.sleep_forever()

    @gateway.on("flood")
    async def flood(session: Session, data: Any) -> None:
        for i in range(data):
            session.send("flood", "x" * 200 + str(i))

    @gateway.on("kick")
    async def kick(session: Session, data: Any) -> None:
        session.close(4005, "kicked")

    @gateway.task
    async def idle(session: Session) -> None:
        await trio.sleep_forever()  # a per-connection task that must be cancelled

    return gateway


async def clean(client: RawClient) -> None:
    await client.hello()
    await client.send({"type": "msg", "seq": 1, "event": "echo", "data": 1})
    await client.recv_type("reply")
    await client.close()
    await client.wait_closed()


async def drop(client: RawClient) -> None:
    await client.hello()
    await client.stream.aclose()  # no close frame: the TCP-level end


async def cancelled_handler(client: RawClient) -> None:
    await client.hello()
    await client.send({"type": "msg", "seq": 1, "event": "forever"})
    await trio.testing.wait_all_tasks_blocked()
    await client.stream.aclose()


async def handler_crash(client: RawClient) -> None:
    await client.hello()
    await client.send({"type": "msg", "seq": 1, "event": "fail"})
    assert (await client.recv_type("reply"))["error"]["code"] == "internal"
    await client.stream.aclose()


async def heartbeat_timeout(client: RawClient) -> None:
    await client.hello()
    await trio.sleep(40)  # silent and not reading: half-open
    await client.stream.aclose()


async def slow_consumer(client: RawClient) -> None:
    await client.hello()
    await client.send({"type": "msg", "seq": 1, "event": "flood", "data": 50})
    await trio.sleep(3)  # never reads
    await client.stream.aclose()


async def protocol_error(client: RawClient) -> None:
    await client.hello()
    await client.send_raw(b"{not json", binary=False)
    assert (await client.wait_closed())[0] == 1007


async def kicked(client: RawClient) -> None:
    await client.hello()
    await client.send({"type": "msg", "seq": 1, "event": "kick"})
    assert (await client.wait_closed())[0] == 4005


ENDINGS: dict[str, Callable[[RawClient], Awaitable[None]]] = {
    "clean": clean,
    "drop": drop,
    "cancelled_handler": cancelled_handler,
    "handler_crash": handler_crash,
    "heartbeat_timeout": heartbeat_timeout,
    "slow_consumer": slow_consumer,
    "protocol_error": protocol_error,
    "kicked": kicked,
}


async def one_connection(
    server: Server, ending: Callable[[RawClient], Awaitable[None]], lockstep: bool
) -> None:
    pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
    client_stream, server_stream = pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_stream)
        client = await RawClient.connect(client_stream)
        await ending(client)
        await trio.aclose_forcefully(client_stream)


async def mid_handshake(server: Server) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_stream)
        await client_stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: webs")
        await client_stream.aclose()


async def test_no_task_is_left_behind(autojump_clock: MockClock, tasks: Callable[[], int]) -> None:
    server = Server(
        leak_gateway(),
        config=Config(
            admin_port=0, heartbeat_interval=25, heartbeat_timeout=10, queue_size=10, window=16
        ),
    )
    before = tasks()
    limiter = trio.CapacityLimiter(CONCURRENCY)

    async def limited(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        async with limiter:
            await fn(*args)

    total = 0
    async with trio.open_nursery() as nursery:
        for name, ending in ENDINGS.items():
            for _ in range(PER_KIND):
                nursery.start_soon(limited, one_connection, server, ending, name == "slow_consumer")
                total += 1
        for _ in range(PER_KIND):
            nursery.start_soon(limited, mid_handshake, server)
    await trio.testing.wait_all_tasks_blocked()
    assert tasks() == before
    assert not server.connections
    registry = server.metrics.registry
    assert registry.get_sample_value("wsgate_connections_open") == 0
    assert registry.get_sample_value("wsgate_connections_total") == total
    closes = {
        (s.labels["code"], s.labels["reason"]): s.value
        for metric in registry.collect()
        if metric.name == "wsgate_closes"
        for s in metric.samples
        if s.name == "wsgate_closes_total"
    }
    # Every end was counted, each under its reason.
    assert sum(closes.values()) == total
    assert closes[("1000", "clean")] == PER_KIND
    assert closes[("1006", "eof")] == 3 * PER_KIND  # drop, cancelled handler, crash
    assert closes[("4002", "heartbeat_timeout")] == PER_KIND
    assert closes[("4004", "slow_consumer")] == PER_KIND
    assert closes[("1007", "protocol_error")] == PER_KIND
    assert closes[("4005", "kick")] == PER_KIND
    # What outlives the connections is their detached sessions, for resume_ttl only
    # (docs/protocol.md §8: not after a protocol error or a kick).
    hub = server.hub
    assert 0 < len(hub.sessions) <= total - 2 * PER_KIND
    assert all(session.connection is None for session in hub.sessions.values())
    assert server.config.resume_ttl is not None
    await trio.sleep(server.config.resume_ttl)
    hub.expire()
    assert hub.sessions == {}


@pytest.mark.parametrize("count", [500])
async def test_drain_leaves_no_task_behind(
    autojump_clock: MockClock, tasks: Callable[[], int], count: int
) -> None:
    server = Server(leak_gateway(), config=Config(admin_port=0))
    before = tasks()
    codes: list[int] = []

    async def client_side(ready: trio.Event) -> None:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve_stream, server_stream)
            client = await RawClient.connect(client_stream)
            await client.hello()
            ready.set()
            codes.append((await client.wait_closed())[0])

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            ready = trio.Event()
            nursery.start_soon(client_side, ready)
            await ready.wait()
        assert len(server.connections) == count
        start = trio.current_time()
        await server.drain()
        assert trio.current_time() == start  # every client answered the close at once
        assert not server.ready
    assert codes == [1001] * count
    assert tasks() == before


async def test_users_topics_and_history_are_forgotten_when_sessions_go(
    autojump_clock: MockClock, tasks: Callable[[], int]
) -> None:
    """Subscriptions, presence, users and topic history leave nothing behind."""
    from trio_wsgate import JwtAuthenticator

    from .test_auth import SECRET, now, token
    from .test_topics import Seq, request

    gateway = make_gateway()
    gateway.authenticate(JwtAuthenticator(secret=SECRET, clock=now))
    server = Server(
        gateway,
        Config(admin_port=None, allow_subscribe=("room:*",), resume_ttl=30, history_ttl=60),
    )
    hub = server.hub
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        before = tasks()

        async def visit(index: int) -> None:
            stream = await _connect(server, nursery)
            client = await RawClient.connect(stream)
            await client.hello(token=token(f"user{index % 7}"))
            seq = Seq()
            for room in range(index % 4):
                await request(client, seq, "sub", topic=f"room:{room}")
            await gateway.publish(f"room:{index % 4}", index)
            if index % 2:
                await client.send({"type": "bye"})  # the session ends now
            await trio.aclose_forcefully(stream)  # else it ends at resume_ttl

        async with trio.open_nursery() as visitors:
            for index in range(200):
                visitors.start_soon(visit, index)
        await trio.sleep(30)  # every detached session expires
        await trio.testing.wait_all_tasks_blocked()
        assert not hub.sessions
        assert not hub.users
        assert not hub.topics
        assert not hub.connections
        for topic in ("room:0", "room:1", "room:2", "room:3", "user:user0"):
            assert await gateway.presence(topic) == {}
        assert not hub._broker_topics
        await trio.sleep(60)  # the history expires: the broker forgets every topic
        assert hub.broker.statistics() == {"topics": 0}
        assert tasks() == before
        nursery.cancel_scope.cancel()


async def _connect(server: Server, nursery: trio.Nursery) -> trio.abc.Stream:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    nursery.start_soon(server.serve_stream, server_stream, "memory")
    return client_stream


@pytest.mark.parametrize("parts", ["bare", "heartbeat-and-token", "resumed"])
async def test_an_ended_connection_is_freed_without_the_cyclic_collector(
    make_server: Callable[..., Server], parts: str
) -> None:
    # The node runs the cyclic GC rarely (cli.tune_gc): a connection's objects caught
    # in a reference cycle would stay until it does, and churn would grow the process.
    # websockets' protocol had two (its bound select_subprotocol, its parser); the
    # heartbeat and the token's watch call back into their connection; a resumed
    # session kept the connection that claimed it.
    import gc
    import weakref

    from trio_wsgate import Identity
    from trio_wsgate.testing import open_memory_connection

    if parts != "heartbeat-and-token":
        server = make_server(heartbeat_interval=None)
    else:
        gateway = make_gateway()

        @gateway.authenticate
        async def anyone(token: str | None) -> Identity:
            return Identity("someone", deadline=trio.current_time() + 3600)

        server = make_server(gateway)
    refs: list[weakref.ref[Any]] = []
    gc.collect()
    gc.disable()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.hub.run)
            resume = None
            if parts == "resumed":
                async with open_memory_connection(server, nursery) as client:
                    first = await client.hello()
                await trio.testing.wait_all_tasks_blocked()
                resume = {"session": first["session"], "token": first["resume_token"], "ack": 0}
            async with open_memory_connection(server, nursery) as client:
                welcome = await client.hello(**({} if resume is None else {"resume": resume}))
                assert welcome["resumed"] is (resume is not None)
                if parts == "heartbeat-and-token":
                    await client.send({"type": "refresh", "token": "again"})
                    await trio.testing.wait_all_tasks_blocked()
                (connection,) = server.connections
                refs.append(weakref.ref(connection.session))
                transport = connection._transport
                refs.append(weakref.ref(getattr(transport, "_protocol", transport)))
                del connection, transport
                await client.send({"type": "bye"})
                await client.wait_closed()
            await trio.testing.wait_all_tasks_blocked()
            assert not server.connections
            assert [ref() for ref in refs] == [None, None]
            nursery.cancel_scope.cancel()
    finally:
        gc.enable()
