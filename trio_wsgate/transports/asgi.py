"""The ASGI transport: the gateway as an ASGI application, under hypercorn's trio worker.

:class:`GatewayApp` mounts the gateway into an ASGI server (or beside another ASGI
application) on one port for WebSocket and HTTP: the WebSocket path, the probes and,
unless told otherwise, ``/metrics`` and ``/api/*``. Its ``lifespan`` starts the
node's hub (the broker) and drains the node on shutdown::

    server = Server(gateway, config)
    await hypercorn.trio.serve(GatewayApp(server), hypercorn_config)

What ASGI cannot do (docs/transports.md): it carries no WebSocket ping frames, so the
envelope heartbeat alone proves liveness; pings the client sends are answered by the
ASGI server and are not counted against the rate limit; the ASGI server, not the
gateway, bounds the opening request and frames (hypercorn: 16 KiB request heads,
``websocket_max_message_size``); and hypercorn always accepts permessage-deflate
when a client offers it.

Backpressure (transports/base.py): hypercorn's reader answers each ping itself and
awaits the pong's ``send_all`` (under its connection's write lock) before it reads
on, so a peer that floods pings and never reads is held back by TCP with at most one
pong unsent in this process; :class:`GuardedStream` bounds that write too, once a
close is decided. What the gateway hands over is held to the high-water mark like on
every transport: over it, :meth:`ASGITransport.receive` takes no more messages,
hypercorn's queue to the application fills (``max_app_queue_size``), and its reader
stops reading.

That queue is also how hypercorn says a write failed: the task whose write broke the
stream puts ``websocket.disconnect`` on it, and waits while it is full. When that task
is the application's own (a hand-over of the write loop, or of :meth:`ASGITransport.aclose`)
and its reader is not taking messages, it would wait on itself for ever; so a hand-over
in progress ends as soon as the stream breaks (:class:`GuardedStream` says so), as a
broken write ends on the other transports. And once the gateway is done with a
WebSocket, what hypercorn still does for the stream (its reader may be waiting on that
full queue too) gets until the close's deadline, no more (:meth:`_Bound.wind_up`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import trio
from websockets.datastructures import Headers
from websockets.exceptions import InvalidHeader

from ..protocol.closecodes import CloseCode, CloseReason
from ..wakeup import Wakeup
from .base import Incoming, Refusal, TransportBroken, UpgradeRequest, output_high_water

if TYPE_CHECKING:
    from hypercorn.config import Config as HypercornConfig

    from ..files import StaticFile
    from ..server import Server

logger = logging.getLogger("trio_wsgate.asgi")

__all__ = [
    "ASGITransport",
    "GatewayApp",
    "GuardedStream",
    "hypercorn_config",
    "serve_asgi_stream",
    "serve_hypercorn_stream",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# The cancel scope bounding the opening handshake of a stream that
# serve_asgi_stream serves (hypercorn starts the app's task in that context).
_HANDSHAKE_BOUND: contextvars.ContextVar[_Bound | None] = contextvars.ContextVar(
    "wsgate_handshake_bound", default=None
)

# Close codes with which the ASGI server itself fails a connection (it tells the app
# only the code): a malformed frame, bad UTF-8, a message over the size limit.
_FAILURES = frozenset({1002, 1007, 1009})


class ASGITransport:
    """An accepted ASGI WebSocket, as the gateway's connection sees it.

    Args:
        stream: the stream hypercorn writes to, when the gateway gave it one
            (:func:`serve_asgi_stream`): its writes are then bounded once a close is
            decided. Under an ASGI server of your own, that server bounds them.
        close_timeout: how long writes may still take after the close is decided.
        high_water: the unsent bytes over which :meth:`receive` stops taking messages
            (:func:`~trio_wsgate.transports.base.output_high_water`).
    """

    def __init__(
        self,
        receive: Receive,
        send: Send,
        remote_address: str,
        *,
        stream: GuardedStream | None = None,
        close_timeout: float = 2.0,
        high_water: int = output_high_water(65536),
    ) -> None:
        self._stream = stream
        self._close_timeout = close_timeout
        self._receive = receive
        self._send = send
        self._out: list[tuple[bytes, bool]] = []
        # Bytes of the messages queued or being handed to the ASGI server.
        self._unsent = 0
        self._high_water = high_water
        self._room: Wakeup | None = None
        self._close: tuple[int, str] | None = None
        self._close_sent = False
        self._gone = False
        # The hand-over to the ASGI server in progress, ended if the stream breaks.
        self._handing_over: trio.CancelScope | None = None
        self.remote_address = remote_address
        if stream is not None:
            stream.on_broken = self._stream_broke

    @property
    def high_water(self) -> int:
        """The unsent bytes over which :meth:`receive` stops taking messages."""
        return self._high_water

    @property
    def unsent_bytes(self) -> int:
        """Bytes of the messages queued or being handed to the ASGI server."""
        return self._unsent

    async def receive(self) -> Incoming:
        """The next message, or how the WebSocket ended.

        While more than the high-water mark waits to be sent, first wait for the write
        loop's flush (the ASGI server's queue to the application then fills).
        """
        if self._gone:
            raise trio.ClosedResourceError("the ASGI WebSocket has ended")
        if self._unsent > self._high_water:
            self._room = room = Wakeup()
            try:
                while self._unsent > self._high_water:
                    await room.wait()
            finally:
                self._room = None
        try:
            event = await self._receive()
        except Exception as exc:  # the ASGI server's own way of saying "gone"
            self._gone = True
            raise TransportBroken(CloseReason.RESET, str(exc)) from exc
        kind = event["type"]
        if kind == "websocket.receive":
            data = event.get("bytes")
            if data is not None:
                return Incoming(messages=[(data, True)], frames=1, nbytes=len(data))
            payload = (event.get("text") or "").encode()
            return Incoming(messages=[(payload, False)], frames=1, nbytes=len(payload))
        # websocket.disconnect: the end, however it came.
        self._gone = True
        incoming = Incoming(eof=True)
        if self._close_sent:
            return incoming
        code = int(event.get("code", 1005))  # 1005: no status received
        reason = str(event.get("reason") or "")
        if code in _FAILURES:
            incoming.failed = (code, reason or "closed by the ASGI server")
        elif code != CloseCode.ABNORMAL:
            incoming.peer_close = (code, reason)
        return incoming

    def send_message(self, payload: bytes, binary: bool) -> None:
        """Queue one message."""
        self._out.append((payload, binary))
        self._unsent += len(payload)

    def send_close(self, code: int, reason: str) -> None:
        """Queue the close, once."""
        if self._close is None:
            self._close = (code, reason.encode()[:120].decode(errors="ignore"))
            if self._stream is not None:
                self._stream.send_deadline = trio.current_time() + self._close_timeout

    def wants_flush(self) -> bool:
        """True if messages or the close wait to be sent."""
        return bool(self._out) or (self._close is not None and not self._close_sent)

    async def flush(self) -> bool:
        """Hand what is queued to the ASGI server, then the close.

        Returns:
            True once the close was handed over (the ASGI server finishes it).
        """
        out, self._out = self._out, []
        hand_over = self._hand_over
        try:
            for payload, binary in out:
                if binary:
                    await hand_over({"type": "websocket.send", "bytes": payload})
                else:
                    await hand_over({"type": "websocket.send", "text": payload.decode()})
                self._sent(len(payload))
            if self._close is not None and not self._close_sent:
                self._close_sent = True
                code, reason = self._close
                await hand_over({"type": "websocket.close", "code": code, "reason": reason})
        except TransportBroken:
            self._gone = True
            raise
        except Exception as exc:
            # An ASGI server's send fails once its WebSocket is gone (each server has
            # its own exception for that: OSError, ClientDisconnected, hypercorn's
            # UnexpectedMessageError...). Nothing more can be sent; end it here.
            logger.debug("the ASGI server refused a send (%r): the WebSocket is gone", exc)
            self._gone = True
            raise TransportBroken(CloseReason.RESET, str(exc)) from exc
        finally:
            if out:
                # What is left will never be sent (the WebSocket is gone, or this was
                # cancelled): only what was queued since counts.
                self._unsent = sum(len(payload) for payload, _ in self._out)
                self._sent(0)
        return self._close_sent

    def _sent(self, nbytes: int) -> None:
        self._unsent -= nbytes
        if self._room is not None:
            self._room.set()

    async def _hand_over(self, message: Message) -> None:
        """Send one message through the ASGI server, unless or until its stream breaks.

        hypercorn reports a broken write in the task that wrote: it puts
        ``websocket.disconnect`` on its bounded queue to the application, whose only
        reader is this connection's. The write loop, or :meth:`aclose` once the reader
        is gone, would then wait on itself while that queue is full (a peer that sent
        a lot that was not read yet, then left). Nothing more can be sent anyway: the
        hand-over ends there (the connection ends as on any broken write).

        Raises:
            TransportBroken: the stream broke before or during the hand-over.
        """
        stream = self._stream
        if stream is None:
            await self._send(message)
            return
        if stream.broken:
            raise TransportBroken(CloseReason.RESET, "the stream is broken")
        with trio.CancelScope() as scope:
            self._handing_over = scope
            try:
                await self._send(message)
            finally:
                self._handing_over = None
        if scope.cancelled_caught:
            raise TransportBroken(CloseReason.RESET, "the stream broke")

    def _stream_broke(self) -> None:
        # GuardedStream's callback: a write failed, in whatever task.
        if self._handing_over is not None:
            self._handing_over.cancel()

    async def aclose(self) -> None:
        """Ask the ASGI server to close now (it releases the socket when the app returns).

        Returns within ``close_timeout`` whatever the peer and the ASGI server's queues
        do; at once if the stream is broken.
        """
        if not self._close_sent and not self._gone:
            self._close_sent = True
            deadline = trio.current_time() + self._close_timeout
            if self._stream is not None:
                # Cancelled from outside, with no close decided: hypercorn's writes are
                # shielded, and one may be stuck on a peer that does not read (a pong).
                # They get close_timeout, as after any close.
                self._stream.send_deadline = deadline
                deadline = self._stream.send_deadline
            # The caller shields this (Connection.run): the deadline is its bound.
            with trio.move_on_at(deadline), contextlib.suppress(Exception):
                await self._hand_over({"type": "websocket.close", "code": CloseCode.GOING_AWAY})


def _upgrade_request(scope: Scope) -> UpgradeRequest:
    headers = Headers(
        (name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"]
    )
    target = scope.get("raw_path") or scope["path"].encode()
    if isinstance(target, bytes):
        target = target.decode("latin-1")
    query = scope.get("query_string") or b""
    if query:
        target = f"{target}?{query.decode('latin-1')}"
    client = scope.get("client") or ("", 0)
    return UpgradeRequest(
        target, headers, tuple(scope.get("subprotocols") or ()), _remote(scope), client[0]
    )


def _remote(scope: Scope) -> str:
    client = scope.get("client") or ("", 0)
    return f"{client[0]}:{client[1]}"


async def _send_answer(send: Send, messages: list[Message], remote: str) -> bool:
    """Send an HTTP answer (or the accept); False if the ASGI server refused it.

    What is sent is well-formed; the ASGI server refuses it once the connection
    cannot take it: hypercorn raises h11's LocalProtocolError after it answered a
    peer's broken request itself (pgjones/hypercorn#225). Nothing more to do then.
    """
    try:
        for message in messages:
            await send(message)
    except Exception as exc:
        logger.debug("the ASGI server refused the answer to %s (%r): it is gone", remote, exc)
        return False
    return True


def _headers(refusal: Refusal) -> list[tuple[bytes, bytes]]:
    """The answer's headers, plain text unless it says its own type."""
    headers = [(k.lower().encode(), v.encode()) for k, v in refusal.headers.items()]
    if not any(name == b"content-type" for name, _ in headers):
        headers.insert(0, (b"content-type", b"text/plain; charset=utf-8"))
    return headers


def _refusal(scope: Scope, refusal: Refusal) -> list[Message]:
    if "websocket.http.response" in (scope.get("extensions") or {}):
        headers = _headers(refusal)
        return [
            {"type": "websocket.http.response.start", "status": refusal.status, "headers": headers},
            {"type": "websocket.http.response.body", "body": refusal.body.encode()},
        ]
    # The ASGI server answers 403 for a close before accept.
    return [{"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION}]


class GatewayApp:
    """The gateway as an ASGI application (WebSocket, probes, metrics and API).

    Args:
        server: the node (its settings, hub and limits).
        admin: also serve ``/metrics`` and ``/api/*`` (the admin port's routes) on
            this port; the standalone server keeps them on the admin port.
    """

    def __init__(self, server: Server, *, admin: bool = True) -> None:
        from ..admin import AdminApp

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
        from ..admin import probe

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
        await _send_answer(send, [start, end], _remote(scope))

    async def _file(self, scope: Scope, receive: Receive, send: Send, file: StaticFile) -> None:
        """``GET`` (or ``HEAD``) of a served file; any other method is 405."""
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            answer = Refusal(405, "Method Not Allowed\n", {"Allow": "GET, HEAD"})
        else:
            answer = file.answer(
                Headers(
                    (name.decode("latin-1"), value.decode("latin-1"))
                    for name, value in scope.get("headers") or ()
                )
            )
        full = answer.body.encode()
        body = b"" if method == "HEAD" else full
        headers = [*_headers(answer), (b"content-length", str(len(full)).encode())]
        start = {"type": "http.response.start", "status": answer.status, "headers": headers}
        end = {"type": "http.response.body", "body": body}
        await _send_answer(send, [start, end], _remote(scope))

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = self.server
        event = await receive()
        if event["type"] != "websocket.connect":
            return
        bound = _HANDSHAKE_BOUND.get()
        if bound is not None:
            bound.head_read()
        try:
            request = _upgrade_request(scope)
        except InvalidHeader:  # h11 lets through header values websockets refuses
            server.count_refusal(400)
            # A malformed upgrade is 400 (docs/protocol.md, "Handshake").
            refusal = Refusal(400, "Bad Request: invalid header value\n")
            await _send_answer(send, _refusal(scope, refusal), _remote(scope))
            return
        answer: Refusal | Any = Refusal(503, "the handshake took too long\n")
        with trio.move_on_after(server.config.handshake_timeout):
            answer = await server.admit(request)
        if isinstance(answer, Refusal):
            server.count_refusal(answer.status)
            await _send_answer(send, _refusal(scope, answer), request.remote)
            return
        try:
            accept = {"type": "websocket.accept", "subprotocol": answer.subprotocol}
            accepted = await _send_answer(send, [accept], request.remote)
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


def hypercorn_config(server: Server) -> HypercornConfig:
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


class _Peer:
    """The socket-shaped view hypercorn takes of a stream that has no socket."""

    family = socket.AF_INET

    def __init__(self, remote: str) -> None:
        host, _, port = remote.rpartition(":")
        self._peer = (host or "127.0.0.1", int(port) if port.isdigit() else 0)

    def getpeername(self) -> tuple[str, int]:
        return self._peer

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", 0)


class GuardedStream(trio.abc.HalfCloseableStream):
    """The stream hypercorn writes to, with a deadline the gateway can set.

    hypercorn shields its writes from cancellation, so a peer that stops reading
    would hold a closing connection forever. Once the gateway decides to close, it
    sets :attr:`send_deadline`; a write still blocked then fails as a broken stream,
    and the connection is released within ``close_timeout`` like on every transport.

    A write that fails (the peer left, or the deadline passed) marks the stream
    :attr:`broken` and calls :attr:`on_broken` (:class:`ASGITransport` ends the
    hand-over it has in progress).
    """

    def __init__(self, stream: trio.abc.Stream, remote: str) -> None:
        self._stream = stream
        self.socket = getattr(stream, "socket", None) or _Peer(remote)
        self._scope = trio.CancelScope()
        #: A write failed: nothing more can be sent.
        self.broken = False
        #: Called once, when a write fails.
        self.on_broken: Callable[[], None] | None = None

    @property
    def send_deadline(self) -> float:
        return self._scope.deadline

    @send_deadline.setter
    def send_deadline(self, deadline: float) -> None:
        self._scope.deadline = min(self._scope.deadline, deadline)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            with trio.CancelScope(deadline=self._scope.deadline) as scope:
                self._scope = scope
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._broke()
            raise
        if scope.cancelled_caught:
            await trio.aclose_forcefully(self._stream)
            self._broke()
            raise trio.BrokenResourceError("the peer stopped reading past the close timeout")

    def _broke(self) -> None:
        if not self.broken:
            self.broken = True
            if self.on_broken is not None:
                self.on_broken()

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._stream.receive_some(max_bytes)

    async def send_eof(self) -> None:
        if isinstance(self._stream, trio.abc.HalfCloseableStream):
            await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


def _peer_errors() -> tuple[type[Exception], ...]:
    """What hypercorn's protocol code lets out on a peer's broken bytes: the errors of
    its sans-I/O state machines (h11, h2, wsproto), and of decoding a header value
    that is not ASCII (``Connection: \\xa0Upgrade`` in wsproto's ``split_comma_header``)."""
    import h2.exceptions
    import h11
    import wsproto.utilities

    return (
        h11.ProtocolError,
        h2.exceptions.ProtocolError,
        wsproto.utilities.ProtocolError,
        UnicodeDecodeError,
    )


async def serve_hypercorn_stream(
    app: Any, hconfig: HypercornConfig, stream: trio.abc.Stream, remote: str
) -> None:
    """Serve one accepted stream with hypercorn's trio server, its protocol errors contained.

    hypercorn's own per-connection code can raise out of the task that serves the
    stream when a peer's bytes throw its state machines off: an upgrade request with
    one byte more, or a NUL, after it makes hypercorn answer 400 on an h11 connection
    already in its ERROR state (pgjones/hypercorn#225); a non-ASCII byte in an
    upgrade's ``Connection`` header fails a decode. Under ``hypercorn.trio.serve``
    every connection runs in one nursery, so that error ends the whole server. Here
    it ends this stream only and is logged at debug level: the peer broke HTTP (or the
    WebSocket protocol), which is no fault of the node. (The application's own errors
    never get here: hypercorn logs them and answers 500 or closes with 1011.) Any
    other error propagates to the caller, the root of the stream's task, which logs
    and counts it; so do cancellations.

    Args:
        app: the ASGI application, wrapped for hypercorn (``ASGIWrapper``).
        hconfig: hypercorn's settings (:func:`hypercorn_config`).
        stream: the accepted stream; hypercorn closes it when done.
        remote: the peer's address, for the log.
    """
    from hypercorn.trio.tcp_server import TCPServer
    from hypercorn.trio.worker_context import WorkerContext
    from hypercorn.typing import ConnectionState

    try:
        await TCPServer(app, hconfig, WorkerContext(None), ConnectionState({}), stream)  # type: ignore[arg-type]
    except* _peer_errors() as group:
        logger.debug("hypercorn gave up on %s, which broke the protocol: %r", remote, group)


async def serve_asgi_stream(server: Server, stream: trio.abc.Stream, remote: str) -> None:
    """Serve one accepted stream through hypercorn's trio worker and :class:`GatewayApp`.

    The standalone server (``--transport asgi``) and the in-memory tests use this, so
    the node's own accept loop, limits and drain are the same for every transport.
    """
    from hypercorn.app_wrappers import ASGIWrapper

    app = server._asgi_app
    if app is None:
        gateway_app: Any = GatewayApp(server, admin=False)
        app = server._asgi_app = (ASGIWrapper(gateway_app), hypercorn_config(server))
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

    def __init__(self, server: Server, scope: trio.CancelScope, stream: GuardedStream) -> None:
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
