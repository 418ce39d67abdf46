"""The ASGI transport: a WebSocket carried by an ASGI server (hypercorn's trio worker).

The application that mounts a node into an ASGI server is
:class:`trio_wsgate.asgi_app.GatewayApp`; this module is what it runs connections
over, and the containment of hypercorn's own per-stream errors.

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
full queue too) gets until the close's deadline, no more (``asgi_app._Bound.wind_up``).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import trio
from websockets.datastructures import Headers

from ..protocol.closecodes import CloseCode, CloseReason
from ..wakeup import Wakeup
from .base import FirstValues, Incoming, Refusal, TransportBroken, UpgradeRequest, output_high_water

if TYPE_CHECKING:
    from hypercorn.config import Config as HypercornConfig

logger = logging.getLogger("trio_wsgate.asgi")

__all__ = [
    "ASGITransport",
    "GuardedStream",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "answer_headers",
    "refusal_messages",
    "remote_of",
    "send_answer",
    "serve_hypercorn_stream",
    "upgrade_request",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Close codes with which the ASGI server itself fails a connection (it tells the app
# only the code): a malformed frame, bad UTF-8, a message over the size limit.
_FAILURES = frozenset({1002, 1007, 1009})


class ASGITransport:
    """An accepted ASGI WebSocket, as the gateway's connection sees it.

    Args:
        stream: the stream hypercorn writes to, when the gateway gave it one
            (``asgi_app.serve_asgi_stream``): its writes are then bounded once a close is
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

    def wait_readable(self, quiet: bool) -> Awaitable[None] | None:
        """None: :meth:`receive` waits itself."""
        return None

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
            self._close = (code, reason.encode(errors="replace")[:120].decode(errors="ignore"))
            if self._stream is not None:
                self._stream.send_deadline = trio.current_time() + self._close_timeout

    def wants_flush(self) -> bool:
        """True if messages or the close wait to be sent."""
        return bool(self._out) or (self._close is not None and not self._close_sent)

    def flush_now(self) -> bool:
        """Never at once: what is queued goes through :meth:`flush`."""
        return False

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


def upgrade_request(scope: Scope) -> UpgradeRequest:
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
        target,
        FirstValues(headers),
        tuple(scope.get("subprotocols") or ()),
        remote_of(scope),
        client[0],
    )


def remote_of(scope: Scope) -> str:
    client = scope.get("client") or ("", 0)
    return f"{client[0]}:{client[1]}"


async def send_answer(send: Send, messages: list[Message], remote: str) -> bool:
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


def answer_headers(refusal: Refusal) -> list[tuple[bytes, bytes]]:
    """The answer's headers, plain text unless it says its own type."""
    headers = [(k.lower().encode(), v.encode()) for k, v in refusal.headers.items()]
    if not any(name == b"content-type" for name, _ in headers):
        headers.insert(0, (b"content-type", b"text/plain; charset=utf-8"))
    return headers


def refusal_messages(scope: Scope, refusal: Refusal) -> list[Message]:
    if "websocket.http.response" in (scope.get("extensions") or {}):
        headers = answer_headers(refusal)
        return [
            {"type": "websocket.http.response.start", "status": refusal.status, "headers": headers},
            {"type": "websocket.http.response.body", "body": refusal.body.encode()},
        ]
    # The ASGI server answers 403 for a close before accept.
    return [{"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION}]


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
