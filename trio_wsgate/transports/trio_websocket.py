"""The trio-websocket transport: the gateway over trio-websocket (wsproto underneath).

trio-websocket runs a reader task of its own (in a nursery this module opens around
the connection, so it still ends with the connection) and answers WebSocket pings
itself. What that means for the gateway (docs/transports.md):

- pings and pongs never reach the connection, so only messages prove liveness and
  only messages count against the rate limit; the envelope heartbeat covers it;
- the number of fragments of a message is not capped (its size is);
- ``/healthz`` and ``/readyz`` are served on the admin port only: wsproto refuses a
  request that is not an upgrade before the gateway sees it;
- a protocol violation is answered by wsproto with its close frame, after which
  trio-websocket drops the TCP connection at once.

Backpressure (transports/base.py): trio-websocket's reader task writes each pong
itself, awaiting ``send_all`` under the connection's write lock, before it reads on;
and it hands messages over a channel of one. A peer that floods pings and never reads
is therefore held back by TCP with at most one pong unsent in this process. What the
gateway queues is held to the high-water mark like on every transport: over it,
:meth:`TrioWebsocketTransport.receive` takes no more messages, trio-websocket's
channel fills, and its reader stops reading.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream
from websockets.datastructures import Headers
from wsproto.utilities import LocalProtocolError

from ..protocol.closecodes import CloseCode
from ..wakeup import Wakeup
from .base import (
    A,
    Acceptor,
    FirstValues,
    Incoming,
    Refusal,
    UpgradeRequest,
    output_high_water,
    remote_ip,
)
from .websockets import RECEIVE_SIZE

__all__ = ["TrioWebsocketTransport", "serve_trio_websocket"]

logger = logging.getLogger("trio_wsgate.trio_websocket")

# Protocol errors wsproto fails the connection with: the reader learns no code.
_PROTOCOL_FAILURE = (int(CloseCode.PROTOCOL_ERROR), "protocol error")


class TrioWebsocketTransport:
    """An accepted trio-websocket connection, as the gateway's connection sees it.

    Args:
        ws: the accepted connection.
        stream: the byte stream under it (closed at once by :meth:`aclose`).
        max_message_size: the limit trio-websocket was given (to tell its 1009 apart),
            and what the high-water mark of unsent bytes is derived from.
    """

    def __init__(
        self,
        ws: WebSocketConnection,
        stream: trio.abc.Stream,
        remote_address: str,
        max_message_size: int,
    ) -> None:
        self._ws = ws
        self._stream = stream
        self._out: list[tuple[bytes, bool]] = []
        # Bytes of the messages queued or being sent (trio-websocket holds no more).
        self._unsent = 0
        self._high_water = output_high_water(max_message_size)
        self._room: Wakeup | None = None
        self._close: tuple[int, str] | None = None
        self._close_sent = False
        self._closed = trio.Event()
        self._too_big = f"Exceeded maximum message size: {max_message_size} bytes"
        self.remote_address = remote_address

    @property
    def high_water(self) -> int:
        """The unsent bytes over which :meth:`receive` stops taking messages."""
        return self._high_water

    @property
    def unsent_bytes(self) -> int:
        """Bytes of the messages queued or being handed to trio-websocket."""
        return self._unsent

    def wait_readable(self, quiet: bool) -> Awaitable[None] | None:
        """None: :meth:`receive` waits itself."""
        return None

    async def receive(self) -> Incoming:
        """The next message, or how the WebSocket ended.

        While more than the high-water mark waits to be sent, first wait for the write
        loop's flush (trio-websocket's reader stops once its channel is full).
        """
        if self._unsent > self._high_water:
            self._room = room = Wakeup()
            try:
                while self._unsent > self._high_water:
                    await room.wait()
            finally:
                self._room = None
        try:
            message = await self._ws.get_message()
        except ConnectionClosed as exc:
            incoming = Incoming(eof=True)
            reason = exc.reason
            if self._close_sent:
                # Our own close: trio-websocket stops delivering at once, but the
                # connection lasts until the peer has answered (or close_timeout).
                await self._closed.wait()
                return incoming
            if reason is None:
                incoming.failed = _PROTOCOL_FAILURE
            elif reason.code == CloseCode.MESSAGE_TOO_BIG and reason.reason == self._too_big:
                incoming.failed = (reason.code, reason.reason)
            elif reason.code != CloseCode.ABNORMAL:
                incoming.peer_close = (reason.code, reason.reason or "")
            return incoming
        if isinstance(message, str):
            payload, binary = message.encode(), False
        else:
            payload, binary = message, True
        return Incoming(messages=[(payload, binary)], frames=1, nbytes=len(payload))

    def send_message(self, payload: bytes, binary: bool) -> None:
        """Queue one message."""
        self._out.append((payload, binary))
        self._unsent += len(payload)

    def send_close(self, code: int, reason: str) -> None:
        """Queue the close, once."""
        if self._close is None:
            self._close = (code, reason.encode(errors="replace")[:120].decode(errors="ignore"))

    def wants_flush(self) -> bool:
        """True if messages or the close wait to be sent."""
        return bool(self._out) or (self._close is not None and not self._close_sent)

    def flush_now(self) -> bool:
        """Never at once: what is queued goes through :meth:`flush`."""
        return False

    async def flush(self) -> bool:
        """Send what is queued, then the close (which waits for the peer's answer).

        Returns:
            True once the close handshake is over.
        """
        out, self._out = self._out, []
        try:
            for payload, binary in out:
                await self._ws.send_message(payload if binary else payload.decode())
                self._sent(len(payload))
        except ConnectionClosed:
            return self._close_sent  # the reader learns how it ended
        finally:
            if out:
                # What is left will never be sent (the WebSocket is gone, or this was
                # cancelled): only what was queued since counts.
                self._unsent = sum(len(payload) for payload, _ in self._out)
                self._sent(0)
        if self._close is not None and not self._close_sent:
            self._close_sent = True
            code, reason = self._close
            await self._ws.aclose(code, reason)
            self._closed.set()
            return True
        return self._close_sent

    def _sent(self, nbytes: int) -> None:
        self._unsent -= nbytes
        if self._room is not None:
            self._room.set()

    async def aclose(self) -> None:
        """Release the stream at once."""
        await trio.aclose_forcefully(self._stream)


class _ContainingNursery:
    """Starts trio-websocket's reader task, ending the connection if the library fails.

    trio-websocket 0.12 answers a ping that arrives while its close is under way with a
    pong wsproto refuses to send (``LocalProtocolError`` in state LOCAL_CLOSING), and
    the error escapes its reader task. The connection is closing anyway: it is ended
    here, quietly, instead of failing the task that serves it.
    """

    def __init__(self, nursery: trio.Nursery, stream: trio.abc.Stream) -> None:
        self._nursery = nursery
        self._stream = stream

    def start_soon(self, task: Callable[[], Awaitable[None]]) -> None:
        self._nursery.start_soon(self._contained, task)

    async def _contained(self, task: Callable[[], Awaitable[None]]) -> None:
        try:
            await task()
        except LocalProtocolError as exc:
            logger.debug("trio-websocket failed on a closing connection: %s", exc)
            await trio.aclose_forcefully(self._stream)


async def serve_trio_websocket(server: Acceptor[A], stream: trio.abc.Stream, remote: str) -> None:
    """Serve one accepted stream with trio-websocket, start to end."""
    config = server.config
    async with trio.open_nursery() as nursery:  # trio-websocket's reader lives here
        admission = None
        ws: WebSocketConnection | None = None
        bound = trio.move_on_after(config.handshake_timeout)
        with bound, server.handshake_slot(remote, bound) as started:
            if not started:
                return  # over the handshake limits: closed at once, nothing read
            containing: Any = _ContainingNursery(nursery, stream)  # duck-typed: start_soon
            request = await wrap_server_stream(
                containing,
                stream,
                message_queue_size=1,
                max_message_size=config.max_message_size,
                receive_buffer_size=RECEIVE_SIZE,
            )
            server.handshake_head_read(bound)
            headers = Headers(
                (name.decode("latin-1"), value.decode("latin-1")) for name, value in request.headers
            )
            upgrade = UpgradeRequest(
                request.path,
                FirstValues(headers),
                request.proposed_subprotocols,
                remote,
                remote_ip(remote),
            )
            answer = await server.admit(upgrade)
            if isinstance(answer, Refusal):
                server.count_refusal(answer.status)
                extra = [(k.encode(), v.encode()) for k, v in answer.headers.items()]
                with contextlib.suppress(ConnectionClosed):  # the peer left first
                    await request.reject(
                        answer.status, extra_headers=extra, body=answer.body.encode()
                    )
            else:
                admission = answer
                try:
                    ws = await request.accept(subprotocol=answer.subprotocol)
                except ConnectionClosed:
                    pass  # the peer left before its answer (released below)
                except BaseException:
                    server.release(admission)
                    raise
        if admission is not None:
            if ws is None:  # the handshake timed out, or the peer left, after the admission
                server.release(admission)
            else:
                transport = TrioWebsocketTransport(ws, stream, remote, config.max_message_size)
                await server.run_connection(transport, admission, remote)
        nursery.cancel_scope.cancel()
