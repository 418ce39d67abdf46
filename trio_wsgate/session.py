"""The session: the logical peer, as the application and the hub see it.

A session outlives its connections (docs/protocol.md §5): it numbers and keeps what is
sent to its client until acknowledged (:mod:`trio_wsgate.reliability`), follows topics,
and moves between connections and between nodes. This module holds its state, the
cache of how a publication is encoded for the sessions of one encoding, and the format
its state takes to move to another node, written out (:meth:`Session.export`) and read
back (:meth:`Session.restore`) here only.

A session knows its node and its connection only through the two protocols below,
:class:`SessionHost` (what the hub answers) and :class:`SessionLink` (what a
connection answers), so that this module imports neither (docs/architecture.md,
"Layers"). It does no I/O and never imports trio.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import msgpack

from .exceptions import SessionClosed, SlowConsumer
from .identity import ANONYMOUS, Identity
from .protocol import (
    CloseCode,
    CloseReason,
    Codec,
    ErrorInfo,
    Msg,
    Sequenced,
    Since,
    parse_envelope,
)
from .protocol.closecodes import ends_session, reason_for
from .protocol.envelopes import reply_wire
from .protocol.topics import encode_fields
from .protocol.values import MAX_DEPTH, check_value
from .reliability import Inbox, Outbox

if TYPE_CHECKING:
    from .brokers.base import Publication

__all__ = [
    "Outgoing",
    "ResumeResult",
    "Session",
    "SessionHost",
    "SessionLink",
    "SubscribeResult",
    "Subscription",
]

logger = logging.getLogger("trio_wsgate.session")


@dataclass(slots=True)
class Subscription:
    """A session's place in a topic: the last offset and epoch it was sent."""

    topic: str
    offset: int = 0
    epoch: str = ""
    #: Live publications held while the history is read (None once live).
    pending: list[Publication] | None = None
    #: False while the node does not follow it for the session: a session that moved
    #: here while the broker could not be asked. ``offset`` and ``epoch`` are then
    #: where it stopped, and the hub follows it again from there (Hub.migrate).
    followed: bool = True
    #: Where a subscription made without ``since`` began (its epoch "" when there is
    #: no such bound): a client's recovery of a topic it may not subscribe to itself
    #: reads no history from before (docs/protocol.md §14).
    floor: int = 0
    floor_epoch: str = ""
    #: The client subscribed it (a ``sub``): it counts against ``max_subscriptions``,
    #: what the application subscribed the session to does not (docs/protocol.md §6.3).
    by_client: bool = False


@dataclass(frozen=True, slots=True)
class SubscribeResult:
    """The answer to a subscription (the ``data`` of the ``sub`` reply, docs/protocol.md §6).

    Every publication up to ``offset`` of ``epoch`` has been queued for the session
    before this answer; later ones follow live.
    """

    offset: int
    epoch: str
    #: For a subscription with ``since``: whether the history reached back far enough
    #: and the epoch matched. None without ``since``.
    recovered: bool | None = None

    def to_data(self) -> dict[str, Any]:
        """The reply's data."""
        data: dict[str, Any] = {"offset": self.offset, "epoch": self.epoch}
        if self.recovered is not None:
            data["recovered"] = self.recovered
        return data


class ResumeResult(enum.StrEnum):
    """What became of a ``hello`` with ``resume``: the label of ``wsgate_resumes_total``."""

    RESUMED = "resumed"
    TAKEN_OVER = "taken_over"  # resumed from a connection that still looked open
    MIGRATED = "migrated"  # handed over by the node that held it
    UNKNOWN = "unknown"  # held by no node, ended, or expired
    EXPIRED = "expired"  # found, but its resume_ttl had run out
    BAD_TOKEN = "bad_token"  # the token is not this session's (forged, or another user's)
    UNAVAILABLE = "unavailable"  # the broker could not say where it is: close 1011, retry
    OTHER_VERSION = "other_version"  # a session of the other protocol version: a new one


class SessionLink(Protocol):
    """What a session, and the hub through it, need of its connection."""

    #: The close code and classified reason, once decided (None before).
    close_code: int | None
    close_reason: CloseReason | None
    #: trio time at which the connection opened (the oldest goes first at a limit).
    opened_at: float

    @property
    def closing(self) -> bool:
        """True from the decision to close on."""
        ...

    @property
    def remote_ip(self) -> str:
        """The peer's IP address (an anonymous session's owner)."""
        ...

    @property
    def backlogged(self) -> bool:
        """True while what the node has not read from the peer is over its bound (the
        peer's acks wait behind it)."""
        ...

    def close(self, code: int, reason: str = "", label: CloseReason | None = None) -> None:
        """Decide to close; return at once."""
        ...

    def check_room(self) -> None:
        """Apply the slow-consumer policy if the write queue is full."""
        ...

    def enqueue_sequenced(self, payload: bytes) -> None:
        """Queue an encoded sequenced envelope for the write loop."""
        ...

    def enqueue_unsequenced(self, payload: bytes, replay: bool = False) -> None:
        """Queue an encoded version-2 ``pub`` (never dropped; bounded in bytes, or for
        a ``replay`` from the history, by the history and the dispatcher's pace)."""
        ...

    async def wait_detached(self) -> None:
        """Wait until the connection has let go of its session (its handlers stopped)."""


class SessionHost(Protocol):
    """What a session needs of its node's hub."""

    #: True while a count of what live sessions hold is due (max_live_bytes).
    live_check_armed: bool

    @property
    def max_buffered_bytes(self) -> int:
        """The unacknowledged bytes a session may hold (``max_buffered_bytes``)."""
        ...

    def subscribe(
        self, session: Session, topic: str, since: Since | None = None
    ) -> Awaitable[SubscribeResult]:
        """Subscribe the session to a topic."""
        ...

    def unsubscribe(self, session: Session, topic: str) -> bool:
        """Unsubscribe; False if the session was not subscribed."""
        ...

    def end(self, session: Session, code: int, reason: CloseReason, *, why: str) -> None:
        """End the session for good."""
        ...

    def arm_live_check(self) -> None:
        """Count what live sessions hold, soon."""
        ...

    def hold(self, session: Session, nbytes: int) -> bool:
        """Count bytes a detached session keeps; False if the session ended for it."""
        ...

    def overflows(self, session: Session) -> bool:
        """True if the session holds more than it may keep for a resume."""
        ...

    def release_held(self, session: Session) -> None:
        """The session no longer counts as detached."""
        ...


# What makes a sequenced envelope, or its encoding, for a seq and a piggybacked ack.
_Build = Callable[[int, "int | None"], Sequenced]
_Encode = Callable[[int, "int | None"], bytes]


class Outgoing:
    """A sequenced envelope kept until acknowledged: its encoding for the wire, alone.

    The envelope object is not kept (a reply's data would be held twice, decoded and
    encoded): a resume in the other encoding or a hand-over to another node decodes
    it again from :attr:`payload`, which the value domain makes always possible.
    """

    __slots__ = ("ack", "payload", "seq")

    def __init__(self, seq: int, ack: int | None, payload: bytes) -> None:
        self.seq, self.ack, self.payload = seq, ack, payload

    def envelope(self, codec: Codec) -> Sequenced:
        """The envelope again, from its encoding by ``codec``."""
        (envelope,) = codec.decode(self.payload)
        assert isinstance(envelope, Sequenced)
        return envelope


def _size(item: Outgoing) -> int:
    return len(item.payload)


def _fields(pub: Publication, codec: Codec) -> tuple[bytes, int]:
    """The publication's fields beyond its head in ``codec``'s encoding, made once."""
    cached = pub.encoded.get(codec.encoding)
    if cached is None:  # not encoded on this node yet (another node published it)
        cached = pub.encoded[codec.encoding] = encode_fields(codec, pub.data)
    return cached


@dataclass(slots=True, frozen=True)
class _Senders:
    """How the sessions of one encoding encode a publication's ``msg``: made once per
    publication and encoding, whatever the number of subscribers."""

    encode: _Encode

    @classmethod
    def of(cls, pub: Publication, codec: Codec) -> _Senders:
        cached = _fields(pub, codec)
        fields, count = cached
        splice, event = codec.splice, pub.event
        topic, offset, epoch = pub.topic, pub.offset, pub.epoch

        def encode(seq: int, ack: int | None) -> bytes:
            head: dict[str, Any] = {"type": "msg", "seq": seq}
            if ack is not None:
                head["ack"] = ack
            if event is not None:
                head["event"] = event
            head["topic"], head["offset"], head["epoch"] = topic, offset, epoch
            return splice(head, fields, count)

        return cls(encode)


def _delivery(pub: Publication, codec: Codec) -> bytes:
    """The version-2 ``pub`` envelope of a publication: the same bytes for every
    subscriber of the subprotocol (docs/protocol.md, "Version 2")."""
    fields, count = _fields(pub, codec)
    head: dict[str, Any] = {"type": "pub", "topic": pub.topic}
    head["offset"], head["epoch"] = pub.offset, pub.epoch
    if pub.event is not None:
        head["event"] = pub.event
    if not count:  # data is required in a pub, null included
        head["data"] = None
    return codec.splice(head, fields, count)


class Session:
    """The logical peer, as application code sees it (docs/protocol.md §5).

    A session outlives its connections: when one drops, the session is kept for
    ``resume_ttl``, and :meth:`send` numbers and buffers what it is given until the
    client resumes on a new connection, which receives it all, in order, exactly once.
    Handlers, hooks and per-connection tasks receive it; it never exposes a transport.
    Sessions are made by the node's :class:`~trio_wsgate.hub.Hub`.
    """

    # Slots: a node holds tens of thousands of sessions (docs/benchmarks.md, idle).
    __slots__ = (
        "__weakref__",
        "_hub",
        "claimant",
        "close_code",
        "close_reason",
        "codec",
        "connection",
        "detached_at",
        "early",
        "ended",
        "held_bytes",
        "id",
        "identity",
        "inbox",
        "outbox",
        "owner",
        "resume_token",
        "resumed",
        "state",
        "subscriptions",
        "user",
    )

    def __init__(
        self, hub: SessionHost, session_id: str, user: str | None, codec: Codec, window: int
    ) -> None:
        self._hub = hub
        self.id = session_id
        #: The authenticated user, or None on an anonymous node.
        self.user = user
        #: The verified token's identity (claims, topics patterns); updated by ``refresh``.
        self.identity = ANONYMOUS if user is None else Identity(user)
        #: The topics the session follows, and where it stands in each.
        self.subscriptions: dict[str, Subscription] = {}
        #: Free for the application's own per-session data; kept across resumes.
        self.state: dict[str, Any] = {}
        #: The live connection, or None while detached.
        self.connection: SessionLink | None = None
        #: True if the current connection resumed the session (False for its first).
        self.resumed = False
        #: True once the session has ended for good: it will not be resumed.
        self.ended = False
        #: trio time at which the session lost its last connection (None if attached).
        self.detached_at: float | None = None
        #: The close code and reason of its last connection (None while one is open).
        self.close_code: int | None = None
        self.close_reason: CloseReason | None = None
        # (sent: what it numbers while detached is not written, and no ack of it is
        # taken, on a resume either: docs/protocol.md §5.2.)
        self.outbox: Outbox[Outgoing] = Outbox(window, measure=_size, sent=0)
        self.inbox = Inbox(window)
        self.codec = codec
        # The bytes of its outbox the node counts as held by detached sessions, and
        # whose they count as: the user's, or an anonymous client's address's.
        self.held_bytes = 0
        self.owner = "user:" + user if user is not None else ""
        # The connection that most recently asked to take the session over.
        self.claimant: SessionLink | None = None
        # Never logged nor shown in repr (a bearer secret for resuming).
        self.resume_token = ""
        #: Version 2, a new session before its welcome: the pubs its subscriptions
        #: (its user topic) gave it meanwhile, queued after the welcome (None after).
        self.early: list[bytes] | None = None

    def __repr__(self) -> str:
        state = "ended" if self.ended else "attached" if self.connection else "detached"
        return f"<Session {self.id} user={self.user!r} {state}>"

    @property
    def closed(self) -> bool:
        """True once the session has ended for good (``bye``, kick, expiry...)."""
        return self.ended

    def send(self, event: str, data: Any = None) -> None:
        """Queue a ``msg`` with this event and data for the client. Never blocks.

        While the session has no live connection the envelope is buffered for the
        resume, up to ``max_buffered``. A full connection queue closes the connection
        with 4004 and keeps the envelope for the resume all the same.

        Raises:
            SessionClosed: the session has ended.
            SlowConsumer: the session had no live connection and overflowed
                ``max_buffered`` or ``max_buffered_bytes``: it has ended now.
            ValueError: ``data`` is outside the value domain (docs/protocol.md,
                "Values"), so not every client could receive it (nothing was queued).
        """
        if not isinstance(event, str):
            raise TypeError(f"an event is a string, not {event!r}")
        check_value(event)
        check_value(data, MAX_DEPTH - 1)
        self._push(lambda seq, ack: Msg(seq=seq, event=event, data=data, ack=ack))

    @property
    def topics(self) -> list[str]:
        """The topics the session is subscribed to (once ended: those it was, for the
        session-end hooks)."""
        return list(self.subscriptions)

    async def subscribe(self, topic: str, since: Since | None = None) -> SubscribeResult:
        """Subscribe the session to a topic, whatever the client may do itself.

        Server-side subscriptions (from handlers and hooks) are not checked against
        any authorisation. See :meth:`Hub.subscribe <trio_wsgate.hub.Hub.subscribe>`.
        """
        return await self._hub.subscribe(self, topic, since)

    def unsubscribe(self, topic: str) -> bool:
        """Unsubscribe from a topic. Returns False if the session was not subscribed."""
        return self._hub.unsubscribe(self, topic)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the current connection with ``code``. Returns at once.

        Whether the session survives for a resume follows docs/protocol.md §8: it does
        after 1000, 1001, 1011 or 4004, not after 4005 (kick), 4001 or a 1002.

        Raises:
            ValueError: ``code`` is not one a close frame may carry (RFC 6455 §7.4:
                1000-1003, 1007-1014, or 3000-4999 for applications), before anything
                is decided: it could not be sent, and the peer would see 1006.
        """
        if not (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999):
            raise ValueError(f"{code} is not a close code a close frame may carry")
        label = reason_for(code)
        if self.connection is not None:
            self.connection.close(code, reason, label)
        elif not self.ended and ends_session(label):
            self._hub.end(self, code, label, why=str(label))

    def _live(self) -> SessionLink | None:
        connection = self.connection
        if connection is None or connection.closing:
            return None
        return connection

    def deliver(self, pub: Publication, replay: bool = False) -> None:
        """Queue a publication: its data encoded once for all, its head for this session.

        In protocol version 2 it is the same ``pub`` envelope for every subscriber of
        the subprotocol, not numbered nor kept: only a live connection gets it, and a
        client that was away asks its topics' histories (docs/protocol.md §14); a
        ``replay`` (what a ``sub`` sends from the history) is bounded by the history.
        """
        codec = self.codec
        if codec.version == 2:
            if self.ended:
                raise SessionClosed(self.close_code, self.close_reason)
            connection = self._live()
            early = self.early
            if connection is None and early is None:
                return  # detached: its client asks the history
            payload = pub.senders.get(codec.subprotocol)
            if payload is None:
                payload = _delivery(pub, codec)
                if not replay:  # (a history's copy keeps none: its bytes are counted)
                    pub.senders[codec.subprotocol] = payload
            if connection is not None:
                connection.enqueue_unsequenced(payload, replay)
            elif early is not None and self.connection is None:
                if len(early) >= self.outbox.window:
                    # More than a window of them before its welcome: it starts again.
                    self._hub.end(
                        self, CloseCode.TRY_AGAIN_LATER, CloseReason.SLOW_CONSUMER, why="overflow"
                    )
                    raise SlowConsumer(CloseCode.SLOW_CONSUMER, CloseReason.SLOW_CONSUMER)
                early.append(payload)
            return
        senders = pub.senders.get(self.codec.subprotocol)
        if senders is None:
            senders = pub.senders[self.codec.subprotocol] = _Senders.of(pub, self.codec)
        self._push(None, senders.encode)

    def _push(self, build: _Build | None, encode: _Encode | None = None) -> None:
        """Number, encode and queue (or buffer) a sequenced envelope.

        A pending ack rides along only if the window lets the envelope out now; an
        envelope held back would hold the ack back too (docs/protocol.md §4: acks within
        100 ms). TypeError/ValueError from the codec leave everything unchanged.

        Past ``max_buffered_bytes`` of unacknowledged envelopes, a live connection is
        closed with 4004 and the session ends at once; a detached session ends, and
        one that takes the node past ``max_detached_bytes`` makes the owner holding
        the most give sessions up (:meth:`Hub.hold <trio_wsgate.hub.Hub.hold>`).
        """
        if self.ended:
            raise SessionClosed(self.close_code, self.close_reason)
        connection = self._live()
        if connection is not None:
            connection.check_room()  # a full queue closes the connection with 4004
            if connection.closing:
                connection = None  # (what _live says now)
        outbox, inbox = self.outbox, self.inbox
        ack = (
            inbox.processed
            if connection is not None and outbox.open and inbox.ack_pending
            else None
        )
        seq = outbox.next_seq
        if encode is None:
            assert build is not None
            payload = self.codec.encode(build(seq, ack))
        else:
            payload = encode(seq, ack)
        if ack is not None:
            inbox.take_ack()
        goes_now = outbox.push(Outgoing(seq, ack, payload))
        hub = self._hub
        if connection is not None:
            if goes_now:
                connection.enqueue_sequenced(payload)
                outbox.sent = seq
            if not hub.live_check_armed:
                hub.arm_live_check()
            nbytes, limit = outbox.nbytes, hub.max_buffered_bytes
            # Twice the bound while its acks wait behind what the node has not read yet.
            if nbytes > limit and (nbytes > 2 * limit or not connection.backlogged):
                # Over what a session may keep for a resume: it ends now, and what it
                # held goes with it, not when its connection is released.
                connection.close(CloseCode.SLOW_CONSUMER, "slow consumer")
                hub.end(self, CloseCode.SLOW_CONSUMER, CloseReason.SLOW_CONSUMER, why="overflow")
        elif self.connection is None:
            if not hub.hold(self, len(payload)):
                raise SlowConsumer(CloseCode.SLOW_CONSUMER, CloseReason.SLOW_CONSUMER)
        elif hub.overflows(self):  # its connection is closing: kept for the resume
            hub.end(self, CloseCode.SLOW_CONSUMER, CloseReason.SLOW_CONSUMER, why="overflow")
            raise SlowConsumer(CloseCode.SLOW_CONSUMER, CloseReason.SLOW_CONSUMER)

    def reply(self, re: int, data: Any, error: ErrorInfo | None) -> None:
        """Queue the ``reply`` to the client's envelope ``re`` (a processed one: it is kept
        for a resume even if the connection is closing). Data outside the value domain
        becomes error ``internal``; a session that has ended has no one to reply to."""
        # A reply to a processed envelope is kept by the session even if this
        # connection is closing: the client gets it when it resumes.
        try:
            dumps = self.codec.dumps
            try:
                if not (data is None or (type(data) is str and data.isascii())):
                    check_value(data, MAX_DEPTH - 1)  # every encoding, every node carries it
                self._push(None, lambda seq, ack: dumps(reply_wire(seq, re, data, error, ack)))
            except (TypeError, ValueError, OverflowError):
                logger.exception("reply to seq %d could not be encoded", re)
                failure = ErrorInfo("internal", "the reply could not be encoded")
                self._push(None, lambda seq, ack: dumps(reply_wire(seq, re, None, failure, ack)))
        except SessionClosed:
            pass  # the session ended: there is no one to reply to

    def attach(self, connection: SessionLink, codec: Codec, resumed: bool) -> None:
        """Bind to a connection; re-encode what is kept if the encoding changed.

        Raises:
            TypeError, ValueError: a kept envelope cannot be re-encoded in ``codec``
                (nothing was changed). The value domain rules it out; the caller
                ends the session all the same, rather than leave it half attached.
        """
        if codec.subprotocol != self.codec.subprotocol:
            items = list(self.outbox.unacknowledged())
            payloads = [codec.encode(item.envelope(self.codec)) for _, item in items]
            for (_, item), payload in zip(items, payloads, strict=True):
                item.payload = payload
            self.outbox.recount()
        self.codec = codec
        self._hub.release_held(self)
        if self.user is None:
            self.owner = "ip:" + connection.remote_ip
        self.connection = connection
        self.resumed = resumed
        self.detached_at = None
        self.close_code = self.close_reason = None

    # -- moving between nodes: the state format, written and read here only ------------

    def export(self) -> dict[str, Any]:
        """The session's state for another node (msgpack-able): its numbering, what it
        keeps unacknowledged (as wire envelopes), its topics and the application's
        ``state`` (left behind, with a warning, if msgpack cannot carry it).

        Raises:
            TypeError, ValueError: a kept envelope cannot be decoded again (the value
                domain rules it out; the hub ends such a session).
        """
        outbox, inbox, codec = self.outbox, self.inbox, self.codec
        app_state: dict[str, Any] = self.state
        try:
            msgpack.packb(app_state, use_bin_type=True)
        except (TypeError, ValueError, OverflowError):
            logger.warning("the state of session %s cannot move between nodes", self.id)
            app_state = {}
        return {
            "id": self.id,
            "version": codec.version,
            "user": self.user,
            "state": app_state,
            "outbox": {
                "window": outbox.window,
                "next_seq": outbox.next_seq,
                "acked": outbox.acked,
                "sent": outbox.last_sent,
                "in_flight": [item.envelope(codec).to_wire() for _, item in outbox.in_flight],
                "waiting": [item.envelope(codec).to_wire() for _, item in outbox.waiting],
            },
            "inbox": {
                "window": inbox.window,
                "processed": inbox.processed,
                "acked": inbox.acked,
            },
            "subscriptions": {
                topic: [sub.offset, sub.epoch] for topic, sub in self.subscriptions.items()
            },
            "floors": {
                topic: [sub.floor, sub.floor_epoch]
                for topic, sub in self.subscriptions.items()
                if sub.floor_epoch
            },
            # The client's own (max_subscriptions counts them on the next node too).
            "by_client": [topic for topic, sub in self.subscriptions.items() if sub.by_client],
        }

    @classmethod
    def restore(
        cls,
        hub: SessionHost,
        state: dict[str, Any],
        user: str | None,
        codec: Codec,
        resume_token: str,
    ) -> Session:
        """A session made from what :meth:`export` wrote on another node (its
        subscriptions are the hub's to follow again: ``state["subscriptions"]``)."""
        outbox = state["outbox"]
        session = cls(hub, state["id"], user, codec, outbox["window"])
        session.resume_token = resume_token
        session.state = state.get("state") or {}
        kept = Outbox[Outgoing](outbox["window"], outbox["next_seq"], outbox["acked"])
        for queue, wires in (
            (kept.in_flight, outbox["in_flight"]),
            (kept.waiting, outbox["waiting"]),
        ):
            for wire in wires:
                envelope = parse_envelope(check_value(wire))
                assert isinstance(envelope, Sequenced)
                queue.append(
                    (envelope.seq, Outgoing(envelope.seq, envelope.ack, codec.encode(envelope)))
                )
        kept.measure = session.outbox.measure
        kept.recount()
        # What the other node had written (a state from a node that did not say: all
        # it had in flight).
        kept.sent = outbox.get("sent", kept.last_sent)
        session.outbox = kept
        inbox = state["inbox"]
        session.inbox = Inbox(
            inbox["window"], inbox["processed"], inbox["processed"], inbox["acked"]
        )
        return session
