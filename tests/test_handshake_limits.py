"""Handshake slots shared fairly between addresses (issue 18, case 9).

One address that opens idle sockets (never a byte) holds at most
``max_handshakes_per_ip`` of the node's ``max_handshakes``, counted from accept;
more are closed at once. When the node is full, the address holding the most gives
up its oldest to an address holding fewer. Sockets whose request head has come whole
(being authenticated, say) no longer count against their address.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from trio_wsgate import Server
from trio_wsgate.testing import RawClient

from .conftest import ALL_TRANSPORTS, make_gateway

pytestmark = pytest.mark.transports(*ALL_TRANSPORTS)


class Idle:
    """A socket that never sends a byte; notes when the server closes it."""

    def __init__(self, stream: trio.abc.Stream, nursery: trio.Nursery) -> None:
        self.stream = stream
        self.closed_at: float | None = None
        nursery.start_soon(self._watch)

    @classmethod
    async def to(cls, server: Server, nursery: trio.Nursery, remote: str) -> Idle:
        """One more idle socket, once the server has taken it (or closed it)."""
        client_stream, server_stream = trio.testing.memory_stream_pair()
        nursery.start_soon(server.serve_stream, server_stream, remote)
        idle = cls(client_stream, nursery)
        await trio.testing.wait_all_tasks_blocked()
        return idle

    async def _watch(self) -> None:
        try:
            data = await self.stream.receive_some()
        except trio.BrokenResourceError:
            data = b""
        assert data == b""  # closed without an answer
        self.closed_at = trio.current_time()


def refused(server: Server) -> float:
    """Sockets closed over a handshake limit (counted as refused with 503)."""
    value: float = server.metrics.handshakes_refused.labels("503")._value.get()
    return value


def held(server: Server, ip: str) -> int:
    """Sockets of ``ip`` in their handshake whose request head has not all come."""
    return len(server._heads.get(ip, ()))


async def connect_from(
    server: Server, nursery: trio.Nursery, remote: str, headers: dict[str, str] | None = None
) -> RawClient:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    nursery.start_soon(server.serve_stream, server_stream, remote)
    return await RawClient.connect(client_stream, headers=headers)


def test_the_default_is_32_per_address_of_1000() -> None:
    from trio_wsgate import Config

    config = Config()
    assert (config.max_handshakes, config.max_handshakes_per_ip) == (1000, 32)


async def test_idle_sockets_of_one_address_cannot_lock_the_others_out(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """200 idle sockets from one address against a node of 100 slots: 32 are held
    (until handshake_timeout), the rest closed at once; other addresses get in."""
    server = make_server(max_handshakes=100, handshake_timeout=10)
    async with trio.open_nursery() as nursery:
        idle = [await Idle.to(server, nursery, f"10.0.0.1:{port}") for port in range(1, 201)]
        assert [s.closed_at for s in idle] == [None] * 32 + [0] * 168
        assert held(server, "10.0.0.1") == 32
        assert refused(server) == 168
        for port in range(1, 31):
            client = await connect_from(server, nursery, f"10.0.0.2:{port}")
            assert (await client.hello())["type"] == "welcome"
        assert trio.current_time() == 0  # promptly: nobody waited for a slot
        await trio.sleep(10)
        await trio.testing.wait_all_tasks_blocked()
        assert [s.closed_at for s in idle[:32]] == [10] * 32  # handshake_timeout
        assert server._heads == {}
        assert server._handshakes == {}
        nursery.cancel_scope.cancel()


async def test_a_full_node_takes_the_oldest_slot_of_the_address_holding_the_most(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server(max_handshakes=10, max_handshakes_per_ip=8)
    async with trio.open_nursery() as nursery:
        a = [await Idle.to(server, nursery, f"10.0.0.1:{port}") for port in range(8)]
        b = [await Idle.to(server, nursery, f"10.0.0.2:{port}") for port in range(2)]
        assert len(server._handshakes) == 10  # full
        assert refused(server) == 0

        # B holds 2: A, with 8, gives up its oldest.
        b.append(await Idle.to(server, nursery, "10.0.0.2:2"))
        assert [s.closed_at for s in a] == [0] + [None] * 7
        assert (held(server, "10.0.0.1"), held(server, "10.0.0.2")) == (7, 3)

        # A, holding the most, takes nothing from B: the newcomer is closed.
        late = await Idle.to(server, nursery, "10.0.0.1:9")
        assert late.closed_at == 0
        assert (held(server, "10.0.0.1"), held(server, "10.0.0.2")) == (7, 3)

        # A client from a third address gets in at once, with A's next oldest slot.
        client = await connect_from(server, nursery, "10.0.0.3:1")
        assert (await client.hello())["type"] == "welcome"
        assert [s.closed_at for s in a] == [0, 0] + [None] * 6
        assert all(s.closed_at is None for s in b)
        assert refused(server) == 3  # two slots given up, one socket refused
        assert trio.current_time() == 0
        nursery.cancel_scope.cancel()


async def test_a_request_that_came_whole_no_longer_counts_against_its_address(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Behind an HTTP proxy every client has the proxy's address; a slow authenticator
    keeps its handshakes open, but their requests came whole: they are not held
    against the address, and a full node has no idle socket to take a slot from."""
    gateway = make_gateway()

    @gateway.authenticate
    async def slow(token: str | None) -> str:
        await trio.sleep(5)
        return f"user-{token}"

    server = make_server(gateway, max_handshakes=5, max_handshakes_per_ip=2)
    welcomed: list[float] = []

    async def client(port: int) -> None:
        headers = {"Authorization": f"Bearer t{port}"}
        connection = await connect_from(server, nursery, f"10.0.0.1:{port}", headers)
        assert (await connection.hello())["type"] == "welcome"
        welcomed.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for port in range(5):
            nursery.start_soon(client, port)
            await trio.testing.wait_all_tasks_blocked()  # its request is in
        assert len(server._handshakes) == 5
        assert held(server, "10.0.0.1") == 0
        newcomer = await Idle.to(server, nursery, "10.0.0.2:1")
        assert newcomer.closed_at == 0
        assert refused(server) == 1
        await trio.sleep(5)
        await trio.testing.wait_all_tasks_blocked()
        assert welcomed == [5] * 5
        nursery.cancel_scope.cancel()


# -- over real sockets --------------------------------------------------------------


async def connect_bound(host: str, port: int, source: str) -> trio.SocketStream:
    """A TCP connection from ``source`` (127.0.0.0/8 is all loopback on Linux)."""
    sock = trio.socket.socket()
    try:
        await sock.bind((source, 0))
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def test_idle_sockets_from_127_0_0_1_leave_127_0_0_2_served(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(port=0, max_handshakes=100)
    streams: list[trio.SocketStream] = []
    clients: list[Any] = []
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                host, port = server.listen_addresses[0]
                for _ in range(200):
                    streams.append(await connect_bound(host, port, "127.0.0.1"))
                # The accept loop has taken every socket (trio polls I/O before it
                # calls the tasks blocked).
                await trio.testing.wait_all_tasks_blocked(0.1)
                assert refused(server) == 200 - 32
                assert held(server, "127.0.0.1") == 32
                for _ in range(30):
                    stream = await connect_bound(host, port, "127.0.0.2")
                    streams.append(stream)
                    client = await RawClient.connect(stream)
                    assert (await client.hello())["type"] == "welcome"
                    clients.append(client)
                assert refused(server) == 200 - 32
                assert held(server, "127.0.0.1") == 32
                nursery.cancel_scope.cancel()
    finally:
        for stream in streams:
            await trio.aclose_forcefully(stream)
