"""The default transport: websockets' sans-I/O protocol over a trio stream.

The connection's own reader and write loop drive :class:`websockets.server.ServerProtocol`
(or, in the client, :class:`websockets.client.ClientProtocol`) directly, so no library
task hides inside the connection, no write lock is needed, and all queued frames leave
in one ``send_all``. websockets does the opening handshake, the
framing (its C speedups mask and unmask), automatic pongs, close frames and the close
codes for framing errors (1002) and oversized messages (1009).

websockets answers every ping by queueing a pong: the peer, not the node, decides how
much that is. What waits to be written (queued, and handed to ``send_all`` but not yet
taken by the kernel) is held to a high-water mark: over it,
:meth:`WebsocketsTransport.receive` waits for the write loop's flush before reading
more (transports/base.py, "Backpressure").
"""

from __future__ import annotations

import codecs
import errno
import logging
import os
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from websockets.client import ClientProtocol
from websockets.datastructures import Headers
from websockets.exceptions import InvalidHeader
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.headers import parse_subprotocol
from websockets.http11 import Request, Response
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol
from websockets.streams import StreamReader
from websockets.typing import Subprotocol
from websockets.uri import WebSocketURI

from .. import readiness
from ..protocol.closecodes import CloseCode, CloseReason
from ..wakeup import Wakeup
from .base import (
    Accept,
    Decide,
    FirstValues,
    Incoming,
    Refusal,
    TransportBroken,
    UpgradeRequest,
    output_high_water,
    remote_ip,
)

__all__ = [
    "Handshake",
    "HandshakeRefused",
    "WebsocketsTransport",
    "accept_websocket",
    "classify_os_error",
    "client_handshake",
    "remote_ip",
]

RECEIVE_SIZE = 65536

# websockets' answers to a malformed upgrade: wrong method, not an upgrade,
# wrong HTTP version.
_MALFORMED = frozenset({405, 426, 505})

# websockets logs request headers at DEBUG level, and headers may carry tokens
# (Authorization, ?token=). Secrets never reach the logs: this logger never goes
# below WARNING (its INFO lines, one per connection, are noise at scale).
_wire_logger = logging.getLogger("trio_wsgate.wire")
_wire_logger.setLevel(logging.WARNING)


_utf8_decoder = codecs.getincrementaldecoder("utf-8")
_NO_HEADERS = Headers()


# trio's socket calls yield to the scheduler after every call that succeeds (a
# checkpoint). Where the calling task has just yielded anyway (the write loop at its
# wait, the reader in wait_readable), that is a second trip through trio's run queue
# per write or read: per delivery in a fan-out, per request, per ping and pong on an
# idle node. These two make the call at once; their errors are the ones trio's
# SocketStream raises.


def _write_now(sock: trio.socket.SocketType, payload: bytes) -> int:
    """Write what the kernel takes of ``payload`` at once; return how much it took."""
    try:
        return os.write(_fileno(sock), payload)
    except BlockingIOError:
        return 0  # the kernel's buffer is full: send_all waits for room
    except OSError as exc:
        raise _stream_error(exc) from exc


def _read_now(sock: trio.socket.SocketType) -> bytes | None:
    """What the socket holds (b"" at its end), or None if it holds nothing yet."""
    try:
        return os.read(_fileno(sock), RECEIVE_SIZE)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise _stream_error(exc) from exc


def _fileno(sock: trio.socket.SocketType) -> int:
    fd = sock.fileno()
    if fd == -1:
        raise trio.ClosedResourceError("socket was already closed")
    return fd


def _stream_error(exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


def classify_os_error(exc: BaseException) -> CloseReason:
    """Map a broken-stream error to its disconnect reason by its errno."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError):
            if cause.errno == errno.ECONNRESET:
                return CloseReason.RESET
            if cause.errno == errno.ETIMEDOUT:
                return CloseReason.TIMEOUT
            if cause.errno == errno.EPIPE:
                return CloseReason.BROKEN_PIPE
        cause = cause.__cause__ or cause.__context__
    return CloseReason.RESET


class WebsocketsTransport:
    """A WebSocket over a trio stream, after a successful handshake.

    Args:
        stream: the byte stream (a socket, or one half of an in-memory pair).
        protocol: the websockets protocol (server or client side) in state OPEN.
        pending: events parsed together with the handshake request (pipelined frames).
        remote_address: the peer's address, for logs.
        max_fragments: most frames one message may arrive in; more fail the
            connection with 1009 (websockets caps the size, not the count).
        high_water: the unsent bytes over which :meth:`receive` stops reading
            (:func:`~trio_wsgate.transports.base.output_high_water`).
        watched: the stream is closed only through :meth:`aclose`, so a quiet reader
            may wait through the node's readiness watcher (:meth:`wait_readable`).
    """

    __slots__ = (
        "_backlog",
        "_close_reported",
        "_eof_sent",
        "_failure_reported",
        "_fragment_binary",
        "_fragments",
        "_high_water",
        "_in_flight",
        "_leftover",
        "_max_fragments",
        "_pending",
        "_protocol",
        "_room",
        "_stream",
        "_utf8",
        "_waited",
        "_watched",
        "remote_address",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        protocol: Protocol,
        pending: Sequence[Any] = (),
        remote_address: str = "",
        *,
        max_fragments: int = 1024,
        high_water: int = output_high_water(65536),
        watched: bool = False,
    ) -> None:
        self._stream = stream
        self._watched = watched
        self._protocol = protocol
        self._pending = list(pending)
        self._fragments: list[bytes] = []
        self._fragment_binary = False
        self._eof_sent = False
        self._failure_reported = False
        self._close_reported = False  # the peer's close frame was handed over
        self._max_fragments = max_fragments
        self._utf8: codecs.IncrementalDecoder | None = None
        self.remote_address = remote_address
        # The last read filled the buffer, so more may be waiting (see receive).
        self._backlog = False
        # The reader waited for readability before calling receive (wait_readable).
        self._waited = False
        self._high_water = high_water
        # Bytes handed to send_all that it has not finished writing.
        self._in_flight = 0
        # What a write at once left unwritten (the kernel took the rest): flush's.
        self._leftover: bytes | memoryview = b""
        # What the reader waits on while too much is unsent (only then: see receive).
        self._room: Wakeup | None = None

    @property
    def high_water(self) -> int:
        """The unsent bytes over which :meth:`receive` stops reading."""
        return self._high_water

    @property
    def unsent_bytes(self) -> int:
        """Bytes waiting to be written: queued (pongs and close frames included), and
        handed to the stream but not yet taken by it."""
        return self._in_flight + len(self._leftover) + sum(map(len, self._protocol.writes))

    def _over_high_water(self) -> bool:
        """More than the high-water mark waits to be written (nothing is read then)."""
        pending = self._in_flight or self._protocol.writes
        return bool(pending) and self.unsent_bytes > self._high_water

    async def _wait_for_room(self) -> None:
        """Wait until a flush has brought what is unsent down to the high-water mark."""
        self._room = room = Wakeup()
        try:
            while self.unsent_bytes > self._high_water:
                await room.wait()
        finally:
            self._room = None

    def wait_readable(self, quiet: bool) -> Awaitable[None] | None:
        """Wait for readability here, before :meth:`receive`, when the last read took
        all there was (the socket is most likely empty: an idle connection between
        heartbeats, or a client waiting for its replies); None otherwise.

        receive_some would first try a recv that fails with EAGAIN (an exception, in
        Python) before waiting, and yield once more after reading: the reader waits
        first, and receive then reads at once. The wait yields to the other tasks, so
        a client that floods never starves the others; after a read that filled the
        buffer, trio's order finds what is left without a trip through epoll.

        A ``quiet`` connection waits through the node's readiness watcher, where a
        waiting socket keeps far less (readiness.py), if its socket is closed only
        through this transport (``watched``: the watcher would not hear of another
        close); a busy one through trio, one task step sooner.
        """
        if self._pending or self._backlog or type(self._stream) is not trio.SocketStream:
            return None
        if self._over_high_water():
            return None  # receive waits for room first
        self._waited = True
        if quiet and self._watched:
            return readiness.wait_readable(self._stream.socket)
        return trio.lowlevel.wait_readable(self._stream.socket)  # noqa: ASYNC105 - awaited by the caller

    async def receive(self) -> Incoming:
        """Wait for data; return the messages and signals it completed.

        While more than the high-water mark waits to be written, nothing is read: a
        peer that floods pings and never reads the pongs is held back by TCP.
        """
        if self._pending:
            events, self._pending = self._pending, []
            incoming = Incoming()
            self._handle_events(events, incoming)
            return incoming
        if self._over_high_water():
            await self._wait_for_room()
        stream = self._stream
        try:
            data: bytes | bytearray | None = None
            if type(stream) is trio.SocketStream:
                if self._waited:  # the reader waited for readability (wait_readable)
                    self._waited = False
                    data = _read_now(stream.socket)
                elif not self._backlog:  # as in wait_readable
                    await trio.lowlevel.wait_readable(stream.socket)
                    data = _read_now(stream.socket)
            if data is None:
                data = await stream.receive_some(RECEIVE_SIZE)
        except trio.BrokenResourceError as exc:
            raise TransportBroken(classify_os_error(exc), str(exc)) from exc
        self._backlog = len(data) == RECEIVE_SIZE
        incoming = Incoming()  # made once there is something: not kept while waiting
        if not data:
            self._protocol.receive_eof()
            incoming.eof = True
            return incoming
        incoming.nbytes = len(data)
        self._protocol.receive_data(data)
        self._handle_events(self._protocol.events_received(), incoming)
        incoming.alone = (
            len(incoming.messages) == 1
            and not self._backlog  # a full buffer: more is queued in the socket
            and incoming.peer_close is None
            and incoming.failed is None
        )
        return incoming

    def _fail(self, incoming: Incoming, code: CloseCode, reason: str) -> None:
        """Fail the connection here (websockets leaves these checks to its callers)."""
        self._fragments = []
        self._utf8 = None
        self._protocol.fail(code, reason)
        self._failure_reported = True
        incoming.failed = (int(code), reason)

    def _handle_events(self, events: list[Any], incoming: Incoming) -> None:
        for event in events:
            if not isinstance(event, Frame):
                continue
            incoming.frames += 1
            opcode = event.opcode
            if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                data = bytes(event.data)
                binary = opcode is Opcode.BINARY
                if not binary:
                    # RFC 6455 §8.1: text is UTF-8, checked as it arrives (fail fast);
                    # only a fragmented message needs the incremental decoder.
                    self._utf8 = _utf8_decoder() if not event.fin else None
                    if not self._valid_utf8(data, event.fin):
                        self._fail(
                            incoming, CloseCode.INVALID_DATA, "invalid UTF-8 in a text message"
                        )
                        break
                if event.fin:
                    incoming.messages.append((data, binary))
                else:
                    self._fragments = [data]
                    self._fragment_binary = binary
            elif opcode is Opcode.CONT:
                if not self._fragments:
                    continue  # after a failure: websockets discards the rest
                data = bytes(event.data)
                self._fragments.append(data)
                if len(self._fragments) > self._max_fragments:
                    reason = f"a message in more than {self._max_fragments} fragments"
                    self._fail(incoming, CloseCode.MESSAGE_TOO_BIG, reason)
                    break
                if not self._fragment_binary and not self._valid_utf8(data, event.fin):
                    self._fail(incoming, CloseCode.INVALID_DATA, "invalid UTF-8 in a text message")
                    break
                if event.fin:
                    message = b"".join(self._fragments)
                    self._fragments = []
                    incoming.messages.append((message, self._fragment_binary))
            elif opcode is Opcode.PING:
                incoming.pings += 1
            elif opcode is Opcode.CLOSE:
                rcvd = self._protocol.close_rcvd
                if rcvd is not None:
                    incoming.peer_close = (int(rcvd.code), rcvd.reason)
                    self._close_reported = True
        protocol = self._protocol
        if protocol.parser_exc is not None and not self._failure_reported:
            self._failure_reported = True
            sent = protocol.close_sent
            if sent is not None and not self._close_reported:
                # (A close frame in the middle of a fragmented message: websockets
                # records it, then fails the connection with 1002 without handing it
                # over as an event. Unreported, no close was ever decided here.)
                incoming.failed = (int(sent.code), sent.reason)
            elif sent is None:
                incoming.failed = (int(CloseCode.ABNORMAL), str(protocol.parser_exc))

    def _valid_utf8(self, data: bytes, final: bool) -> bool:
        try:
            if self._utf8 is None:
                if not data.isascii():  # ASCII is UTF-8: no need to decode it
                    data.decode()
            else:
                self._utf8.decode(data, final)
        except UnicodeDecodeError:
            return False
        if final:
            self._utf8 = None
        return True

    def send_message(self, payload: bytes, binary: bool) -> None:
        """Queue one message as one frame; nothing once the closing handshake began."""
        if self._protocol.state is not State.OPEN:
            return
        if binary:
            self._protocol.send_binary(payload)
        else:
            self._protocol.send_text(payload)

    def send_close(self, code: int, reason: str) -> None:
        """Queue a close frame, unless the closing handshake has begun."""
        # A close reason must fit a control frame (125 bytes with the code).
        if self._protocol.state is State.OPEN:
            self._protocol.send_close(
                code, reason.encode(errors="replace")[:120].decode(errors="ignore")
            )

    def wants_flush(self) -> bool:
        """True if websockets has bytes waiting for the network."""
        return bool(self._protocol.writes or self._leftover)

    def flush_now(self) -> bool:
        """Write what is queued if the kernel takes it all at once, without yielding:
        True if nothing is left. On a socket only, and never a half-close (flush's)."""
        if self._in_flight or self._leftover:
            return False  # a flush is under way, or has the rest of the last write
        writes = self._protocol.writes
        if not writes:
            return True
        stream = self._stream
        if (
            writes[-1] == b""
            or type(stream) is not trio.SocketStream
            or stream.socket.did_shutdown_SHUT_WR
        ):
            return False
        payload = b"".join(self._protocol.data_to_send())
        try:
            written = _write_now(stream.socket, payload)
        except trio.BrokenResourceError as exc:
            raise TransportBroken(classify_os_error(exc), str(exc)) from exc
        if written < len(payload):
            self._leftover = memoryview(payload)[written:]
            return False
        if self._room is not None:
            self._room.set()
        return True

    async def flush(self) -> bool:
        """Write all queued bytes in one write; half-close when websockets says so.

        On a socket, what the kernel takes at once is written without yielding (see
        :func:`_write_now`); the rest, if any, goes through ``send_all``.

        Returns:
            True once this side has sent its end of stream.
        """
        chunks = self._protocol.data_to_send()
        leftover, self._leftover = self._leftover, b""
        if not chunks and not leftover:
            return self._eof_sent
        eof = bool(chunks) and chunks[-1] == b""
        payload = b"".join([leftover, *chunks]) if leftover else b"".join(chunks)
        stream = self._stream
        try:
            if payload:
                if type(stream) is trio.SocketStream and not stream.socket.did_shutdown_SHUT_WR:
                    written = _write_now(stream.socket, payload)
                    if written < len(payload):
                        self._in_flight = len(payload) - written
                        await stream.send_all(memoryview(payload)[written:])
                else:
                    self._in_flight = len(payload)
                    await stream.send_all(payload)
            if eof and not self._eof_sent:
                self._eof_sent = True
                if isinstance(self._stream, trio.abc.HalfCloseableStream):
                    await self._stream.send_eof()
                else:  # pragma: no cover - TLS streams cannot half-close
                    await self._stream.aclose()
        except trio.BrokenResourceError as exc:
            raise TransportBroken(classify_os_error(exc), str(exc)) from exc
        finally:
            # Written, or never to be: either way no longer waiting on the stream.
            self._in_flight = 0
            if self._room is not None:
                self._room.set()
        return self._eof_sent

    async def aclose(self) -> None:
        """Release the stream at once."""
        protocol = self._protocol
        protocol.receive_eof()
        # websockets' parser is a generator that holds the protocol: a reference cycle
        # that only the cyclic collector would free, and the node runs it rarely
        # (cli.tune_gc). Closing the generator frees the connection's protocol, frames
        # and buffers as soon as the connection is gone.
        protocol.parser.close()
        if self._watched and type(self._stream) is trio.SocketStream:
            readiness.notify_closing(self._stream.socket)
        await trio.aclose_forcefully(self._stream)


@dataclass(slots=True)
class Handshake:
    """A completed opening handshake."""

    transport: WebsocketsTransport
    #: What the server decided: the subprotocol (and whatever the server attached).
    accept: Accept
    request: UpgradeRequest


async def _write_all(stream: trio.abc.Stream, protocol: Protocol) -> None:
    for chunk in protocol.data_to_send():
        if chunk:
            await stream.send_all(chunk)


def _offered_subprotocols(request: Request) -> tuple[str, ...]:
    offered: list[str] = []
    for header in request.headers.get_all("Sec-WebSocket-Protocol"):
        offered.extend(parse_subprotocol(header))
    return tuple(offered)


def _at_a_frame_start(protocol: ServerProtocol) -> bool:
    """True if websockets' server parser is waiting for the first byte of a frame:
    inside its frame parser (not a discard() after a close or an error), inside
    ``at_eof``, with nothing buffered. Anything else (a part of a frame already taken
    from the buffer, or other internals than these) is left alone."""
    outer = protocol.parser
    inner = getattr(outer, "gi_yieldfrom", None)
    waiting = getattr(inner, "gi_yieldfrom", None)
    return (
        protocol.state is State.OPEN
        and not protocol.reader.buffer
        and getattr(outer, "gi_code", None) is ServerProtocol.parse.__code__
        and getattr(inner, "gi_code", None) is Protocol.parse.__code__
        and getattr(waiting, "gi_code", None) is StreamReader.at_eof.__code__
    )


async def accept_websocket(
    stream: trio.abc.Stream,
    *,
    decide: Decide,
    max_message_size: int,
    max_fragments: int = 1024,
    max_request_head: int = 16384,
    max_headers: int = 64,
    compression: bool = False,
    remote_address: str = "",
    watched: bool = False,
) -> Handshake | tuple[int, UpgradeRequest | None]:
    """Read the opening request and answer it.

    ``await decide(request)`` says what to do with any request that parsed: a
    :class:`Refusal` is sent as plain HTTP (health checks, 404, 503 while draining,
    401 for a bad token...); an :class:`Accept` goes on to the WebSocket handshake,
    which websockets validates (a malformed upgrade is answered 400). The caller
    bounds the time this takes.

    ``watched``: the stream is closed only through the transport (a socket of the
    node's own listeners), so that a quiet reader may wait through the node's readiness
    watcher (:meth:`WebsocketsTransport.wait_readable`).

    Returns:
        A :class:`Handshake` when the connection was upgraded, else the HTTP status
        that was answered (0 if the peer left or nothing was answered) and the request,
        if one was read. The stream is left open in every case.
    """
    chosen: list[Subprotocol | None] = [None]
    extensions = [ServerPerMessageDeflateFactory()] if compression else None
    protocol = ServerProtocol(
        subprotocols=None,
        select_subprotocol=lambda _protocol, _offered: chosen[0],
        extensions=extensions,
        max_size=max_message_size,
        logger=_wire_logger,
    )
    raw: Request | None = None
    events: list[Any] = []
    received = 0
    while raw is None:
        try:
            data = await stream.receive_some(RECEIVE_SIZE)
        except trio.BrokenResourceError:
            return 0, None
        if not data:
            return 0, None
        received += len(data)
        protocol.receive_data(data)
        events = protocol.events_received()
        if events:
            first, events = events[0], events[1:]
            assert isinstance(first, Request)
            raw = first
        elif protocol.writes or protocol.handshake_exc is not None:
            # An unparseable request: websockets answered (414, 431) or gave up.
            status = 400
            writes = b"".join(protocol.data_to_send())
            if writes.startswith(b"HTTP/1.1 "):
                status = int(writes[9:12])
                await stream.send_all(writes)
            return status, None
        elif received > max_request_head:
            await _send_refusal(stream, protocol, Refusal(431, "Request Header Fields Too Large\n"))
            return 431, None
    if len(raw.headers) > max_headers or received > max_request_head:
        await _send_refusal(stream, protocol, Refusal(431, "Request Header Fields Too Large\n"))
        return 431, None
    try:
        offered = _offered_subprotocols(raw)
    except InvalidHeader:
        await _send_refusal(stream, protocol, Refusal(400, "Bad Sec-WebSocket-Protocol\n"))
        return 400, None
    request = UpgradeRequest(
        raw.path,
        FirstValues(raw.headers),
        offered,
        remote_address,
        remote_ip(remote_address),
        raw.method,
    )
    answer = await decide(request)
    if isinstance(answer, Refusal):
        await _send_refusal(stream, protocol, answer)
        return answer.status, request
    chosen[0] = Subprotocol(answer.subprotocol) if answer.subprotocol else None
    response = protocol.accept(raw)
    if response.status_code in _MALFORMED:
        # docs/protocol.md §8 answers every malformed upgrade with 400; websockets'
        # helpful headers (Allow, Upgrade) and text stay.
        response = Response(400, "Bad Request", response.headers, response.body)
    protocol.send_response(response)
    # websockets binds select_subprotocol to the protocol (a method of it): a reference
    # cycle. Chosen now; unbound, the protocol is freed with its connection.
    vars(protocol).pop("select_subprotocol", None)
    await _write_all(stream, protocol)
    if response.status_code != 101:
        return response.status_code, request
    if _at_a_frame_start(protocol):
        # websockets' server parser is a generator that read the request and then
        # parses frames for the connection's life, keeping the request and its own
        # frame (about 0.25 KiB). Waiting at the start of a frame, with nothing of one
        # read, it gives way to the frame parser alone, as websockets itself swaps
        # parsers (discard()).
        protocol.parser = Protocol.parse(protocol)
        next(protocol.parser)
    transport = WebsocketsTransport(
        stream,
        protocol,
        events,
        remote_address,
        max_fragments=max_fragments,
        high_water=output_high_water(max_message_size),
        watched=watched,
    )
    handshake = Handshake(transport, answer, request)
    # Where websockets' request parser stays on (frames came with the request), it
    # keeps the request for the connection's life (a local of its generator); its
    # headers are let go of here, once answered (about 2 KiB each).
    # Nothing reads them again: every such request shares one empty set.
    raw.headers = _NO_HEADERS
    return handshake


async def _send_refusal(
    stream: trio.abc.Stream, protocol: ServerProtocol, refusal: Refusal
) -> None:
    response = protocol.reject(refusal.status, refusal.body)
    for key, value in refusal.headers.items():
        if key in response.headers:  # a header of the answer's own replaces websockets'
            del response.headers[key]
        response.headers[key] = value
    protocol.send_response(response)
    await _write_all(stream, protocol)


class HandshakeRefused(Exception):
    """The server answered the upgrade with plain HTTP.

    Args:
        response: the HTTP response (``status_code``, ``headers``, ``body``).
    """

    def __init__(self, response: Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.status = response.status_code
        self.response = response

    @property
    def retry_after(self) -> float | None:
        """The ``Retry-After`` header in seconds, if the server sent one as a number."""
        value = FirstValues(self.response.headers).get("Retry-After")
        try:
            return max(0.0, float(value)) if value is not None else None
        except ValueError:
            return None


async def client_handshake(
    stream: trio.abc.Stream,
    uri: WebSocketURI,
    *,
    subprotocols: Sequence[str] | None,
    headers: dict[str, str] | None = None,
    max_message_size: int | None = 2**24,
) -> tuple[ClientProtocol, Response, list[Any]]:
    """Do the client side of the opening handshake on ``stream``.

    Returns:
        The protocol in state OPEN, the server's response, and the events that
        arrived together with it (frames the server sent at once).

    Raises:
        HandshakeRefused: the server answered with HTTP instead of upgrading.
        ConnectionError: the server closed the stream during the handshake.
    """
    protocol = ClientProtocol(
        uri,
        subprotocols=[Subprotocol(s) for s in subprotocols] if subprotocols else None,
        max_size=max_message_size,
        logger=_wire_logger,
    )
    request = protocol.connect()
    for key, value in (headers or {}).items():
        request.headers[key] = value
    protocol.send_request(request)
    await _write_all(stream, protocol)
    while True:
        try:
            data = await stream.receive_some(RECEIVE_SIZE)
        except trio.BrokenResourceError as exc:
            raise ConnectionError(f"the server broke the connection: {exc}") from exc
        if data:
            protocol.receive_data(data)
        else:
            protocol.receive_eof()
        events = protocol.events_received()
        if events:
            response = events[0]
            assert isinstance(response, Response)
            if protocol.state is not State.OPEN:
                raise HandshakeRefused(response)
            return protocol, response, events[1:]
        if not data:
            raise ConnectionError("the server closed the connection during the handshake")
