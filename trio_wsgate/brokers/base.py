"""The broker interface: what the hub needs from whatever carries publications.

The hub (``trio_wsgate.hub``) uses brokers only through this interface; it names
one implementation, :class:`~trio_wsgate.brokers.memory.MemoryBroker`, as the default
when the node is given none. A broker numbers each topic's publications (``offset``:
1, 2, 3... within one ``epoch``), keeps a bounded history of them, hands every
publication of a topic the node subscribed to to the node's receiver, and keeps
presence. The in-memory broker
does all of this inside one process; the Redis one does it for many nodes.

Delivery contract. For one topic, the receiver is called with publications in offset
order, each once, from the moment :meth:`Broker.subscribe` has returned. Together with
:meth:`Broker.history` this lets the hub subscribe first, read the history second, and
drop what it sees twice, so that recovery has no gap and no duplicate
(docs/protocol.md §6).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from ..exceptions import BrokerUnavailable

__all__ = ["Broker", "ControlReceiver", "History", "PartlyParked", "Publication", "Receiver"]


@dataclass(slots=True, eq=False)
class Publication:
    """One message published to a topic, as numbered by the broker."""

    topic: str
    offset: int
    epoch: str
    data: Any = None
    event: str | None = None
    #: The shared part of its ``msg`` envelope, encoded once per subprotocol
    #: (filled by the hub on first use; see :meth:`Codec.prepare`).
    encoded: dict[str, tuple[bytes, int]] = field(default_factory=dict, repr=False)
    #: What a session of each subprotocol makes its ``msg`` with (the connection
    #: module's, made by the first session of the encoding it is delivered to).
    senders: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(slots=True)
class History:
    """What a topic's history holds after some offset, and where the topic stands."""

    #: The held publications after the asked offset, in order, of :attr:`epoch`.
    publications: list[Publication]
    #: The offset of the topic's latest publication (0: none yet in this epoch).
    offset: int
    #: The epoch the offsets belong to.
    epoch: str

    def recovers(self, since_offset: int, since_epoch: str) -> bool:
        """True if this history continues, with no gap, a client that saw ``since_offset``."""
        if since_epoch != self.epoch or since_offset > self.offset:
            return False
        if since_offset == self.offset:
            return True
        return bool(self.publications) and self.publications[0].offset == since_offset + 1


class PartlyParked(BrokerUnavailable):
    """Parking reached some of the broker's instances and not others: the sessions
    in :attr:`parked` were parked (they live on in the broker), the rest were not."""

    def __init__(self, reason: str, parked: set[str]) -> None:
        super().__init__(reason)
        self.parked = parked


#: Called by the broker for each publication of a topic the node subscribed to.
Receiver = Callable[[Publication], None]
#: Called by the broker for each control message broadcast to every node (kicks).
ControlReceiver = Callable[[dict[str, Any]], None]


class Broker(Protocol):
    """What carries publications and presence between the sessions of a gateway.

    Operations that cannot reach the broker raise
    :class:`~trio_wsgate.exceptions.BrokerUnavailable`. When the broker can be reached
    again after an outage, it tells the control receiver ``{"kind": "recovered"}``.
    """

    @property
    def healthy(self) -> bool:
        """False while the broker cannot be reached (``/readyz`` says so, still 200)."""
        ...

    #: True where other nodes share the broker, so a session this node holds can move
    #: to one of them (a draining node waits for its sessions to be asked for).
    shared: bool

    def bind(self, receiver: Receiver, control: ControlReceiver | None = None) -> None:
        """Set the node's receivers of live publications and of control messages."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The broker's own work (connections, listeners), until cancelled."""

    async def publish(
        self,
        topic: str,
        data: Any,
        event: str | None = None,
        *,
        encoded: dict[str, tuple[bytes, int]] | None = None,
    ) -> Publication:
        """Number a publication, keep it in the history and deliver it to every node.

        ``encoded`` is its data already encoded (:func:`trio_wsgate.protocol.topics.prepare_data`),
        which a broker delivering in this process passes on with the publication.
        """

    async def subscribe(self, topic: str) -> None:
        """Start delivering the topic's publications to this node's receiver."""

    async def unsubscribe(self, topic: str) -> None:
        """Stop delivering the topic's publications to this node."""

    async def history(self, topic: str, since: int | None = None) -> History:
        """The topic's held publications after ``since`` (None: none), and its position."""

    async def set_presence(self, topic: str, session: str, user: str | None, present: bool) -> None:
        """Record that a session joined (``present``) or left a topic."""

    async def presence(self, topic: str) -> dict[str, str | None]:
        """The sessions present in a topic, with their users, on every node."""

    async def broadcast(self, message: dict[str, Any]) -> None:
        """Hand a control message to every node's control receiver, this one's included."""

    # Session migration (docs/architecture.md): which node holds a session, and handing one over.

    async def claim_sessions(self, sessions: list[str], node: str) -> None:
        """Record that ``node`` holds these sessions (refreshed by the node now and then)."""

    async def release_session(self, session: str, node: str) -> None:
        """Forget that ``node`` holds the session (if it still does)."""

    async def find_session(self, session: str) -> tuple[dict[str, Any] | None, str | None]:
        """Where a session this node does not hold is: ``(state, None)`` if it was
        parked (the state is taken, so that only one node resumes it), ``(None,
        owner)`` if a node holds it, ``(None, None)`` if it is nowhere."""

    async def park_sessions(self, sessions: list[tuple[dict[str, Any], float]], node: str) -> None:
        """Leave each session's state (with how many seconds it may still be resumed)
        for whichever node its client comes back to, and stop recording ``node`` as
        its holder. A draining node's last act with a shared broker.

        Raises:
            BrokerUnavailable: none was parked.
            PartlyParked: only those it names were (a broker of several instances).
        """

    async def request_handover(
        self, session: str, owner: str, node: str, timeout: float
    ) -> dict[str, Any] | None:
        """Ask ``owner`` to hand the session over to ``node``; its state, or None.

        The owner gets the control message ``{"kind": "handover", "session", "owner",
        "to", "request"}`` and answers with :meth:`answer_handover`.
        """

    async def answer_handover(self, request: str, to: str, state: dict[str, Any] | None) -> None:
        """Send a session's state (None: not here) to the node that asked for it."""

    def statistics(self) -> dict[str, int]:
        """Figures for ``/api/stats`` (``topics``: topics known to the broker)."""
