"""Sequencing and acknowledgement, free of I/O (docs/protocol.md §4).

Theory of operation. Each direction of a session has its own numbering. The sending
side is an :class:`Outbox`: it numbers sequenced envelopes 1, 2, 3, ... with no gaps,
lets at most ``window`` of them be in flight (written but not yet acknowledged) and
holds the rest back until acks arrive. The receiving side is an :class:`Inbox`: it
accepts the next ``seq`` in order, recognises duplicates, rejects gaps, and tracks what
has been processed and what it has acknowledged so far.

Neither reads a clock. The inbox reports that an ack is *pending* (something processed
and not yet acknowledged) or *urgent* (half the window or more pending, or a duplicate
to answer); the connection turns "pending" into a 100 ms deadline and "urgent" into an
ack at once. Items held by the outbox are opaque: the connection stores its encoded
frames there, so this module never encodes anything.

Resuming (docs/protocol.md §5). The state here is plain data that a session keeps across
connections. When a connection drops, :meth:`Inbox.detach` forgets what was received
but not processed (a handler cancelled mid-way has not processed its envelope: the
peer resends it). When the peer comes back with the highest ``seq`` it processed,
:meth:`Outbox.rewind` applies that as an ack and returns every envelope to write again,
in order, before anything new; :meth:`Inbox.resume` gives the ack to announce
(``welcome.ack`` on the server, ``hello.resume.ack`` on the client).
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .exceptions import ProtocolError
from .protocol.closecodes import CloseCode

__all__ = ["Inbox", "Outbox", "Receipt"]

T = TypeVar("T")


def _seq(entry: tuple[int, Any]) -> int:
    return entry[0]


class Receipt(enum.Enum):
    """What the inbox made of a received ``seq``."""

    NEW = "new"  # the next in order: process it
    DUPLICATE = "duplicate"  # already received: ack again, do not process again


@dataclass(slots=True)
class Outbox(Generic[T]):
    """The sending half: numbering, the window and what awaits acknowledgement.

    Args:
        window: how many sequenced envelopes may be unacknowledged in flight.
    """

    window: int
    #: The ``seq`` the next sequenced envelope gets.
    next_seq: int = 1
    #: Highest ``seq`` the peer acknowledged.
    acked: int = 0
    #: Written, not yet acknowledged, in ``seq`` order: ``(seq, item)``. Lists, not
    #: deques: an idle session keeps both, and an empty deque is ten times the size;
    #: items leave from the front in slices (every item an ack releases at once).
    in_flight: list[tuple[int, T]] = field(default_factory=list)
    #: Numbered but held back by the window, in ``seq`` order.
    waiting: list[tuple[int, T]] = field(default_factory=list)
    #: How many bytes an item holds (its encoding); None: bytes are not counted.
    measure: Callable[[T], int] | None = field(default=None, repr=False)
    #: The bytes of every item not yet acknowledged, as ``measure`` counts them.
    nbytes: int = 0
    #: The highest ``seq`` handed to a connection for writing, if the owner says
    #: (the server's session: what it numbers while detached is in flight but not
    #: written, and an ack of it is 1002); -1: everything in flight was written.
    sent: int = -1

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError("window must be at least 1")
        self.recount()

    def recount(self) -> int:
        """Count :attr:`nbytes` anew (after the items were re-encoded); return it."""
        measure = self.measure
        if measure is not None:
            self.nbytes = sum(measure(item) for _, item in self.unacknowledged())
        return self.nbytes

    @property
    def last_sent(self) -> int:
        """The highest ``seq`` handed out for writing (what the peer may ack)."""
        if self.sent >= 0:
            return max(self.sent, self.acked)
        if self.in_flight:
            return self.in_flight[-1][0]
        return self.acked

    def push(self, item: T) -> bool:
        """Take the envelope numbered :attr:`next_seq` (the caller encoded it so).

        Returns:
            True if it may be written now, False if the window holds it back.
        """
        seq = self.next_seq
        self.next_seq += 1
        if self.measure is not None:
            self.nbytes += self.measure(item)
        if not self.waiting and len(self.in_flight) < self.window:  # open, inline
            self.in_flight.append((seq, item))
            return True
        self.waiting.append((seq, item))
        return False

    def receive_ack(self, ack: int) -> list[T]:
        """Apply a cumulative ack from the peer.

        Returns:
            The items the window now lets through, in order, to be written.

        Raises:
            ProtocolError: 1002 if ``ack`` is above what was written (docs/protocol.md §4).
        """
        if ack <= self.acked:
            return []  # stale or repeated: acks are cumulative
        self.check_ack(ack)
        in_flight = self.in_flight
        self.acked = ack
        # Usually everything written so far (a client acks what it has processed).
        # Else the acknowledged ones at the front: their seqs follow one another.
        cut = len(in_flight) if ack == in_flight[-1][0] else ack - in_flight[0][0] + 1
        if not 0 < cut <= len(in_flight) or in_flight[cut - 1][0] != ack:
            cut = bisect.bisect_right(in_flight, ack, key=_seq)  # (never, but cheap to be sure)
        measure = self.measure
        if cut == len(in_flight) and not self.waiting:
            self.nbytes = 0  # everything is acknowledged (nbytes counts what is not)
        elif measure is not None:
            released = 0
            for index in range(cut):
                released += measure(in_flight[index][1])
            self.nbytes -= released
        del in_flight[:cut]
        return self._refill() if self.waiting else []

    def check_ack(self, ack: int) -> None:
        """Raise ProtocolError 1002 if ``ack`` is above what was written."""
        if self.sent < 0:  # last_sent, inline
            in_flight = self.in_flight
            last = in_flight[-1][0] if in_flight else self.acked
        else:
            last = self.sent if self.sent > self.acked else self.acked
        if ack > last:
            raise ProtocolError(
                CloseCode.PROTOCOL_ERROR, f"ack {ack} is above the last seq sent ({self.last_sent})"
            )

    def _refill(self) -> list[T]:
        room = self.window - len(self.in_flight)
        if room <= 0 or not self.waiting:
            return []
        moved = self.waiting[:room]
        del self.waiting[:room]
        self.in_flight.extend(moved)
        return [item for _, item in moved]

    @property
    def open(self) -> bool:
        """True if an envelope pushed now would be written at once (the window has room)."""
        return not self.waiting and len(self.in_flight) < self.window

    def __len__(self) -> int:
        """How many envelopes are numbered and not yet acknowledged."""
        return len(self.in_flight) + len(self.waiting)

    def rewind(self, ack: int, window: int | None = None) -> list[T]:
        """Resume on a new connection, where the peer processed everything up to ``ack``.

        Everything written before is presumed lost with the old connection. ``window``
        replaces the window if given (the peer announces it anew on each connection).

        Returns:
            Every item to write again, in ``seq`` order (at most ``window``).

        Raises:
            ProtocolError: 1002 if ``ack`` is above what was written, or below an
                ack the peer gave before (it cannot have processed less since).
        """
        if ack < self.acked:
            raise ProtocolError(
                CloseCode.PROTOCOL_ERROR,
                f"resume ack {ack} is below the ack already received ({self.acked})",
            )
        self.receive_ack(ack)
        if window is not None:
            if window < 1:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "window must be at least 1")
            self.window = window
            if len(self.in_flight) > window:  # a smaller window: hold the rest back
                self.waiting[:0] = self.in_flight[window:]
                del self.in_flight[window:]
        self._refill()
        return [item for _, item in self.in_flight]

    def clear(self) -> None:
        """Forget every item (the session ended: nothing will be sent again). Acks of
        what was sent stay valid, as stale ones."""
        self.acked = self.next_seq - 1
        if self.sent >= 0:
            self.sent = max(self.sent, self.acked)
        self.in_flight.clear()
        self.waiting.clear()
        self.nbytes = 0

    def unacknowledged(self) -> Iterator[tuple[int, T]]:
        """Every numbered envelope not yet acknowledged, in order (for resending)."""
        yield from self.in_flight
        yield from self.waiting


@dataclass(slots=True)
class Inbox:
    """The receiving half: order, duplicates, processing and acks.

    Args:
        window: how many sequenced envelopes the peer may have unacknowledged.
    """

    window: int
    #: Highest ``seq`` accepted (handed on for processing).
    received: int = 0
    #: Highest ``seq`` whose processing finished.
    processed: int = 0
    #: Highest ``seq`` put in an ack on its way to the peer.
    acked: int = 0
    #: A duplicate arrived: the peer wants an ack even if nothing new was processed.
    reack: bool = False

    def receive(self, seq: int) -> Receipt:
        """Account for a received sequenced envelope.

        Raises:
            ProtocolError: 1002 if ``seq`` skips ahead, or if the peer exceeded the
                window (more than ``window`` envelopes unacknowledged).
        """
        if seq <= self.received:
            self.reack = True
            return Receipt.DUPLICATE
        if seq != self.received + 1:
            raise ProtocolError(
                CloseCode.PROTOCOL_ERROR, f"seq {seq} skips ahead (expected {self.received + 1})"
            )
        if seq > self.acked + self.window:
            raise ProtocolError(
                CloseCode.PROTOCOL_ERROR,
                f"seq {seq} exceeds the window ({self.window} above ack {self.acked})",
            )
        self.received = seq
        return Receipt.NEW

    def mark_processed(self, seq: int) -> None:
        """Record that the envelope ``seq`` (and so all before it) was processed."""
        if seq > self.processed:
            self.processed = seq

    @property
    def ack_pending(self) -> bool:
        """Something processed is not yet acknowledged, or a duplicate wants an answer."""
        return self.processed > self.acked or self.reack

    @property
    def ack_urgent(self) -> bool:
        """Ack at once: half the window is unacknowledged, or a duplicate was received."""
        return self.reack or (self.processed - self.acked) * 2 >= self.window

    def detach(self) -> None:
        """The connection dropped: what was received and not processed will come again."""
        self.received = self.processed
        self.reack = False

    def resume(self) -> int:
        """A new connection carries on: return the ack to announce, now counted as sent."""
        self.received = self.processed
        return self.take_ack()

    def take_ack(self) -> int:
        """Return the ack value to send now and record it as sent."""
        self.acked = self.processed
        self.reack = False
        return self.processed
