"""The few calls a connection needs from a WebSocket, whatever implements it.

The connection's reader is the only caller of :meth:`Transport.receive`; its write
loop is the only caller of :meth:`Transport.flush`. The ``send_*`` methods only queue
bytes (sans-I/O style), so any task may call them; nothing reaches the network until
the write loop flushes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ..protocol.closecodes import CloseReason

__all__ = [
    "Accept",
    "Decide",
    "Incoming",
    "Refusal",
    "Transport",
    "TransportBroken",
    "UpgradeRequest",
]


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


class Transport(Protocol):
    """A WebSocket as the connection sees it."""

    @property
    def remote_address(self) -> str:
        """The peer's address, for logs."""
        ...

    async def receive(self) -> Incoming:
        """Wait for data and return what it completed.

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
