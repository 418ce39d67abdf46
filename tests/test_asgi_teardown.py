"""A connection whose peer sent more than the node reads is released within
``close_timeout`` of the peer leaving, whatever the state of hypercorn's queues.

Under the asgi transport, hypercorn's reader puts what the peer sends on a bounded
queue to the application (``max_app_queue_size``, 10 messages), and reports a broken
write on that same queue, from the task that wrote. With the queue full and the
gateway not reading (its handler stalled, or its own output over the high-water
mark), a write that broke waited on itself for ever, and so did hypercorn's reader
once the gateway was done. Each test runs over every transport: the asgi one must end
at the same virtual time as the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from trio_wsgate import Gateway, Server, Session
from trio_wsgate.connection import Connection
from trio_wsgate.testing import RawClient
from trio_wsgate.transports.asgi import ASGITransport

from .conftest import ALL_TRANSPORTS, make_gateway
from .test_resume import running

pytestmark = pytest.mark.transports(*ALL_TRANSPORTS)

BIG = "p" * 60_000


def msg(seq: int, event: str, data: Any = None) -> dict[str, Any]:
    return {"type": "msg", "seq": seq, "event": event, "data": data}


def assert_hypercorn_queue_full(connection: Connection) -> None:
    """Under asgi, the situation under test: hypercorn's queue to the application
    is full (its reader waits to put the next message there)."""
    transport = connection._transport
    if isinstance(transport, ASGITransport):
        queue = transport._receive.__self__  # type: ignore[attr-defined]
        stats = queue.statistics()
        assert stats.current_buffer_used == stats.max_buffer_size
        assert stats.tasks_waiting_send == 1


class Served:
    """Serves one stream; records when everything it started has ended."""

    def __init__(self, server: Server, stream: trio.abc.Stream) -> None:
        self.server = server
        self.stream = stream
        self.ended_at: float | None = None

    async def run(self) -> None:
        try:
            await self.server.serve_stream(self.stream, "10.0.0.1:1")
        finally:
            self.ended_at = trio.current_time()


class Flood:
    """Sends echo requests of 60 KB until the stream breaks or it is told to stop."""

    def __init__(self, client: RawClient, first: int = 1) -> None:
        self.client = client
        self.seq = first

    async def run(self) -> None:
        try:
            while True:
                await self.client.send(msg(self.seq, "echo", BIG))
                self.seq += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def test_a_peer_gone_while_its_handler_stalls_is_released_at_once(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    tasks: Callable[[], int],
) -> None:
    """The handler is stalled and the node stopped reading (hypercorn's queue full);
    the peer leaves and the node cancels the connection: released at that instant
    (the asgi transport's close failed on the broken stream, then waited on its own
    queue, shielded and with no deadline: the nursery never exited)."""
    gateway = make_gateway()
    started = trio.Event()

    @gateway.on("stall")
    async def stall(session: Session, data: Any) -> Any:
        started.set()
        await trio.sleep(100)
        return data

    server = make_server(gateway)
    async with running(server):
        before = tasks()
        async with trio.open_nursery() as serving:
            client_stream, server_stream = trio.testing.memory_stream_pair()
            served = Served(server, server_stream)
            serving.start_soon(served.run)
            client = await RawClient.connect(client_stream)
            await client.hello()
            await client.send(msg(1, "stall"))
            await started.wait()
            for seq in range(2, 200):
                await client.send(msg(seq, "echo", BIG))
            await trio.sleep(1)
            (connection,) = server.connections
            assert_hypercorn_queue_full(connection)
            left = trio.current_time()
            await trio.aclose_forcefully(client_stream)
            serving.cancel_scope.cancel()
        assert trio.current_time() == left
        assert connection.released_at == left
        assert served.ended_at == left
        assert not server.connections
        await trio.testing.wait_all_tasks_blocked()
        assert tasks() == before


def _bursting() -> Gateway:
    """The test gateway, with ``burst``: four BIG messages at once (240 KB, one flush
    over the output high-water mark)."""
    gateway = make_gateway()

    @gateway.on("burst")
    async def burst(session: Session, data: Any) -> None:
        for _ in range(4):
            session.send("big", BIG)

    return gateway


async def _flooding(server: Server, nursery: trio.Nursery) -> tuple[trio.abc.Stream, Served]:
    """A peer that asks for a burst, then floods and never reads; five seconds on."""
    client_stream, server_stream = trio.testing.lockstep_stream_pair()
    served = Served(server, server_stream)
    nursery.start_soon(served.run)
    client = await RawClient.connect(client_stream)
    await client.hello()
    await client.send(msg(1, "burst"))
    nursery.start_soon(Flood(client, 2).run)
    await trio.sleep(5)
    return client_stream, served


async def test_a_peer_gone_while_the_reader_waits_for_room_is_released_at_once(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    tasks: Callable[[], int],
) -> None:
    """The node's output is over the high-water mark (a peer that never reads), so its
    reader takes nothing and hypercorn's queue fills; the peer leaves: the broken write
    ends the connection at once (under asgi, hypercorn reported it by waiting on that
    full queue, from the write loop: the write loop, the reader and hypercorn's reader
    each waited on another, for ever, with no heartbeat to end it)."""
    gateway = _bursting()

    server = make_server(
        gateway, heartbeat_interval=None, max_buffered_bytes=1 << 30, max_buffered=100_000
    )
    async with running(server):
        before = tasks()
        async with trio.open_nursery() as nursery:
            client_stream, served = await _flooding(server, nursery)
            (connection,) = server.connections
            transport = connection._transport
            if isinstance(transport, ASGITransport):
                assert transport.unsent_bytes > transport.high_water
                assert transport._room is not None  # the reader waits for room
            assert_hypercorn_queue_full(connection)
            left = trio.current_time()
            await trio.aclose_forcefully(client_stream)
            await connection.wait_released()
            assert connection.released_at == left
            assert connection.close_code == 1006
            await trio.testing.wait_all_tasks_blocked()
            assert served.ended_at == left
        await trio.testing.wait_all_tasks_blocked()
        assert tasks() == before


async def test_a_close_while_hypercorns_queue_is_full_leaves_nothing_behind(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    tasks: Callable[[], int],
) -> None:
    """The node closes a connection whose peer floods and never reads: released at
    close_timeout, and the stream's task ends with it (under asgi, hypercorn's reader
    waited for ever to put the peer's next message on the queue nobody read)."""
    gateway = _bursting()

    server = make_server(
        gateway,
        heartbeat_interval=None,
        close_timeout=3,
        max_buffered_bytes=1 << 30,
        max_buffered=100_000,
    )
    async with running(server):
        before = tasks()
        async with trio.open_nursery() as nursery:
            client_stream, served = await _flooding(server, nursery)
            (connection,) = server.connections
            assert_hypercorn_queue_full(connection)
            closed = trio.current_time()
            connection.close(4005, "kicked")
            await connection.wait_released()
            assert connection.released_at == closed + 3
            await trio.testing.wait_all_tasks_blocked()
            assert served.ended_at == closed + 3
            await trio.aclose_forcefully(client_stream)
        await trio.testing.wait_all_tasks_blocked()
        assert tasks() == before
