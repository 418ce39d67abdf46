"""Serve a client over in-memory streams: no sockets, and MockClock friendly."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import trio
import trio.testing

from ..protocol.codecs import JSON_SUBPROTOCOL
from ..server import Server
from .client import RawClient

__all__ = ["memory_connector", "open_memory_connection"]


@asynccontextmanager
async def open_memory_connection(
    server: Server,
    nursery: trio.Nursery,
    *,
    subprotocols: Sequence[str] | None = (JSON_SUBPROTOCOL,),
    lockstep: bool = False,
    path: str = "/ws",
    headers: dict[str, str] | None = None,
    remote: str = "memory",
) -> AsyncIterator[RawClient]:
    """Connect a :class:`RawClient` to ``server`` over an in-memory stream pair.

    The server side runs as a task of ``nursery`` (``server.serve_stream``).

    Args:
        lockstep: use :func:`trio.testing.lockstep_stream_pair`, whose writes block
            until the other side reads: a peer that stops reading blocks the server.
        path: the request path (with a query string, if any).
        headers: extra request headers (``Authorization``, say).
        remote: the peer address the server sees (``ip:port`` for the per-address
            limits; ``memory`` counts against none).

    Raises:
        Refused: the server answered with HTTP instead of upgrading.
    """
    pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
    client_stream, server_stream = pair()
    nursery.start_soon(server.serve_stream, server_stream, remote)
    try:
        client = await RawClient.connect(
            client_stream, subprotocols=subprotocols, path=path, headers=headers
        )
    except BaseException:
        await trio.aclose_forcefully(client_stream)
        raise
    try:
        yield client
    finally:
        await trio.aclose_forcefully(client_stream)


def memory_connector(
    server: Server, nursery: trio.Nursery
) -> Callable[[], Awaitable[trio.abc.Stream]]:
    """A stream factory for :func:`trio_wsgate.open_client` (its ``connect`` option).

    Each call opens an in-memory stream pair and serves the server's end in
    ``nursery``: the client runs against ``server`` without sockets, under MockClock.
    """

    async def connect() -> trio.abc.Stream:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        nursery.start_soon(server.serve_stream, server_stream, "memory")
        return client_stream

    return connect
