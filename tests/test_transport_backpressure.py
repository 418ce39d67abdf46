"""A peer that floods WebSocket pings and never reads (issue 18, case 4).

Every transport answers pings with pongs; what waits to be written to a peer is held
to the high-water mark (transports/base.py, "Backpressure"): past it, the server stops
reading, TCP pushes back on the peer, and the heartbeat closes it. Over in-memory
lockstep streams (no kernel buffers: every byte the client got rid of, the server
read) with exact virtual times, and over real sockets with the real clock.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock
from websockets.client import ClientProtocol

from trio_wsgate import Server
from trio_wsgate.connection import Connection
from trio_wsgate.protocol import CloseCode
from trio_wsgate.testing import RawClient
from trio_wsgate.transports.base import OUTPUT_HEADROOM, output_high_water
from trio_wsgate.transports.websockets import RECEIVE_SIZE, WebsocketsTransport

from .conftest import ALL_TRANSPORTS

pytestmark = pytest.mark.transports(*ALL_TRANSPORTS)

#: The largest ping payload (RFC 6455 §5.5: control frames carry at most 125 bytes).
PAYLOAD = b"p" * 125
FLOOD = 20 * 2**20


def ping_frames(protocol: ClientProtocol, nbytes: int) -> bytes:
    """About ``nbytes`` of masked ping frames of 125 bytes each (131 bytes a frame)."""
    for _ in range(max(1, nbytes // (len(PAYLOAD) + 6))):
        protocol.send_ping(PAYLOAD)
    return b"".join(protocol.data_to_send())


class Flood:
    """Sends ping frames until told to stop or the stream breaks; never reads."""

    def __init__(self, client: RawClient, chunk: int = 16384) -> None:
        self.client = client
        self.frames = ping_frames(client.protocol, chunk)
        self.sent = 0
        self.ended = trio.Event()

    async def run(self) -> None:
        try:
            while self.sent < FLOOD:
                await self.client.stream.send_all(self.frames)
                self.sent += len(self.frames)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.ended.set()


def transport_of(connection: Connection) -> Any:
    """The server side's transport (each of the three has ``unsent_bytes``)."""
    return connection._transport


def record_unsent(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the websockets transport's unsent bytes after every receive: its peak,
    since pongs are queued as frames are read and only a flush takes them away."""
    seen: list[int] = []
    receive = WebsocketsTransport.receive

    async def recording(self: WebsocketsTransport) -> Any:
        incoming = await receive(self)
        seen.append(self.unsent_bytes)
        return incoming

    monkeypatch.setattr(WebsocketsTransport, "receive", recording)
    return seen


def test_the_high_water_mark_is_one_largest_message_and_64_kib() -> None:
    assert OUTPUT_HEADROOM == 65536
    assert output_high_water(65536) == 131072


async def test_a_ping_flood_that_never_reads_is_held_back_then_closed_by_the_heartbeat(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    tasks: Callable[[], int],
    monkeypatch: pytest.MonkeyPatch,
    transport: str,
) -> None:
    """Before any hello: the server stops reading once its output is over the mark,
    serves others meanwhile, and the heartbeat closes the flooder at interval + timeout;
    its reader, waiting for room, is cancelled at close_timeout after that."""
    seen = record_unsent(monkeypatch)
    server = make_server(
        heartbeat_interval=25, heartbeat_timeout=10, heartbeat_slack=0, hello_timeout=None
    )
    high_water = output_high_water(server.config.max_message_size)
    before = tasks()
    async with trio.open_nursery() as nursery:
        client_stream, server_stream = trio.testing.lockstep_stream_pair()
        nursery.start_soon(server.serve_stream, server_stream, "10.0.0.1:1")
        client = await RawClient.connect(client_stream)
        await trio.testing.wait_all_tasks_blocked()
        (connection,) = server.connections
        flood = Flood(client)
        nursery.start_soon(flood.run)
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == 0
        # The client is stuck in send_all: the server reads no more.
        assert not flood.ended.is_set()
        assert 0 < flood.sent < high_water + 2 * RECEIVE_SIZE
        server_side = transport_of(connection)
        assert server_side.high_water == high_water
        if transport == "websockets":
            # Paused: over the mark, and never more over it than one read's pongs.
            assert server_side.unsent_bytes > high_water
            assert max(seen) <= high_water + RECEIVE_SIZE
        else:
            # wsproto's side writes each pong before it reads on: nothing piles up.
            assert server_side.unsent_bytes == 0

        # Another client is served meanwhile.
        other_stream, other_server_stream = trio.testing.memory_stream_pair()
        nursery.start_soon(server.serve_stream, other_server_stream, "10.0.0.2:1")
        other = await RawClient.connect(other_stream)
        await other.hello()
        await other.send({"type": "msg", "seq": 1, "event": "echo", "data": "hi"})
        assert (await other.recv_type("reply"))["data"] == "hi"
        await other.close()
        assert (await other.wait_closed())[0] == 1000
        assert trio.current_time() == 0

        await connection.wait_released()
        assert connection.close_code == CloseCode.HEARTBEAT_TIMEOUT
        assert connection.close_decided_at == 35  # interval + timeout: nothing came
        assert connection.released_at == 35 + server.config.close_timeout
        await flood.ended.wait()
        assert flood.sent < high_water + 2 * RECEIVE_SIZE
        nursery.cancel_scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    assert tasks() == before


async def test_a_close_decided_while_the_reader_waits_for_room_ends_at_close_timeout(
    autojump_clock: MockClock, make_server: Callable[..., Server], transport: str
) -> None:
    """The reader is paused (the output is over the mark) when the node closes the
    connection: the close frame cannot go out either, and close_timeout ends it."""
    server = make_server(heartbeat_interval=None, hello_timeout=None, close_timeout=3)
    async with trio.open_nursery() as nursery:
        client_stream, server_stream = trio.testing.lockstep_stream_pair()
        nursery.start_soon(server.serve_stream, server_stream, "10.0.0.1:1")
        client = await RawClient.connect(client_stream)
        await trio.testing.wait_all_tasks_blocked()
        (connection,) = server.connections
        flood = Flood(client)
        nursery.start_soon(flood.run)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(100)  # nothing happens: no heartbeat, nobody reads
        assert not flood.ended.is_set()
        assert connection.released_at is None
        connection.close(4005, "kicked")
        await connection.wait_released()
        assert connection.released_at == 100 + 3
        await flood.ended.wait()
        nursery.cancel_scope.cancel()


async def test_a_flooded_connection_cancelled_from_outside_ends_within_close_timeout(
    autojump_clock: MockClock, make_server: Callable[..., Server], transport: str
) -> None:
    """A node stopped at once (no close decided): hypercorn's shielded write of a pong
    to a peer that does not read would hold the asgi transport's release for ever."""
    server = make_server(heartbeat_interval=None, hello_timeout=None, close_timeout=3)
    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as serving:
            client_stream, server_stream = trio.testing.lockstep_stream_pair()
            serving.start_soon(server.serve_stream, server_stream, "10.0.0.1:1")
            client = await RawClient.connect(client_stream)
            flood = Flood(client)
            nursery.start_soon(flood.run)
            await trio.testing.wait_all_tasks_blocked()
            assert not flood.ended.is_set()
            serving.cancel_scope.cancel()
        assert trio.current_time() <= 3
        assert not server.connections
        nursery.cancel_scope.cancel()


# -- over real sockets --------------------------------------------------------------


async def open_small_socket(host: str, port: int) -> trio.SocketStream:
    """A client socket with small kernel buffers, so that what it got rid of is about
    what the server read (a default socket on loopback can take megabytes)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    await sock.connect((host, port))
    return trio.SocketStream(sock)


async def test_a_ping_flood_over_a_socket_stops_being_read(
    make_server: Callable[..., Server], monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    """20 MiB of pings offered, never a byte read: the server takes a small part of it,
    holds its output under the mark, and serves another client meanwhile."""
    seen = record_unsent(monkeypatch)
    server = make_server(port=0, heartbeat_interval=None)
    high_water = output_high_water(server.config.max_message_size)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            host, port = server.listen_addresses[0]
            client = await RawClient.connect(await open_small_socket(host, port))
            flood = Flood(client, chunk=65536)
            nursery.start_soon(flood.run)
            # Until the flood stalls: no progress for half a second.
            last = -1
            while flood.sent != last:
                last = flood.sent
                await trio.sleep(0.5)
            assert not flood.ended.is_set()
            # Far below the 20 MiB offered: the kernel buffers on both sides (the
            # server's receive buffer grows to a few MiB on loopback) and the mark.
            assert flood.sent < FLOOD // 4
            (connection,) = server.connections
            server_side = transport_of(connection)
            if transport == "websockets":
                assert max(seen) <= high_water + RECEIVE_SIZE
                assert server_side.unsent_bytes <= high_water + RECEIVE_SIZE
            else:
                assert server_side.unsent_bytes == 0

            other = await RawClient.connect(await trio.open_tcp_stream(host, port))
            await other.hello()
            await other.send({"type": "msg", "seq": 1, "event": "echo", "data": "hi"})
            assert (await other.recv_type("reply"))["data"] == "hi"
            await other.close()
            await other.wait_closed()
            assert not flood.ended.is_set()  # still held back, still connected
            print(f"{transport}: {flood.sent} bytes of pings sent")
            nursery.cancel_scope.cancel()
        await trio.aclose_forcefully(client.stream)
