"""Listening sockets: TCP, shared by the processes of one machine (``SO_REUSEPORT``), or
a Unix socket.

Several worker processes (``trio-wsgate serve --workers N``, :mod:`trio_wsgate.workers`)
each listen on the same port with ``SO_REUSEPORT``: the kernel spreads new connections
across them by a hash of each connection's addresses, so one port serves from every
core. A socket bound with it but not listening takes no connections and holds the port
for the group: the supervisor keeps one, so that a worker restarting finds its port.
"""

from __future__ import annotations

import errno
import os
import socket

import trio

__all__ = ["bind_tcp", "open_tcp_listeners", "open_unix_listener"]

#: The listen backlog: trio's default (the system's own ceiling).
_BACKLOG = 0xFFFF


async def bind_tcp(
    port: int, host: str | None, *, reuse_port: bool
) -> list[trio.socket.SocketType]:
    """Bound, not yet listening TCP sockets for ``host`` (each of its addresses) and
    ``port``, with ``SO_REUSEPORT`` if asked.

    With port 0 on several addresses, each gets a port of its own: the caller binds the
    rest to the first one's port (as :func:`open_tcp_listeners` does).
    """
    if reuse_port and not hasattr(socket, "SO_REUSEPORT"):  # pragma: no cover - not Linux
        raise OSError(errno.ENOPROTOOPT, "SO_REUSEPORT is not available on this system")
    addresses = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[trio.socket.SocketType] = []
    try:
        for family, kind, proto, _, address in addresses:
            if sockets and port == 0:  # the port the first address got
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock = trio.socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            await sock.bind(address)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def open_tcp_listeners(
    port: int, host: str | None, *, reuse_port: bool = False
) -> list[trio.SocketListener]:
    """Listen on ``host``:``port``; with ``reuse_port``, beside the other processes
    that listen there with it."""
    if not reuse_port:
        return await trio.open_tcp_listeners(port, host=host)
    sockets = await bind_tcp(port, host, reuse_port=True)
    try:
        for sock in sockets:
            sock.listen(_BACKLOG)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return [trio.SocketListener(sock) for sock in sockets]


async def open_unix_listener(path: str) -> trio.SocketListener:
    """Listen on a Unix socket at ``path`` (replacing a stale one), for this user only."""
    target = trio.Path(path)
    if await target.is_socket():
        await target.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)
