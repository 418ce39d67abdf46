"""The TCP fault proxy, on real sockets on 127.0.0.1 (real clock, bounded waits)."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.lowlevel
import trio.testing

from trio_wsgate.testing import FaultProxy


@asynccontextmanager
async def proxied(
    latency: float = 0.0,
) -> AsyncIterator[tuple[FaultProxy, trio.SocketStream, trio.SocketStream]]:
    """An echo-less target, the proxy in front of it, and both ends of one connection."""
    accepted: trio.MemorySendChannel[trio.SocketStream]
    accepted, incoming = trio.open_memory_channel[trio.SocketStream](1)
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        target_port = listeners[0].socket.getsockname()[1]

        async def keep(stream: trio.SocketStream) -> None:
            async with stream:
                await accepted.send(stream)
                await trio.sleep_forever()

        nursery.start_soon(trio.serve_listeners, keep, listeners)
        proxy = FaultProxy("127.0.0.1", target_port, latency=latency)
        await nursery.start(proxy.serve)
        with trio.fail_after(10):
            client = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            server = await incoming.receive()
        async with client:
            yield proxy, client, server
        nursery.cancel_scope.cancel()


async def receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = b""
    with trio.fail_after(10):
        while len(data) < size:
            chunk = await stream.receive_some()
            if not chunk:
                break
            data += chunk
    return data


async def test_it_forwards_both_ways_with_latency() -> None:
    async with proxied(latency=0.2) as (proxy, client, server):
        start = trio.current_time()
        await client.send_all(b"ping")
        assert await receive_exactly(server, 4) == b"ping"
        assert trio.current_time() - start >= 0.2
        await server.send_all(b"pong")
        assert await receive_exactly(client, 4) == b"pong"
        await trio.testing.wait_all_tasks_blocked()
        assert proxy.stats.bytes_forwarded == 8


async def test_cut_resets_both_ends() -> None:
    async with proxied() as (proxy, client, server):
        await client.send_all(b"x")
        await receive_exactly(server, 1)
        proxy.cut()
        for stream in (client, server):
            with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as info:
                await stream.receive_some()
            assert isinstance(info.value.__cause__, OSError)
            assert info.value.__cause__.errno == errno.ECONNRESET


async def test_close_ends_both_ends_cleanly() -> None:
    async with proxied() as (proxy, client, server):
        await client.send_all(b"x")
        await receive_exactly(server, 1)
        proxy.close()
        for stream in (client, server):
            with trio.fail_after(10):
                assert await stream.receive_some() == b""


async def test_a_blackhole_forwards_nothing_and_keeps_both_sockets_open() -> None:
    async with proxied() as (proxy, client, server):
        await client.send_all(b"x")
        await receive_exactly(server, 1)
        proxy.blackhole(duration=1.0)
        await client.send_all(b"lost")
        await server.send_all(b"lost too")
        with trio.move_on_after(0.5) as quiet:
            await trio.lowlevel.checkpoint()
            for stream in (client, server):
                await stream.receive_some()
        assert quiet.cancelled_caught  # nothing came, and nothing closed
        assert proxy.connections == 1
        # After its duration the blackholed connection is reset, like a vanished peer.
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
            await server.receive_some()
        assert proxy.stats.faults == {"blackhole": 1}
