"""The gateway as an ASGI application: :class:`GatewayApp`, and its hypercorn wiring.

:class:`GatewayApp` mounts the gateway into an ASGI server (or beside another ASGI
application) on one port for WebSocket and HTTP: the WebSocket path, the probes, the
served files and, unless told otherwise, ``/metrics`` and ``/api/*``. Its
``lifespan`` starts the node's hub (the broker)::

    server = Server(gateway, config)
    await hypercorn.trio.serve(GatewayApp(server), hypercorn_config(server))

The transport it runs connections over (:class:`~trio_wsgate.transports.asgi.ASGITransport`,
and what ASGI cannot do) is in :mod:`trio_wsgate.transports.asgi`; this module is the
edge that wires a node to it. It names the node only through :class:`AppNode`, the
calls it makes, which a :class:`~trio_wsgate.Server` answers.
"""

from __future__ import annotations

import contextvars
import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import trio
from websockets.datastructures import Headers
from websockets.exceptions import InvalidHeader

from .admin import AdminApp, AdminNode, probe
from .files import StaticFile
from .transports.asgi import (
    ASGITransport,
    GuardedStream,
    Receive,
    Scope,
    Send,
    answer_headers,
    refusal_messages,
    remote_of,
    send_answer,
    serve_hypercorn_stream,
    upgrade_request,
)
from .transports.base import Acceptor, FirstValues, Refusal, output_high_water

if TYPE_CHECKING:
    from hypercorn.config import Config as HypercornConfig

__all__ = ["AppNode", "GatewayApp", "hypercorn_config", "serve_asgi_stream"]

logger = logging.getLogger("trio_wsgate.asgi")


class AppNode(Acceptor[Any], AdminNode, Protocol):
    """What the ASGI application needs of its node (a :class:`~trio_wsgate.Server`)."""

    #: The application's ASGI wrapper and hypercorn settings, made on first use by
    #: :func:`serve_asgi_stream` and kept with the node.
    asgi_app: Any

    @property
    def files(self) -> Mapping[str, StaticFile]:
        """What ``GET`` answers besides the probes (``/wsgate.js``, pages)."""
        ...


# The cancel scope bounding the opening handshake of a stream that
# serve_asgi_stream serves (hypercorn starts the app's task in that context).
_HANDSHAKE_BOUND: contextvars.ContextVar[_Bound | None] = contextvars.ContextVar(
    "wsgate_handshake_bound", default=None
)


class GatewayApp:
    """The gateway as an ASGI application (WebSocket, probes, metrics and API).

    Args:
        server: the node (its settings, hub and limits).
        admin: also serve ``/metrics`` and ``/api/*`` (the admin port's routes) on
            this port; the standalone server keeps them on the admin port.
    """

    def __init__(self, server: AppNode, *, admin: bool = True) -> None:
        self.server = server
        self._admin = AdminApp(server) if admin else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        file = self.server.files.get(scope["path"])
        if file is not None:
            await self._file(scope, receive, send, file)
            return
        answer = probe(scope["path"], self.server.ready, self.server.degraded)
        if answer is None and scope["path"] == self.server.config.path:
            answer = (400, "Bad Request: not a WebSocket upgrade\n")  # docs/protocol.md §8
        if answer is None and self._admin is not None:
            await self._admin(scope, receive, send)
            return
        status, body = answer or (404, "Not Found\n")
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        start = {"type": "http.response.start", "status": status, "headers": headers}
        end = {"type": "http.response.body", "body": body.encode()}
        await send_answer(send, [start, end], remote_of(scope))

    async def _file(self, scope: Scope, receive: Receive, send: Send, file: StaticFile) -> None:
        """``GET`` (or ``HEAD``) of a served file; any other method is 405."""
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            answer = Refusal(405, "Method Not Allowed\n", {"Allow": "GET, HEAD"})
        else:
            answer = file.answer(
                FirstValues(
                    Headers(
                        (name.decode("latin-1"), value.decode("latin-1"))
                        for name, value in scope.get("headers") or ()
                    )
                )
            )
        full = answer.body.encode()
        body = b"" if method == "HEAD" else full
        headers = [*answer_headers(answer), (b"content-length", str(len(full)).encode())]
        start = {"type": "http.response.start", "status": answer.status, "headers": headers}
        end = {"type": "http.response.body", "body": body}
        await send_answer(send, [start, end], remote_of(scope))

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = self.server
        event = await receive()
        if event["type"] != "websocket.connect":
            return
        bound = _HANDSHAKE_BOUND.get()
        if bound is not None:
            bound.head_read()
        try:
            request = upgrade_request(scope)
        except InvalidHeader:  # h11 lets through header values websockets refuses
            server.count_refusal(400)
            # A malformed upgrade is 400 (docs/protocol.md, "Handshake").
            refusal = Refusal(400, "Bad Request: invalid header value\n")
            await send_answer(send, refusal_messages(scope, refusal), remote_of(scope))
            return
        answer: Refusal | Any = Refusal(503, "the handshake took too long\n")
        with trio.move_on_after(server.config.handshake_timeout):
            answer = await server.admit(request)
        if isinstance(answer, Refusal):
            server.count_refusal(answer.status)
            await send_answer(send, refusal_messages(scope, answer), request.remote)
            return
        try:
            accept = {"type": "websocket.accept", "subprotocol": answer.subprotocol}
            accepted = await send_answer(send, [accept], request.remote)
        except BaseException:
            server.release(answer)
            raise
        if not accepted:
            server.release(answer)
            return
        if bound is not None:
            bound.lift()
        transport = ASGITransport(
            receive,
            send,
            request.remote,
            stream=bound.stream if bound is not None else None,
            close_timeout=server.config.close_timeout,
            high_water=output_high_water(server.config.max_message_size),
        )
        try:
            await server.run_connection(transport, answer, request.remote)
        finally:
            if bound is not None:
                bound.wind_up()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        # The hub (the broker) runs as long as the ASGI server does.
        async with trio.open_nursery() as nursery:
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    try:
                        await nursery.start(self.server.hub.run)
                    except Exception as exc:
                        await send({"type": "lifespan.startup.failed", "message": str(exc)})
                        raise
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    nursery.cancel_scope.cancel()
                    await send({"type": "lifespan.shutdown.complete"})
                    return


def hypercorn_config(server: AppNode) -> HypercornConfig:
    """hypercorn settings that follow the node's (message size, quiet logs)."""

    from hypercorn.config import Config as HypercornConfig

    config = server.config
    hconfig = HypercornConfig()
    hconfig.accesslog = None  # access logs would show ?token= query strings
    hconfig.errorlog = logging.getLogger("trio_wsgate.asgi")
    hconfig.websocket_max_message_size = config.max_message_size
    hconfig.h11_max_incomplete_size = config.max_request_head
    hconfig.websocket_ping_interval = None  # the gateway's heartbeat does this
    hconfig.graceful_timeout = config.close_timeout
    # An idle or unfinished request waits as long as a handshake may take.
    hconfig.keep_alive_timeout = config.handshake_timeout
    return hconfig


async def serve_asgi_stream(server: AppNode, stream: trio.abc.Stream, remote: str) -> None:
    """Serve one accepted stream through hypercorn's trio worker and :class:`GatewayApp`.

    The standalone server (``--transport asgi``) and the in-memory tests use this, so
    the node's own accept loop, limits and drain are the same for every transport.
    """
    from hypercorn.app_wrappers import ASGIWrapper

    app = server.asgi_app
    if app is None:
        gateway_app: Any = GatewayApp(server, admin=False)
        app = server.asgi_app = (ASGIWrapper(gateway_app), hypercorn_config(server))
    wrapper, hconfig = app
    guarded = GuardedStream(stream, remote)
    # The opening handshake (or a plain HTTP exchange) is bounded like on the other
    # transports; GatewayApp lifts the bound once it has accepted the WebSocket.
    with trio.move_on_after(server.config.handshake_timeout) as scope:
        if not server.handshake_started(remote, scope):
            return  # over the handshake limits: closed at once, nothing read
        bound = _Bound(server, scope, guarded)
        token = _HANDSHAKE_BOUND.set(bound)
        try:
            await serve_hypercorn_stream(wrapper, hconfig, guarded, remote)
        finally:
            _HANDSHAKE_BOUND.reset(token)
            bound.lift()


class _Bound:
    """The handshake of one stream: its time bound and its ``max_handshakes`` slot
    (taken by :meth:`Server.handshake_started` before the stream was read)."""

    def __init__(self, server: AppNode, scope: trio.CancelScope, stream: GuardedStream) -> None:
        self._server = server
        self.stream = stream
        self._scope = scope
        self._open = True

    def head_read(self) -> None:
        """The WebSocket request has come whole (``max_handshakes_per_ip``)."""
        self._server.handshake_head_read(self._scope)

    def lift(self) -> None:
        """The handshake is over: no more bound, and the slot is free."""
        if self._open:
            self._open = False
            self._scope.deadline = math.inf
            self._server.handshake_ended(self._scope)

    def wind_up(self) -> None:
        """The gateway is done with the WebSocket: bound what hypercorn still does.

        Its reader may wait for ever to put what the peer sent on its queue to the
        application, which nobody reads any more (and so may its task that runs the
        application, to put ``websocket.disconnect`` there). It gets until the close's
        deadline (``close_timeout`` from now if none was set), or no time at all once
        the stream is broken: then nothing is left to do but close it.
        """
        self.lift()
        stream = self.stream
        now = trio.current_time()
        if stream.broken:
            deadline = now
        else:
            deadline = min(stream.send_deadline, now + self._server.config.close_timeout)
        self._scope.deadline = min(self._scope.deadline, deadline)
