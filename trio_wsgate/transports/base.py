"""The few calls a connection needs from a WebSocket, whatever implements it.

The connection's reader is the only caller of :meth:`Transport.receive`; one writer at
a time calls :meth:`Transport.flush_now` or :meth:`Transport.flush` (the connection
sees to it). The ``send_*`` methods only queue bytes (sans-I/O style), so any task may
call them; nothing reaches the network until a flush.

Backpressure. What waits to be written to a peer is bounded in bytes, the transport's
own control frames (the pongs that answer the peer's pings) included: while more than
the high-water mark (:func:`output_high_water`) is unsent, :meth:`Transport.receive`
waits before reading anything more, and a flush that brings it back below wakes it.
A peer that sends and never reads is then held back by TCP's flow control, not by the
node's memory; the connection's heartbeat closes it, and the close's deadline
(``close_timeout``) cancels a reader still waiting. A caller must therefore keep
flushing while it waits on :meth:`Transport.receive` (the connection does, whenever
:meth:`Transport.wants_flush` says so).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

from ..protocol.closecodes import CloseReason

if TYPE_CHECKING:
    import trio

    from ..config import Config

__all__ = [
    "OUTPUT_HEADROOM",
    "Accept",
    "Acceptor",
    "Decide",
    "Incoming",
    "Refusal",
    "Transport",
    "TransportBroken",
    "UpgradeRequest",
    "output_high_water",
    "remote_ip",
]


def remote_ip(remote_address: str) -> str:
    """The IP address of an ``ip:port`` (``[v6]:port``) peer address (the whole of it
    if it has no port)."""
    host, sep, _ = remote_address.rpartition(":")
    return host.strip("[]") if sep else remote_address


#: Bytes a connection may have waiting to be written beyond one message of the largest
#: size before its transport stops reading from the peer (see :func:`output_high_water`).
#: As much as one read from the network (64 KiB) can ask to be sent back in pongs.
OUTPUT_HEADROOM = 65536


def output_high_water(max_message_size: int) -> int:
    """The unsent bytes over which a transport stops reading ("Backpressure", above).

    One message of the largest size plus :data:`OUTPUT_HEADROOM`: 128 KiB at the default
    ``max_message_size``. A peer that reads never reaches it for long (its largest reply
    and the pongs of one read fit below it); one that does not read makes the node hold
    at most this much plus what one read answers, 64 KiB.
    """
    return max_message_size + OUTPUT_HEADROOM


class FirstValues(Mapping[str, str]):
    """Request headers by name, case-insensitive, each the first of its values.

    websockets' ``Headers`` (which every transport reads a request into) raises
    ``MultipleValuesError`` for a name sent twice: an ``Origin``, ``Authorization``
    or ``If-None-Match`` repeated by a client would fail the request as a bug of the
    node's instead of being read.
    """

    __slots__ = ("_headers",)

    def __init__(self, headers: _MultiHeaders) -> None:
        self._headers = headers

    def __getitem__(self, name: str) -> str:
        values = self._headers.get_all(name)
        if not values:
            raise KeyError(name)
        return values[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._headers)

    def __len__(self) -> int:
        return len(self._headers)


class _MultiHeaders(Protocol):
    def get_all(self, key: str) -> list[str]: ...

    def __iter__(self) -> Iterator[str]: ...

    def __len__(self) -> int: ...


@dataclass(slots=True)
class UpgradeRequest:
    """An opening request, whatever transport read it."""

    #: The request target: the path and its query string.
    target: str
    #: The request headers (case-insensitive; the first value of a repeated header).
    headers: Mapping[str, str]
    #: The subprotocols the client offered, in its order.
    subprotocols: tuple[str, ...]
    #: The peer's address (``ip:port``), for logs.
    remote: str
    #: The peer's IP address, for the per-address limit.
    ip: str
    #: The request method (an upgrade is a GET; the served files answer GET only).
    method: str = "GET"

    @property
    def path(self) -> str:
        """The target without its query string."""
        return self.target.split("?", 1)[0]


@dataclass(slots=True)
class Refusal:
    """Answer the opening request with plain HTTP instead of upgrading."""

    status: int
    body: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Accept:
    """Upgrade, with this subprotocol (None: the client offered none)."""

    subprotocol: str | None


#: What the server tells a transport to do with an opening request.
Decide = Callable[[UpgradeRequest], Awaitable[Refusal | Accept]]


class TransportBroken(Exception):
    """The peer broke the connection (reset, EOF without a close frame, ...).

    Args:
        reason: how it ended, for the close metrics.
    """

    def __init__(self, reason: CloseReason, detail: str = "") -> None:
        super().__init__(detail or reason.value)
        self.reason = reason


@dataclass(slots=True)
class Incoming:
    """What one :meth:`Transport.receive` call produced."""

    #: Complete messages, in order, as ``(payload, is_binary)``.
    messages: list[tuple[bytes, bool]] = field(default_factory=list)
    #: How many frames arrived (control frames included): each proves liveness.
    frames: int = 0
    #: How many of them were WebSocket pings (they count against the rate limit).
    pings: int = 0
    #: Bytes received from the network.
    nbytes: int = 0
    #: The peer sent a close frame: its ``(code, reason)``.
    peer_close: tuple[int, str] | None = None
    #: The WebSocket layer failed the connection itself (bad framing, a message over
    #: the size limit...): ``(code, reason)``; the close frame is already queued.
    failed: tuple[int, str] | None = None
    #: The peer closed its end of the stream; nothing more will arrive.
    eof: bool = False
    #: One message, and nothing more known to be waiting (the read did not fill the
    #: buffer; no close, no failure; a partial next frame may follow it): the
    #: connection may answer it at once rather than through its dispatcher's step
    #: (connection.py, ``_dispatch``). A transport that cannot tell leaves it False.
    alone: bool = False


class Transport(Protocol):
    """A WebSocket as the connection sees it."""

    @property
    def remote_address(self) -> str:
        """The peer's address, for logs."""
        ...

    def wait_readable(self, quiet: bool) -> Awaitable[None] | None:
        """What to await before :meth:`receive` while the peer has most likely sent
        nothing yet, or None (receive waits itself). A plain method: the reader waits
        one frame shallower, for an idle connection's whole life. ``quiet``: the
        connection has had nothing to dispatch for a while (it will most likely wait
        long; where a waiting socket costs least is best)."""
        ...

    async def receive(self) -> Incoming:
        """Wait for data and return what it completed.

        While more than the high-water mark waits to be written, wait for the write
        loop's flush first: nothing more is read from the peer meanwhile.

        Raises:
            TransportBroken: the peer broke the connection.
            trio.ClosedResourceError: this side closed the transport.
        """
        ...

    def send_message(self, payload: bytes, binary: bool) -> None:
        """Queue one message (one frame); dropped once the closing handshake began."""
        ...

    def send_close(self, code: int, reason: str) -> None:
        """Queue a close frame, if none was sent yet."""
        ...

    def wants_flush(self) -> bool:
        """True if bytes are queued for the network."""
        ...

    def flush_now(self) -> bool:
        """Write what is queued without waiting, if it can: True if nothing is left to
        write. False leaves the rest for :meth:`flush` (a partial write, a half-close
        due, a transport that cannot write without waiting).

        Raises:
            TransportBroken: the peer broke the connection.
            trio.ClosedResourceError: this side closed the transport.
        """
        ...

    async def flush(self) -> bool:
        """Write everything queued in one call.

        Returns:
            True when the transport is finished (the WebSocket close is complete on
            this side and the stream is closed).

        Raises:
            TransportBroken: the peer broke the connection while writing.
        """
        ...

    async def aclose(self) -> None:
        """Release the transport at once. Idempotent."""
        ...


#: What the node answers an accepted request with (its own kind of :class:`Accept`).
A = TypeVar("A", bound=Accept)


class Acceptor(Protocol[A]):
    """What an adapter needs of the node it accepts connections for.

    The :class:`~trio_wsgate.Server` answers it; an adapter never names the server
    (docs/architecture.md, "Layers"), so transports sit below the node that uses them.
    """

    @property
    def config(self) -> Config:
        """The node's settings (handshake and close timeouts, message size)."""
        ...

    async def admit(self, request: UpgradeRequest) -> Refusal | A:
        """Decide what an opening request gets: plain HTTP, or an upgrade."""
        ...

    def release(self, admission: A) -> None:
        """An admitted connection that never ran, or is gone: it counts no more."""
        ...

    def count_refusal(self, status: int) -> None:
        """Count an opening request answered with an HTTP error."""
        ...

    async def run_connection(
        self, transport: Transport, admission: A, remote_address: str = ""
    ) -> None:
        """Serve the upgraded WebSocket until it ends; release the admission."""
        ...

    def handshake_started(self, remote_address: str, bound: trio.CancelScope) -> bool:
        """Count a socket as in its opening handshake; False: close it at once."""
        ...

    def handshake_head_read(self, bound: trio.CancelScope) -> None:
        """The socket's request head has all come."""
        ...

    def handshake_ended(self, bound: trio.CancelScope) -> None:
        """The socket's opening handshake is over."""
        ...

    def handshake_slot(
        self, remote_address: str, bound: trio.CancelScope
    ) -> AbstractContextManager[bool]:
        """The handshake, counted while the block lasts (its value: started)."""
        ...
