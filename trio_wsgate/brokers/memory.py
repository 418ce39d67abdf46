"""The in-memory broker: one process, nothing to install (the default).

Each topic has an epoch (a random name drawn when the topic first appears), a counter
of offsets and a history bounded in size (``history_size``) and age (``history_ttl``).
A topic that no session is subscribed to and whose history has emptied is forgotten;
when it appears again it starts a new epoch, which tells a recovering client honestly
that what it saw before is gone (docs/protocol.md §6). Delivery to the node is a plain call
made inside :meth:`MemoryBroker.publish`, so publications reach subscribers in order.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import trio

from ..protocol import CODECS
from .base import ControlReceiver, History, Publication, Receiver

__all__ = ["MemoryBroker"]


@dataclass(slots=True)
class _Topic:
    epoch: str
    offset: int = 0
    # (trio time published, publication, its key in the node's history), oldest first.
    history: deque[tuple[float, Publication, int]] = field(default_factory=deque)
    presence: dict[str, str | None] = field(default_factory=dict)
    nbytes: int = 0  # what its history weighs (see _weight)


def _weight(publication: Publication) -> int:
    """Bytes a publication in history holds, roughly: its encodings (and, when they
    are not all made, its decoded data, as large again) and the entry itself."""
    encoded = sum(len(fields) for fields, _ in publication.encoded.values())
    return (encoded if len(publication.encoded) >= len(CODECS) else 2 * encoded) + 512


class MemoryBroker:
    """Topics, history and presence in this process.

    Args:
        history_size: publications each topic keeps; 0 keeps none.
        history_ttl: seconds a publication is kept; None: until pushed out by newer ones.
        topic_bytes: bytes of history one topic keeps at most (oldest out first).
        history_bytes: bytes of history all topics keep together; past it the node's
            oldest publications go first, whatever their topic. A publication is
            weighed by its encodings and data (:func:`_weight`).
    """

    #: Always reachable: it is this process.
    healthy = True
    shared = False

    def __init__(
        self,
        history_size: int = 100,
        history_ttl: float | None = 300.0,
        *,
        topic_bytes: int = 4 << 20,
        history_bytes: int = 64 << 20,
    ) -> None:
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.topic_bytes = topic_bytes
        self.history_bytes = history_bytes
        #: What the history of every topic weighs now.
        self.nbytes = 0
        # Every publication in history, oldest first: key -> (topic, weight).
        self._order: OrderedDict[int, tuple[str, int]] = OrderedDict()
        self._keys = 0
        self._topics: dict[str, _Topic] = {}
        self._subscribed: set[str] = set()
        self._receiver: Receiver | None = None
        self._control: ControlReceiver | None = None

    def bind(self, receiver: Receiver, control: ControlReceiver | None = None) -> None:
        """Set the node's receivers of live publications and of control messages."""
        self._receiver = receiver
        self._control = control

    async def broadcast(self, message: dict[str, Any]) -> None:
        """Hand a control message to the node (the only one), at once."""
        if self._control is not None:
            self._control(message)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forget expired history and idle topics now and then, until cancelled."""
        task_status.started()
        period = min(self.history_ttl, 60.0) if self.history_ttl else 60.0
        while True:
            await trio.sleep(period)
            self.sweep()

    def sweep(self) -> None:
        """Drop expired publications, and topics left with nothing to remember."""
        for name in list(self._topics):
            self._prune(name, self._topics[name])

    def _prune(self, name: str, topic: _Topic) -> bool:
        """Expire old history; forget an idle, empty topic. True if it was forgotten."""
        history = topic.history
        if self.history_ttl is not None and history:
            oldest = trio.current_time() - self.history_ttl
            while history and history[0][0] <= oldest:
                self._drop_oldest(topic)
        if not history and not topic.presence and name not in self._subscribed:
            del self._topics[name]
            return True
        return False

    def _drop_oldest(self, topic: _Topic) -> None:
        _, _, key = topic.history.popleft()
        _, weight = self._order.pop(key)
        topic.nbytes -= weight
        self.nbytes -= weight

    def _keep(self, name: str, topic: _Topic, publication: Publication) -> None:
        """Add to the topic's history, within its bounds and the node's."""
        weight = _weight(publication)
        # A copy of its own, without the live fan-out's envelopes (a version-2 pub per
        # subprotocol, made after this: uncounted, they held the history at about
        # twice --history-bytes); a replay makes its own and keeps none (Session).
        if len(publication.encoded) >= len(CODECS):
            # Every encoding is made: what history sends again needs no decoded data,
            # which would hold several times the bytes its encodings do.
            publication = dataclasses.replace(publication, data=None, senders={})
        else:
            publication = dataclasses.replace(publication, senders={})
        self._keys += 1
        topic.history.append((trio.current_time(), publication, self._keys))
        self._order[self._keys] = (name, weight)
        topic.nbytes += weight
        self.nbytes += weight
        while topic.history and (
            len(topic.history) > self.history_size or topic.nbytes > self.topic_bytes
        ):
            self._drop_oldest(topic)
        while self.nbytes > self.history_bytes and self._order:
            oldest_name, _ = next(iter(self._order.values()))
            oldest = self._topics[oldest_name]
            self._drop_oldest(oldest)  # its oldest is the node's oldest
            if oldest is not topic:
                self._prune(oldest_name, oldest)

    def _topic(self, name: str) -> _Topic:
        topic = self._topics.get(name)
        if topic is None or self._prune(name, topic):
            topic = self._topics[name] = _Topic(secrets.token_hex(4))
        return topic

    async def publish(
        self,
        topic: str,
        data: Any,
        event: str | None = None,
        *,
        encoded: dict[str, tuple[bytes, int]] | None = None,
    ) -> Publication:
        """Number the publication, keep it, and hand it to the node if subscribed."""
        state = self._topic(topic)
        state.offset += 1
        publication = Publication(topic, state.offset, state.epoch, data, event)
        if encoded:
            publication.encoded.update(encoded)
        if self.history_size:
            self._keep(topic, state, publication)
        if topic in self._subscribed and self._receiver is not None:
            self._receiver(publication)
        else:
            self._prune(topic, state)
        return publication

    async def subscribe(self, topic: str) -> None:
        """Deliver the topic's publications to the node."""
        self._subscribed.add(topic)

    async def unsubscribe(self, topic: str) -> None:
        """Stop delivering the topic's publications to the node."""
        self._subscribed.discard(topic)
        state = self._topics.get(topic)
        if state is not None:
            self._prune(topic, state)

    async def history(self, topic: str, since: int | None = None) -> History:
        """Held publications after ``since``, and the topic's offset and epoch."""
        state = self._topic(topic)
        held: list[Publication] = []
        if since is not None:
            held = [p for _, p, _ in state.history if p.offset > since]
        return History(held, state.offset, state.epoch)

    async def set_presence(self, topic: str, session: str, user: str | None, present: bool) -> None:
        """Record a session joining or leaving a topic."""
        if present:
            self._topic(topic).presence[session] = user
        else:
            state = self._topics.get(topic)
            if state is not None:
                state.presence.pop(session, None)
                self._prune(topic, state)  # not kept till the sweep: topics are cheap to make

    async def presence(self, topic: str) -> dict[str, str | None]:
        """The sessions present in the topic, with their users."""
        state = self._topics.get(topic)
        return dict(state.presence) if state is not None else {}

    # One process: no other node to hand a session over to.

    async def claim_sessions(self, sessions: list[str], node: str) -> None:
        """Nothing to record: every session is this node's."""

    async def release_session(self, session: str, node: str) -> None:
        """Nothing to forget."""

    async def find_session(self, session: str) -> tuple[dict[str, Any] | None, str | None]:
        """No other node holds anything, and nothing is parked."""
        return None, None

    async def park_sessions(self, sessions: list[tuple[dict[str, Any], float]], node: str) -> None:
        """Never called: the broker is not shared (a restart loses the sessions)."""

    async def request_handover(
        self, session: str, owner: str, node: str, timeout: float
    ) -> dict[str, Any] | None:
        """No other node to ask."""
        return None

    async def answer_handover(self, request: str, to: str, state: dict[str, Any] | None) -> None:
        """No other node to answer."""

    def statistics(self) -> dict[str, int]:
        """``topics``: topics with history, subscribers or presence."""
        return {"topics": len(self._topics)}
