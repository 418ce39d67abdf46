"""A trio client that never loses a message: ``open_client()``.

::

    async with trio_wsgate.open_client("ws://127.0.0.1:8000/ws") as client:
        print(await client.request("echo", {"hello": "world"}))
        await client.send("say", "fire and forget, but delivered exactly once")
        async for message in client.messages():
            print(message.event, message.data)

Theory of operation. The client is a small nursery: a *connect loop* that opens one
connection at a time and, around each, a reader, a write loop, a watchdog and an ack
timer (the mirror of the server's connection, docs/architecture.md, "The shape"). The session
state outlives the connections: an :class:`~trio_wsgate.reliability.Outbox` numbers what
the application sends and keeps it until acknowledged; an
:class:`~trio_wsgate.reliability.Inbox` orders what the server sends. After a drop the
loop reconnects with exponential backoff and full jitter and sends ``hello`` with
``resume``; on ``welcome`` both sides resend what the other has not processed
(docs/protocol.md §5). So the application sees every reply and message exactly once and in
order, and every envelope it sent is processed exactly once, across any number of
drops.

When the server no longer holds the session (``resumed: false``), the client carries
on in a new session and says so (:attr:`ClientState.SESSION_LOST`). What was never
written is sent in the new session; a request that was written and not acknowledged
may or may not have run, so it raises :class:`~trio_wsgate.SessionLost`, and such a
``send`` is counted in :meth:`Client.statistics` (``lost_sends``).

A server message counts as processed, and is acknowledged, once it is in the client's
buffer (up to ``buffer`` messages, default 1000) or taken by :meth:`Client.messages`.
Past that the client stops acknowledging, so a reader that falls behind holds the
server back instead of growing memory without bound.
"""

from __future__ import annotations

import enum
import logging
import math
import random
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import trio
from websockets.uri import parse_uri

from .exceptions import ClientClosed, HandlerError, ProtocolError, SessionLost
from .logs import redact
from .protocol import (
    JSON_SUBPROTOCOL,
    JSON_V2_SUBPROTOCOL,
    MSGPACK_SUBPROTOCOL,
    MSGPACK_V2_SUBPROTOCOL,
    SUBPROTOCOLS,
    Ack,
    Bye,
    CloseCode,
    Delivery,
    Envelope,
    Hello,
    Msg,
    Ping,
    Pong,
    Pub,
    Refresh,
    Reply,
    Resume,
    Sequenced,
    Since,
    Sub,
    Unsub,
    Welcome,
)
from .reliability import Inbox, Outbox, Receipt
from .transports.base import TransportBroken
from .transports.websockets import HandshakeRefused, WebsocketsTransport, client_handshake

__all__ = [
    "Backoff",
    "Client",
    "ClientState",
    "ClientStatistics",
    "Message",
    "open_client",
    "reconnects_after",
]

logger = logging.getLogger("trio_wsgate.client")

# docs/protocol.md §8, the last column: the close codes after which a client reconnects
# by itself. 1006 stands for "no close frame" (a reset, EOF or a silent server).
_RECONNECT_CODES = frozenset(
    {
        CloseCode.GOING_AWAY,
        CloseCode.ABNORMAL,
        CloseCode.INTERNAL_ERROR,
        CloseCode.TRY_AGAIN_LATER,
        CloseCode.HEARTBEAT_TIMEOUT,
        CloseCode.HELLO_TIMEOUT,
        CloseCode.SLOW_CONSUMER,
        CloseCode.RATE_LIMITED,
    }
)
# HTTP answers to the upgrade after which trying again later can help.
_RETRY_STATUSES = frozenset({429, 502, 503, 504})


def reconnects_after(code: int) -> bool:
    """True if docs/protocol.md §8 has the client reconnect by itself after ``code``."""
    return code in _RECONNECT_CODES


class ClientState(enum.Enum):
    """Where the client stands. Every value but CONNECTING and CLOSED is connected."""

    #: No live connection: connecting, or waiting to reconnect.
    CONNECTING = "connecting"
    #: Connected, in the client's first session.
    CONNECTED = "connected"
    #: Connected again, and the server resumed the session: nothing was lost.
    RESUMED = "resumed"
    #: Connected again, but in a new session: the server had dropped the old one.
    SESSION_LOST = "session_lost"
    #: Stopped for good (closed by the application, or a close code that does not
    #: reconnect, or out of attempts).
    CLOSED = "closed"


# Version 2: recoveries (sub with since) under way at once. Each sends what its topic's
# history holds after the position (--history-size, 100 by default); four of them stay
# well inside the server's queue (--queue-size, 1000).
_RECOVERIES_AT_ONCE = 4

_CONNECTED = frozenset({ClientState.CONNECTED, ClientState.RESUMED, ClientState.SESSION_LOST})


@dataclass(frozen=True, slots=True)
class Message:
    """A ``msg`` from the server."""

    event: str | None
    data: Any
    topic: str | None = None
    offset: int | None = None
    epoch: str | None = None


class _Held(list[Message]):
    """What a recovery of a topic holds until its reply; ``top`` is its highest offset."""

    __slots__ = ("top",)

    def __init__(self) -> None:
        super().__init__()
        self.top = -1

    def hold(self, message: Message) -> None:
        self.append(message)
        self.top = max(self.top, message.offset or 0)

    def swap_top(self, message: Message) -> None:
        """Hold ``message`` instead of the highest held one, if it is lower and of the
        same epoch (the buffer is full: one of them is let go, and asked again)."""
        offset = message.offset or 0
        if offset >= self.top:
            return
        index = max(range(len(self)), key=lambda i: self[i].offset or 0)
        if self[index].epoch == message.epoch:
            self[index] = message
            self.top = max(m.offset or 0 for m in self)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter between connection attempts.

    The n-th attempt (from 0) since the last ``welcome`` waits a uniformly random time
    in ``[0, min(cap, base * factor**n)]``: the spread keeps a fleet of clients that
    lost the same server from coming back in one storm. A ``welcome`` (a new or a
    resumed session) is a success and restarts the count, however short the connection
    then lives, as socket.io-client, centrifuge-js and websockets' ``connect()`` do: a
    link that drops every few hundred milliseconds still reconnects within ``base``.
    The first wait after a welcome is still drawn over ``[0, base]``, so a server that
    welcomes and closes at once (1011, 4004, ...) sees a reconnection every ``base / 2``
    seconds on average from each client, not a tight loop; ``base`` bounds that rate.

    Args:
        base: the ceiling of the first wait, seconds.
        factor: how much the ceiling grows per failed attempt.
        cap: the largest ceiling, seconds.
        max_attempts: give up (CLOSED) after this many failed attempts in a row (with
            no welcome between them); None tries for ever.
        reset_after: deprecated and ignored: a welcome restarts the count. Still
            accepted so that existing callers keep working.
    """

    base: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    max_attempts: int | None = None
    # Deprecated no-op (issue 18), kept out of repr and comparisons.
    reset_after: float | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.base < 0 or self.cap < 0 or self.factor < 1:
            raise ValueError("backoff needs base >= 0, cap >= 0 and factor >= 1")

    def ceiling(self, attempt: int) -> float:
        """The largest wait before attempt number ``attempt`` (from 0)."""
        return min(self.cap, self.base * self.factor ** min(attempt, 64))

    def delay(self, attempt: int, rng: random.Random) -> float:
        """A wait drawn with full jitter for attempt number ``attempt``."""
        return rng.uniform(0.0, self.ceiling(attempt))


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    """Counters of a client's life, from :meth:`Client.statistics`."""

    connects: int
    resumes: int
    sessions_lost: int
    lost_sends: int
    pending: int
    buffered: int


@dataclass(slots=True)
class _Request:
    done: trio.Event
    data: Any = None
    error: Exception | None = None
    #: Called with the reply's data when it arrives (subscriptions track positions).
    on_data: Callable[[Any], None] | None = None
    #: Called with the error when the reply is one (failed resubscriptions retry).
    on_error: Callable[[HandlerError], None] | None = None
    #: The topic an application's ``sub`` places with its reply.
    places: str | None = None


@dataclass(slots=True)
class _Pending:
    """A sequenced envelope of ours kept until the server acknowledges it."""

    envelope: Sequenced
    payload: bytes
    waiter: _Request | None = None
    #: Handed to a connection after its welcome: the server may have processed it.
    written: bool = False


class _Link:
    """One connection: its transport, its write queue and how it ended."""

    def __init__(self, transport: WebsocketsTransport) -> None:
        self.transport = transport
        self.queue: deque[bytes] = deque()
        self.wake = trio.Event()
        self.ack_wanted = trio.Event()
        self.nursery: trio.Nursery | None = None
        self.liveness = trio.CancelScope()
        self.silence: float = math.inf
        self.welcomed_at: float | None = None
        #: The server's bound on a message (from welcome): batches stay below it.
        self.max_message_size = 65536
        self.closing = False
        self.bye_sent = False
        self.close_code: int | None = None
        self.close_reason = ""
        #: The token its hello carried.
        self.hello_token: str | None = None

    def enqueue(self, payload: bytes) -> None:
        self.queue.append(payload)
        self.wake.set()

    def touch(self) -> None:
        self.liveness.deadline = trio.current_time() + self.silence

    def record(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason

    def end(self, code: int, reason: str, close_timeout: float) -> None:
        """Close from our side: a close frame, and a bound on the wait for the server."""
        self.record(code, reason)
        if self.closing:
            return
        self.closing = True
        self.transport.send_close(code, reason)
        self.wake.set()
        if self.nursery is not None:
            self.nursery.cancel_scope.deadline = trio.current_time() + close_timeout

    def peer_closed(self, code: int, reason: str, close_timeout: float) -> None:
        """The server sent a close frame (or websockets failed the connection)."""
        self.record(code, reason)
        if not self.closing:
            self.closing = True
            if self.nursery is not None:
                self.nursery.cancel_scope.deadline = trio.current_time() + close_timeout

    def abort(self, code: int, reason: str) -> None:
        """The connection is gone or dead: stop at once."""
        self.record(code, reason)
        self.closing = True
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()


StreamFactory = Callable[[], Awaitable[trio.abc.Stream]]


class Client:
    """A reliable wsgate client. Make one with :func:`open_client`.

    Args:
        url: ``ws://host:port/path`` (or ``wss://``).
        token: sent in ``hello`` (a JWT where the server wants one).
        encoding: ``"json"`` or ``"msgpack"``.
        protocol: the wire protocol version, 1 or 2 (docs/protocol.md, "Version"). In
            version 2 publications are not numbered by the session: after every
            resumed reconnection, the client asks each topic's history for
            what it missed, and a topic's publications are not ordered with the
            session's other messages.
        backoff: the reconnection schedule.
        max_pending: envelopes of ours kept unacknowledged (in flight or queued);
            past this :meth:`send` and :meth:`request` wait.
        buffer: server messages held for :meth:`messages` before acks stop.
        connect_timeout: bound on one attempt: TCP, the handshake and ``welcome``.
        close_timeout: bound on :meth:`aclose` (flushing what is unacknowledged,
            ``bye``, the closing handshake).
        headers: extra HTTP headers of the opening handshake.
        connect: opens the byte stream (default: TCP, or TLS for ``wss://``);
            tests pass in-memory streams here.
        seed: seeds the jitter, for repeatable tests.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        encoding: str = "json",
        protocol: int = 1,
        backoff: Backoff | None = None,
        max_pending: int = 1000,
        buffer: int = 1000,
        connect_timeout: float = 10.0,
        close_timeout: float = 5.0,
        headers: dict[str, str] | None = None,
        connect: StreamFactory | None = None,
        seed: int | None = None,
    ) -> None:
        subprotocol = {
            ("json", 1): JSON_SUBPROTOCOL,
            ("msgpack", 1): MSGPACK_SUBPROTOCOL,
            ("json", 2): JSON_V2_SUBPROTOCOL,
            ("msgpack", 2): MSGPACK_V2_SUBPROTOCOL,
        }.get((encoding, protocol))
        if subprotocol is None:
            if protocol not in (1, 2):
                raise ValueError(f"protocol must be 1 or 2, not {protocol!r}")
            raise ValueError(f"encoding must be 'json' or 'msgpack', not {encoding!r}")
        if max_pending < 1 or buffer < 0:
            raise ValueError("max_pending must be at least 1 and buffer not negative")
        self.url = url
        self._uri = parse_uri(url)
        self._token = token
        self._subprotocol = subprotocol
        self._codec = SUBPROTOCOLS[subprotocol]()
        self._v2 = protocol == 2
        self._backoff = backoff or Backoff()
        self._max_pending = max_pending
        self._buffer_size = buffer
        self._connect_timeout = connect_timeout
        self._close_timeout = close_timeout
        self._headers = headers or {}
        self._open_stream = connect or self._open_tcp
        self._rng = random.Random(seed)
        # The largest message the server takes: the protocol's default until a welcome.
        self._max_message_size = 65536

        #: Where the client stands; see :meth:`wait_state` and :meth:`state_changes`.
        self.state = ClientState.CONNECTING
        #: The server's session id, once welcomed.
        self.session: str | None = None
        #: The user the server authenticated, if any.
        self.user: str | None = None
        #: The close code and reason the client stopped with (None while running).
        self.close_code: int | None = None
        self.close_reason = ""
        self._resume_token: str | None = None
        self._outbox: Outbox[_Pending] = Outbox(1)  # the window comes with welcome
        self._inbox = Inbox(1)
        self._requests: dict[int, _Request] = {}
        # Server messages not yet taken, as (seq, message); seq 0 for those of an
        # earlier session, which owe no ack.
        self._buffer: deque[tuple[int, Message]] = deque()
        self._link: _Link | None = None
        self._changed = trio.Event()  # any change a waiter may care about
        self._watchers: weakref.WeakSet[_StateChanges] = weakref.WeakSet()
        self._closing = False  # no new sends: aclose() is flushing
        self._stopping = False  # the connect loop stops
        self._closed_by_app = False
        self._tasks: trio.Nursery | None = None  # open_client's nursery
        self._connects = self._resumes = self._sessions_lost = self._lost_sends = 0
        # Topics subscribed (by us, or the user's own), and the last (offset, epoch)
        # received in each: where a recovery starts (docs/protocol.md §6).
        self._topics: dict[str, tuple[int, str] | None] = {}
        #: After a lost session, whether each topic's recovery had no gap (False: the
        #: application should reload that topic's state).
        self.recovered: dict[str, bool] = {}
        # Topics being recovered (a sub with since in flight after a lost session), with
        # their publications that came before its reply: the new session may follow a
        # topic already (its user topic, or one its on_connect joined), so a live one
        # can come before the gap; they are delivered in offset order at the reply.
        self._recovering: dict[str, _Held] = {}
        # Version 2: topics whose publications were let go while the buffer was full;
        # each is asked again from its position once the buffer has room.
        self._behind: set[str] = set()
        # Version 2: topics unsubscribed whose unsub is not answered yet (what still
        # comes of them is not followed again).
        self._leaving: set[str] = set()
        # Version 2: topics followed because the server sent them (the application
        # subscribed the session): recovered only while the session still follows them.
        self._server_topics: set[str] = set()
        # Version 2: the application's topics this session has not subscribed yet (after
        # a lost session, until their sub is answered): a resume must subscribe them,
        # not only recover them.
        self._unfollowed: set[str] = set()
        # Version 2: recoveries waiting to be sent, and how many are under way (at most
        # _RECOVERIES_AT_ONCE: what each sends counts against the server's queue).
        self._to_recover: deque[tuple[str, bool]] = deque()
        self._recoveries = 0
        # Welcomes so far: a sub's reply says where its publications went only if it
        # comes on the connection the sub was sent on (in version 2, those sent on a
        # connection that died are not sent again).
        self._welcomes = 0

    # -- the application's side -------------------------------------------------------

    async def request(self, event: str, data: Any = None) -> Any:
        """Send a ``msg`` and wait for the handler's reply; return its ``data``.

        Cancelling the wait does not unsend the message: it is delivered all the same
        and its reply is dropped.

        Raises:
            HandlerError: the reply was an error (its ``code`` and ``reason``).
            SessionLost: the server dropped the session with the request unanswered.
            ClientClosed: the client stopped first.
            ValueError: ``data`` is outside the value domain, or the envelope is larger
                than the server's ``max_message_size`` (nothing was sent).
        """
        return await self._call(lambda seq, ack: Msg(seq=seq, event=event, data=data, ack=ack))

    async def subscribe(self, topic: str) -> dict[str, Any]:
        """Subscribe to a topic; return the reply's data (``offset``, ``epoch``).

        Its publications arrive through :meth:`messages` (``Message.topic``). If the
        server loses the session, the client subscribes again from the last offset it
        received and records in :attr:`recovered` whether nothing was missed.

        Raises:
            HandlerError: ``forbidden`` or ``bad_topic``.
        """
        known = topic in self._topics
        self._topics.setdefault(topic, None)
        server_topic = topic in self._server_topics
        self._server_topics.discard(topic)
        try:
            return await self._call(  # type: ignore[no-any-return]
                self._sub_builder(topic), self._tracker(topic), self._unplaced(topic), topic
            )
        except HandlerError:
            if not known:  # a topic followed already stays followed (forbidden, unavailable)
                self._topics.pop(topic, None)
            elif server_topic:
                self._server_topics.add(topic)
            raise

    async def unsubscribe(self, topic: str) -> None:
        """Unsubscribe from a topic."""
        self._topics.pop(topic, None)
        self._recovering.pop(topic, None)  # what a recovery held goes with it
        self._behind.discard(topic)
        self._server_topics.discard(topic)
        self._unfollowed.discard(topic)
        self._leaving.add(topic)
        try:
            await self._call(lambda seq, ack: Unsub(seq=seq, topic=topic, ack=ack))
        finally:
            self._leaving.discard(topic)

    async def publish(self, topic: str, data: Any) -> dict[str, Any]:
        """Publish to a topic where the server allows it; return ``offset`` and ``epoch``.

        Raises:
            HandlerError: ``forbidden``, ``bad_topic`` or ``bad_data``.
        """
        result = await self._call(lambda seq, ack: Pub(seq=seq, topic=topic, data=data, ack=ack))
        return result  # type: ignore[no-any-return]

    def refresh(self, token: str) -> None:
        """Send a fresh token for the same user before the current one expires (§8).

        Later connections use it too.
        """
        self._token = token
        link = self._live_link()
        if link is not None:
            link.enqueue(self._codec.encode(Refresh(token)))

    def _sub_builder(
        self, topic: str, recover: bool = False
    ) -> Callable[[int, int | None], Sequenced]:
        position = self._topics.get(topic)
        since = None if position is None else Since(*position)
        flag = True if recover else None
        return lambda seq, ack: Sub(seq=seq, topic=topic, since=since, ack=ack, recover=flag)

    def _tracker(
        self, topic: str, counted: bool = False, recovery: bool = False
    ) -> Callable[[Any], None]:
        """What a ``sub``'s reply does: place the topic, deliver what its recovery
        held. ``counted``: a recovery of _send_recoveries's (the next one goes when
        it is answered); ``recovery``: a recovery retried by _subscribe_again."""
        welcomes = self._welcomes
        # The recovery this sub is (what it holds), if it is one.
        held = self._recovering.get(topic) if counted or recovery else None

        def track(data: Any) -> None:
            if counted:
                self._recovery_done(welcomes)
            self._unfollowed.discard(topic)  # answered: the session follows it
            if self._v2 and welcomes != self._welcomes:
                # Sent on a connection that died: what it sent may have died with it,
                # and a recovery of this connection asks from our own position.
                self._stale_reply(topic, data)
                return
            if self._v2 and topic in self._recovering and self._recovering[topic] is not held:
                return  # another recovery of the topic holds what is below: it places it
            if isinstance(data, dict) and topic in self._topics:
                offset, epoch = data.get("offset"), data.get("epoch")
                if isinstance(offset, int) and isinstance(epoch, str):
                    self._release(topic, epoch)
                    last = self._topics[topic]
                    if topic in self._behind:
                        pass  # what came after its position was let go: asked again
                    elif last is None or last[1] != epoch or last[0] < offset:
                        self._topics[topic] = (offset, epoch)
                if "recovered" in data:
                    self.recovered[topic] = bool(data["recovered"])
                    if not data["recovered"]:
                        logger.warning("topic %s was not recovered: reload its state", topic)
            if self._behind and len(self._buffer) <= self._buffer_size // 2:
                self._catch_up()

        return track

    def _stale_reply(self, topic: str, data: Any) -> None:
        """A version-2 sub reply that comes on a later connection than its sub went on:
        it places a topic that had no position yet (then asked from there), and is
        otherwise left to the recoveries of this connection.

        A topic that had no position at the resumed welcome is held since then (see
        _on_welcome): a live ``pub`` may come before this reply, and taking its offset
        as the position would skip what was published while the session had no
        connection. Its recovery from the reply's offset goes at once and keeps what is
        held, delivered in offset order at that recovery's reply (§14)."""
        if self._topics.get(topic, ()) is not None:
            return
        offset = data.get("offset") if isinstance(data, dict) else None
        epoch = data.get("epoch") if isinstance(data, dict) else None
        if not isinstance(offset, int) or not isinstance(epoch, str):
            self._release(topic, None)  # nothing to place it with: deliver what it holds
            return
        self._topics[topic] = (offset, epoch)
        if topic in self._recovering:
            self._to_recover.append((topic, True))
            link = self._live_link()
            if link is not None:  # else the next welcome recovers it from here anyway
                for item in self._send_recoveries():
                    self._write(link, item)
            return
        self._behind.add(topic)
        if len(self._buffer) <= self._buffer_size // 2:
            self._catch_up()

    def _unplaced(self, topic: str) -> Callable[[HandlerError], None]:
        """What an application's ``sub`` answered with an error does: a topic held
        since a resumed welcome for this (late) reply delivers what it holds, as a
        recovery that gives up does (nothing will place it)."""
        welcomes = self._welcomes

        def unplaced(error: HandlerError) -> None:
            if self._v2 and welcomes != self._welcomes and self._topics.get(topic) is None:
                self._release(topic, None)

        return unplaced

    def _recovery_done(self, welcomes: int) -> None:
        """A version-2 recovery of this connection was answered: send the next ones."""
        if welcomes != self._welcomes:
            return  # of an earlier connection: its count was reset
        self._recoveries -= 1
        link = self._live_link()
        if link is not None:
            for item in self._send_recoveries():
                self._write(link, item)

    def _release(self, topic: str, epoch: str | None) -> None:
        """Deliver what came during ``topic``'s recovery: once each, in offset order.

        ``epoch`` is the recovery's (a new one when ``recovered`` is false): its
        publications go last. Without one (the recovery gave up), each epoch's go in
        the order the epochs first came. Within an epoch, by offset, each once, and
        none at or below the position the recovery started from.
        """
        held = self._recovering.pop(topic, None)
        if not held:
            return
        position = self._topics.get(topic)
        by_epoch: dict[str | None, dict[int, Message]] = {}
        for message in held:
            by_epoch.setdefault(message.epoch, {}).setdefault(message.offset or 0, message)
        if epoch in by_epoch:
            by_epoch[epoch] = by_epoch.pop(epoch)  # the recovery's own epoch last
        for group, messages in by_epoch.items():
            for offset in sorted(messages):
                if position is not None and position[1] == group and offset <= position[0]:
                    continue
                self._buffer.append((0, messages[offset]))  # acked when it came
                if group is not None:
                    self._topics[topic] = position = (offset, group)

    def _retrier(self, topic: str, counted: bool = False) -> Callable[[HandlerError], None]:
        """Try an automatic resubscription again while the server says ``unavailable``."""
        welcomes = self._welcomes

        def retry(error: HandlerError) -> None:
            if counted:
                self._recovery_done(welcomes)
            if error.code == "unavailable" and topic in self._topics and self._tasks:
                # What the recovery holds waits for the next attempt's reply.
                self._tasks.start_soon(self._subscribe_again, topic)
            else:
                self._give_up(topic, error)

        return retry

    def _give_up(self, topic: str, error: HandlerError) -> None:
        """An automatic resubscription failed for good: deliver what its recovery held
        and, in version 2, stop following the topic."""
        self._release(topic, None)
        self._notify()  # a messages() reader may be waiting for what was held
        if self._v2:
            # Not ours to follow (any more): a reconnection would ask again.
            # (not_subscribed: the server unsubscribed the session from it.)
            logger.warning("topic %s is not followed again: %s", topic, error)
            self._topics.pop(topic, None)
            self._server_topics.discard(topic)
            self._unfollowed.discard(topic)
        else:
            logger.warning("topic %s could not be followed again: %s", topic, error)

    async def _subscribe_again(self, topic: str) -> None:
        delay = 0.5
        sessions_lost = self._sessions_lost
        while topic in self._topics and not self._stopping:
            await trio.sleep(delay * (0.5 + self._rng.random()))
            if topic not in self._topics or self._stopping:
                return  # unsubscribed meanwhile, or the client is done
            if self._sessions_lost != sessions_lost:
                return  # a new session: it subscribed every topic again itself
            if topic not in self._recovering and self._topics.get(topic) is not None:
                self._recovering[topic] = _Held()  # a recovery again: hold until its reply
            # Only a recovery (recover) if this session follows the topic: decided now,
            # not when the first attempt failed. A session that has not subscribed it
            # yet answers recover with not_subscribed, and the topic would be dropped
            # for good (docs/protocol.md §14, "A session lost, then resumed").
            recover = self._v2 and topic not in self._unfollowed
            try:
                tracker = self._tracker(topic, recovery=True)
                await self._call(self._sub_builder(topic, recover), tracker)
                return
            except HandlerError as exc:
                if exc.code != "unavailable":
                    self._give_up(topic, exc)
                    return
            except (SessionLost, ClientClosed):
                return  # a new session resubscribes anyway, or the client is done
            delay = min(delay * 2, 10.0)

    async def _call(
        self,
        build: Callable[[int, int | None], Sequenced],
        on_data: Callable[[Any], None] | None = None,
        on_error: Callable[[HandlerError], None] | None = None,
        places: str | None = None,
    ) -> Any:
        waiter = _Request(trio.Event(), on_data=on_data, on_error=on_error, places=places)
        await self._wait_for_room()
        self._push(build, waiter)
        try:
            await waiter.done.wait()
        finally:
            # Cancelled: forget the waiter, unless its reply still places a topic (a
            # sub's: the sub is not unsent, and a topic held for it waits for it).
            if not waiter.done.is_set() and on_data is None:
                self._requests = {k: v for k, v in self._requests.items() if v is not waiter}
        if waiter.error is not None:
            raise waiter.error
        return waiter.data

    async def send(self, event: str, data: Any = None) -> None:
        """Queue a ``msg`` for the server; return once it is queued.

        It is delivered exactly once, in order, across reconnections. Waits while
        ``max_pending`` envelopes are unacknowledged (backpressure).

        Raises:
            ClientClosed: the client is closing or stopped.
            TypeError: ``data`` cannot be encoded.
            ValueError: ``data`` is outside the value domain, or the envelope is larger
                than the server's ``max_message_size`` (nothing was sent).
        """
        await self._wait_for_room()
        self._push(lambda seq, ack: Msg(seq=seq, event=event, data=data, ack=ack), None)

    def messages(self) -> AsyncIterator[Message]:
        """Iterate over every server ``msg`` exactly once, in order, across reconnections.

        The iteration ends when the application closes the client, and raises
        :class:`~trio_wsgate.ClientClosed` if the client stopped for another reason (a
        close code that does not reconnect, or out of attempts). Several iterators
        share one stream: each message goes to one of them.
        """
        return _Messages(self)

    async def _next_message(self) -> Message:
        while not self._buffer:
            if self.state is ClientState.CLOSED:
                if self._closed_by_app:
                    raise StopAsyncIteration
                raise ClientClosed(self.close_code, self.close_reason)
            await self._changed.wait()
        _, message = self._buffer.popleft()
        self._update_processed()
        if self._behind and len(self._buffer) <= self._buffer_size // 2:
            self._catch_up()
        return message

    async def wait_state(self, *states: ClientState) -> ClientState:
        """Wait until the state is one of ``states`` (returns at once if it is)."""
        while self.state not in states:
            await self._changed.wait()
        return self.state

    async def wait_connected(self) -> ClientState:
        """Wait until connected (CONNECTED, RESUMED or SESSION_LOST).

        Raises:
            ClientClosed: the client stopped instead.
        """
        state = await self.wait_state(*_CONNECTED, ClientState.CLOSED)
        if state is ClientState.CLOSED:
            raise ClientClosed(self.close_code, self.close_reason)
        return state

    def state_changes(self) -> AsyncIterator[ClientState]:
        """Iterate over every state the client enters from now on, ending after CLOSED."""
        changes = _StateChanges(self)
        self._watchers.add(changes)
        return changes

    @property
    def closed(self) -> bool:
        """True once the client has stopped for good."""
        return self.state is ClientState.CLOSED

    @property
    def connected(self) -> bool:
        """True while a connection is up and welcomed."""
        return self.state in _CONNECTED

    def statistics(self) -> ClientStatistics:
        """Counters: connections, resumes, sessions lost, sends lost with them, and
        what is pending (ours, unacknowledged) and buffered (the server's, untaken)."""
        return ClientStatistics(
            connects=self._connects,
            resumes=self._resumes,
            sessions_lost=self._sessions_lost,
            lost_sends=self._lost_sends,
            pending=len(self._outbox),
            buffered=len(self._buffer),
        )

    async def aclose(self) -> None:
        """Deliver what is unacknowledged, end the session with ``bye``, and stop.

        Bounded by ``close_timeout``: whatever is still unacknowledged then is given up.
        Without a welcomed connection (connecting, or waiting to reconnect) and with
        nothing to deliver, it stops at once: a connection still being opened is closed
        as soon as it is up, with no ``hello`` (the server keeps a resumable session
        until it expires). Once closed the client stays closed.

        If the call is cancelled, the client stays *closing* (sends are refused) and
        the next ``aclose()``, or the end of the ``open_client`` block, finishes the
        close, again within ``close_timeout``.
        """
        if self.state is ClientState.CLOSED:
            return
        self._closing = True
        with trio.move_on_after(self._close_timeout):
            while len(self._outbox) and not self.closed:
                await self._changed.wait()
            link = self._live_link()
            if link is not None:
                if not link.bye_sent:  # (once: another aclose() may be at it already)
                    link.bye_sent = True
                    link.enqueue(self._codec.encode(Bye()))
                while self._link is link and not self.closed:
                    await self._changed.wait()
        self._closed_by_app = True
        self._finish(CloseCode.NORMAL, "closed by the application")

    # -- sequencing -------------------------------------------------------------------

    async def _wait_for_room(self) -> None:
        while True:
            if self._closing or self.state is ClientState.CLOSED:
                raise ClientClosed(self.close_code, self.close_reason or "closing")
            if len(self._outbox) < self._max_pending:
                return
            await self._changed.wait()

    def _live_link(self) -> _Link | None:
        link = self._link
        if link is None or link.closing or link.welcomed_at is None:
            return None
        return link

    def _push(self, build: Callable[[int, int | None], Sequenced], waiter: _Request | None) -> None:
        link = self._live_link()
        outbox, inbox = self._outbox, self._inbox
        goes_now = link is not None and outbox.open
        ack = inbox.processed if goes_now and inbox.ack_pending else None
        envelope = build(outbox.next_seq, ack)
        item = _Pending(envelope, self._codec.encode(envelope), waiter)
        if len(item.payload) > self._max_message_size:
            # The server would close with 1009, which ends the client: refuse this one.
            raise ValueError(
                f"the envelope is {len(item.payload)} bytes; the server takes at most "
                f"{self._max_message_size} (welcome.max_message_size)"
            )
        if ack is not None:
            inbox.take_ack()
        if waiter is not None:
            self._requests[envelope.seq] = waiter
        if outbox.push(item) and link is not None:
            self._write(link, item)

    def _write(self, link: _Link, item: _Pending) -> None:
        item.written = True
        link.enqueue(item.payload)

    def _update_processed(self) -> None:
        """Count as processed what is buffered up to ``buffer`` messages; ack it."""
        buffer, cap, inbox = self._buffer, self._buffer_size, self._inbox
        processed = inbox.received
        for index in range(cap, len(buffer)):
            seq = buffer[index][0]
            if seq:  # the first message of this session past the cap: not processed
                processed = seq - 1
                break
        inbox.mark_processed(processed)
        link = self._live_link()
        if link is not None:
            if inbox.ack_urgent:
                link.enqueue(self._codec.encode(Ack(inbox.take_ack())))
            elif inbox.ack_pending:
                link.ack_wanted.set()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _set_state(self, state: ClientState) -> None:
        if state is self.state or self.state is ClientState.CLOSED:
            return  # CLOSED is final
        self.state = state
        for watcher in self._watchers:
            watcher.seen.append(state)
        self._notify()

    def _finish(self, code: int, reason: str) -> None:
        """Stop for good: fail what waits, end the iterators."""
        self._stopping = True
        if self.state is ClientState.CLOSED:
            return
        self.close_code, self.close_reason = code, reason
        error = ClientClosed(code, reason)
        for waiter in self._requests.values():
            waiter.error = error
            waiter.done.set()
        self._requests.clear()
        if self._link is not None:
            self._link.end(CloseCode.NORMAL, "", self._close_timeout)
        self._set_state(ClientState.CLOSED)

    # -- the connect loop -------------------------------------------------------------

    async def _open_tcp(self) -> trio.abc.Stream:
        uri = self._uri
        if uri.secure:
            return await trio.open_ssl_over_tcp_stream(uri.host, uri.port)
        return await trio.open_tcp_stream(uri.host, uri.port)

    async def _run(self) -> None:
        """Connect, serve the connection, and reconnect while the protocol says so."""
        attempt = 0
        backoff = self._backoff
        while not self._stopping:
            retry_after: float | None = None
            link: _Link | None = None
            try:
                link = await self._connect_once()
            except HandshakeRefused as exc:
                if exc.status not in _RETRY_STATUSES:
                    self._finish(CloseCode.POLICY_VIOLATION, f"refused with HTTP {exc.status}")
                    return
                retry_after = exc.retry_after
                logger.info("refused with HTTP %d; trying again", exc.status)
            except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                logger.info("cannot connect to %s: %s", redact(self.url), exc)
            if self._stopping:
                return
            if link is not None:
                code = link.close_code or CloseCode.ABNORMAL
                if not reconnects_after(code):
                    self._finish(code, link.close_reason)
                    return
                if link.welcomed_at is not None:
                    # Welcomed: a success, however short-lived; the count restarts and
                    # the next wait is drawn over [0, base] (see Backoff).
                    attempt = 0
                logger.info("connection ended (%d %s); reconnecting", code, link.close_reason)
            if backoff.max_attempts is not None and attempt >= backoff.max_attempts:
                self._finish(CloseCode.ABNORMAL, f"gave up after {attempt} attempts")
                return
            delay = backoff.delay(attempt, self._rng) + (retry_after or 0.0)
            attempt += 1
            await trio.sleep(delay)

    async def _connect_once(self) -> _Link:
        """One connection, from TCP to its end. Returns it, with how it ended."""
        with trio.fail_after(self._connect_timeout):
            stream = await self._open_stream()
            try:
                protocol, _, pending = await client_handshake(
                    stream,
                    self._uri,
                    subprotocols=[self._subprotocol],
                    headers=self._headers,
                )
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        link = _Link(WebsocketsTransport(stream, protocol, pending, self._uri.host))
        self._link = link
        try:
            async with trio.open_nursery() as nursery:
                link.nursery = nursery
                link.silence = self._connect_timeout  # until welcome
                link.touch()
                nursery.start_soon(self._reader, link)
                nursery.start_soon(self._write_loop, link)
                nursery.start_soon(self._watchdog, link)
                nursery.start_soon(self._ack_timer, link)
                if self._stopping:
                    # The client stopped (aclose()) while this attempt was under way: the
                    # connection is closed at once, never welcomed, and nothing revives.
                    link.end(CloseCode.NORMAL, "", self._close_timeout)
                else:
                    hello = self._hello()
                    link.hello_token = hello.token
                    link.enqueue(self._codec.encode(hello))
        finally:
            self._link = None
            self._detach(link)
            with trio.CancelScope(shield=True):
                await link.transport.aclose()
        return link

    def _hello(self) -> Hello:
        resume = None
        if self.session is not None and self._resume_token is not None:
            # Announcing the ack here counts as acknowledging it (docs/protocol.md §5).
            resume = Resume(self.session, self._resume_token, self._inbox.resume())
        return Hello(token=self._token, resume=resume)

    def _detach(self, link: _Link) -> None:
        """The connection is gone: what was received and not processed comes again."""
        inbox = self._inbox
        inbox.detach()
        processed = inbox.processed
        if any(seq > processed for seq, _ in self._buffer):
            # (Not only from the end: a recovery's publications, seq 0, may sit after
            # unprocessed msgs.) A publication let go here comes again: its topic's
            # position goes back to just before it, or it would be taken for a
            # duplicate when it does.
            kept: deque[tuple[int, Message]] = deque()
            back: set[str] = set()
            for item in self._buffer:
                seq, message = item
                if seq <= processed:
                    kept.append(item)
                    continue
                topic, offset, epoch = message.topic, message.offset, message.epoch
                if topic is not None and offset is not None and topic not in back:
                    back.add(topic)
                    position = self._topics.get(topic)
                    if position is not None and position[1] == epoch and position[0] >= offset:
                        self._topics[topic] = (offset - 1, epoch)
            self._buffer = kept
        if self.state is not ClientState.CLOSED:
            self._set_state(ClientState.CONNECTING)
        self._notify()

    # -- one connection ---------------------------------------------------------------

    async def _reader(self, link: _Link) -> None:
        transport = link.transport
        while True:
            try:
                incoming = await transport.receive()
            except TransportBroken as exc:
                link.abort(CloseCode.ABNORMAL, str(exc.reason))
                return
            except trio.ClosedResourceError:
                link.abort(CloseCode.ABNORMAL, "the stream was closed")
                return
            if incoming.frames:
                link.touch()
            for payload, binary in incoming.messages:
                if link.closing:
                    break
                try:
                    if binary is not self._codec.binary:
                        raise ProtocolError(CloseCode.UNSUPPORTED_DATA, "wrong frame kind")
                    for envelope in self._codec.decode(payload):
                        if link.closing:
                            break
                        self._on_envelope(link, envelope)
                except ProtocolError as exc:
                    # The server broke the protocol: no reconnect (docs/protocol.md §8).
                    logger.error("protocol error from the server: %s", exc)
                    link.end(exc.code, exc.reason, self._close_timeout)
            if incoming.failed is not None:
                link.peer_closed(*incoming.failed, self._close_timeout)
            if incoming.peer_close is not None:
                link.peer_closed(*incoming.peer_close, self._close_timeout)
            if transport.wants_flush():
                link.wake.set()
            if incoming.eof:
                link.abort(CloseCode.ABNORMAL, "the server closed the connection")
                return

    def _on_envelope(self, link: _Link, envelope: Envelope) -> None:
        if link.welcomed_at is None:
            if not isinstance(envelope, Welcome):
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "expected welcome first")
            self._on_welcome(link, envelope)
            return
        if isinstance(envelope, Msg | Reply):
            if envelope.ack is not None:
                self._on_ack(link, envelope.ack)
            if self._inbox.receive(envelope.seq) is Receipt.DUPLICATE:
                self._update_processed()  # acks the duplicate at once
                return
            if isinstance(envelope, Msg):
                message = Message(
                    envelope.event, envelope.data, envelope.topic, envelope.offset, envelope.epoch
                )
                self._take(message, envelope.seq)
            else:
                waiter = self._requests.pop(envelope.re, None)
                if waiter is not None:  # None: answered before a drop, or cancelled
                    if envelope.error is not None:
                        waiter.error = HandlerError(envelope.error.code, envelope.error.reason)
                        if waiter.on_error is not None:
                            waiter.on_error(waiter.error)
                    else:
                        waiter.data = envelope.data
                        if waiter.on_data is not None:
                            waiter.on_data(envelope.data)
                    waiter.done.set()
            self._update_processed()
        elif isinstance(envelope, Delivery):
            if not self._v2:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "pub from a version-1 server")
            message = Message(
                envelope.event, envelope.data, envelope.topic, envelope.offset, envelope.epoch
            )
            if envelope.topic not in self._topics and envelope.topic not in self._leaving:
                # A topic the server subscribed the session to: followed from here, so
                # that a reconnection asks for what it missed too.
                self._topics[envelope.topic] = (envelope.offset - 1, envelope.epoch)
                self._server_topics.add(envelope.topic)
            self._take(message, 0)
            self._notify()
        elif isinstance(envelope, Ack):
            self._on_ack(link, envelope.ack)
        elif isinstance(envelope, Ping):
            link.enqueue(self._codec.encode(Pong(envelope.ts)))
        elif isinstance(envelope, Pong):
            pass
        else:
            raise ProtocolError(
                CloseCode.PROTOCOL_ERROR, f"unexpected {envelope.type} from a server"
            )

    def _take(self, message: Message, seq: int) -> None:
        """A server message: into the buffer, unless a publication already received
        (dropped), one that a recovery of its topic holds, or (``seq`` 0, version 2)
        one the full buffer has no room for, which its topic asks again later."""
        topic, offset, epoch = message.topic, message.offset, message.epoch
        if topic is not None and topic in self._topics and offset is not None and epoch is not None:
            position = self._topics[topic]
            if position is not None and position[1] == epoch and offset <= position[0]:
                # Already received: a subscription restarted from an older offset sent
                # it again. Offsets exist to drop exactly this.
                return
            held = self._recovering.get(topic)
            if not seq and (topic in self._behind or self._full()):
                # Nothing waits on our acks in version 2: the buffer's bound holds by
                # letting the topic fall behind, from an unmoved position (or, before
                # its sub's reply placed it, from just before this one).
                if position is None:
                    if held is not None:
                        # Held for its late sub reply (_stale_reply): the recovery from
                        # the reply's offset asks for this one again; no place from it.
                        return
                    self._topics[topic] = (offset - 1, epoch)
                if held:
                    # What the recovery holds is what it delivers next: the lowest
                    # offsets, not live ones that came before the history's older ones.
                    held.swap_top(message)
                self._behind.add(topic)
                return
            if held is not None:  # delivered in order at the recovery's reply
                held.hold(message)  # (or, without a position yet, at its sub's reply)
                return
            self._topics[topic] = (offset, epoch)
        elif not seq and self._full():
            return  # a topic being left: nothing to recover it for
        self._buffer.append((seq, message))

    def _full(self) -> bool:
        """The buffer, with what every recovery holds, is at ``buffer`` messages."""
        held = sum(map(len, self._recovering.values())) if self._recovering else 0
        return len(self._buffer) + held >= max(self._buffer_size, 1)

    def _catch_up(self) -> None:
        """Ask the topics that fell behind for what they let go, from their position."""
        link = self._live_link()
        if link is None:
            return  # the next welcome recovers every topic anyway
        topics = [t for t in self._behind if t not in self._recovering and t in self._topics]
        self._behind.difference_update(topics)
        for item in self._recover(topics, recover=True):
            self._write(link, item)

    def _on_ack(self, link: _Link, ack: int) -> None:
        for item in self._outbox.receive_ack(ack):
            self._write(link, item)
        self._notify()  # room for blocked senders, progress for aclose()

    def _on_welcome(self, link: _Link, welcome: Welcome) -> None:
        self._check_welcome(welcome)
        link.welcomed_at = trio.current_time()
        self._welcomes += 1
        self._to_recover.clear()  # those of the last connection: asked again below
        self._recoveries = 0
        link.max_message_size = self._max_message_size = welcome.max_message_size
        interval = welcome.heartbeat_interval
        link.silence = interval + welcome.heartbeat_timeout if interval else math.inf
        link.touch()
        if self._token is not None and self._token != link.hello_token:
            # refresh() while the hello was unanswered could not send it: the server
            # holds the hello's token, and would close 4001 at its exp. It goes first.
            link.enqueue(self._codec.encode(Refresh(self._token)))
        self._connects += 1
        if welcome.resumed and welcome.session == self.session:
            self._outbox.rewind(welcome.ack, welcome.window)
            resend = self._refuse_oversized()
            self._resumes += 1
            state = ClientState.RESUMED
        else:
            lost = self.session is not None
            resend = self._new_session(welcome.window)
            if lost:
                self._sessions_lost += 1
                logger.warning("the server did not resume the session: starting a new one")
            state = ClientState.SESSION_LOST if lost else ClientState.CONNECTED
        self.session, self._resume_token = welcome.session, welcome.resume_token
        self.user = welcome.user
        if state is ClientState.SESSION_LOST:
            resend += self._resubscribe(list(self._topics))
        elif state is ClientState.RESUMED and self._v2:
            # Nothing of the topics was kept for us (docs/protocol.md §14): each asks
            # its history for what came after its position, if the session still
            # follows it (recover). A topic without a position yet is placed by its
            # sub's reply, and asked from there; what of it comes first is held until
            # then (_stale_reply): a live pub may overtake that reply, and is above
            # what was published while the session had no connection.
            self.recovered = {}
            self._recovering, self._behind = {}, set()
            unfollowed = [t for t in self._topics if t in self._unfollowed]
            positioned = [
                t for t, p in self._topics.items() if p is not None and t not in self._unfollowed
            ]
            placing = {waiter.places for waiter in self._requests.values()}
            for topic, position in self._topics.items():
                if position is None and topic not in self._unfollowed and topic in placing:
                    self._recovering[topic] = _Held()
            resend += self._recover(unfollowed) + self._recover(positioned, recover=True)
        elif welcome.user is not None and self._topics.get("user:" + welcome.user) is None:
            # Where the user topic starts, so that a lost session can recover it even if
            # nothing was sent to the user before (docs/protocol.md §6): the welcome
            # says; a server that does not is asked with a sub.
            start = welcome.user_topic or {}
            offset, epoch = start.get("offset"), start.get("epoch")
            if type(offset) is int and isinstance(epoch, str):
                self._topics["user:" + welcome.user] = (offset, epoch)
            else:
                self._topics["user:" + welcome.user] = None
                resend += self._resubscribe(["user:" + welcome.user])
        for item in resend:
            self._write(link, item)
        self._set_state(state)
        self._update_processed()

    def _check_welcome(self, welcome: Welcome) -> None:
        """A welcome whose numbers no server sends is a protocol error (1002), before
        anything of it is taken: a window below 1 (no envelope could go), a size bound
        below 1, a heartbeat that is not a finite, non-negative number of seconds."""
        if welcome.window < 1:
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "welcome: window must be at least 1")
        if welcome.max_message_size < 1:
            raise ProtocolError(
                CloseCode.PROTOCOL_ERROR, "welcome: max_message_size must be at least 1"
            )
        for seconds in (welcome.heartbeat_interval, welcome.heartbeat_timeout):
            if not (math.isfinite(seconds) and seconds >= 0):
                raise ProtocolError(
                    CloseCode.PROTOCOL_ERROR,
                    "welcome: heartbeat needs finite, non-negative seconds",
                )
        if not welcome.resumed and welcome.ack != 0:
            # A new session: the server cannot have processed anything of it.
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "welcome: a new session's ack must be 0")

    def _refuse_oversized(self) -> list[_Pending]:
        """After a resumed welcome: fail every unacknowledged envelope larger than the
        welcome's ``max_message_size`` (encoded under an earlier connection's: a node
        that takes less), which the server would close 1009 for, ending the session and
        the client. Returns what to write now.

        Failing them loses nothing, and runs nothing twice: a resumed welcome's ack is
        exact (docs/protocol.md §5.3, §5.4: the old connection's handlers stopped before
        it, and one stopped so has not processed its envelope), so nothing above it was
        processed, and nothing will be that is not resent. Such an envelope fails as a
        call over the limit does (§2.2: ``ValueError``; a ``sub``, ``HandlerError``
        ``too_large``, which the client's own resubscriptions handle), and is not
        resent. The server forgot what it received and did not process, and takes
        ``ack + 1`` next: those after it are renumbered from there, with no gap (§4)."""
        outbox, limit = self._outbox, self._max_message_size
        items = list(outbox.unacknowledged())
        if all(len(item.payload) <= limit for _, item in items):
            return [item for _, item in outbox.in_flight]
        # The waiters still waiting for their reply (a cancelled request is not).
        awaited = {seq: self._requests.pop(seq) for seq, _ in items if seq in self._requests}
        outbox.in_flight.clear()
        outbox.waiting.clear()
        outbox.next_seq = outbox.acked + 1
        for old_seq, item in items:
            waiter = awaited.get(old_seq)
            if len(item.payload) > limit:
                reason = (
                    f"the envelope is {len(item.payload)} bytes; the server now takes at most "
                    f"{limit} (welcome.max_message_size): it was not processed and is not "
                    "sent again"
                )
                if waiter is None:
                    logger.error("an envelope is not sent again: %s", reason)
                elif isinstance(item.envelope, Sub):
                    waiter.error = HandlerError("too_large", reason)
                    if waiter.on_error is not None:
                        waiter.on_error(waiter.error)
                    waiter.done.set()
                else:
                    waiter.error = ValueError(reason)
                    waiter.done.set()
                continue
            seq = outbox.next_seq
            if seq != old_seq:
                envelope = replace(item.envelope, seq=seq, ack=None)  # type: ignore[type-var]
                item = _Pending(envelope, self._codec.encode(envelope), item.waiter)
            if waiter is not None:
                self._requests[seq] = waiter
            outbox.push(item)
        return [item for _, item in outbox.in_flight]

    def _resubscribe(self, topics: list[str]) -> list[_Pending]:
        """Subscribe the session to the topics, each from where we were (§6)."""
        for topic in [t for t in self._recovering if self._topics.get(t) is None]:
            # Held for a sub reply that went with the old session: delivered, so that
            # the new session's sub asks from the last of them (as before they were held).
            self._release(topic, None)
        self.recovered = {}
        self._recovering, self._behind = {}, set()
        if self._v2:  # the application's own topics again; the server's if still followed
            own = [t for t in topics if t not in self._server_topics]
            self._unfollowed = set(own)
            return self._recover(own) + self._recover(
                [t for t in topics if t in self._server_topics], recover=True
            )
        return self._recover(topics)

    def _recover(self, topics: list[str], *, recover: bool = False) -> list[_Pending]:
        """A ``sub`` with ``since`` for each topic; what of them comes meanwhile is held
        until its reply. Returns those the window lets out now.

        In version 2 at most _RECOVERIES_AT_ONCE are under way: each sends up to what
        the topic's history holds, and together they must fit the server's queue."""
        if self._v2:
            for topic in topics:
                if self._topics.get(topic) is not None:
                    self._recovering[topic] = _Held()
                self._to_recover.append((topic, recover))
            return self._send_recoveries()
        written: list[_Pending] = []
        for topic in topics:
            if self._topics.get(topic) is not None:
                self._recovering[topic] = _Held()
            waiter = _Request(
                trio.Event(), on_data=self._tracker(topic), on_error=self._retrier(topic)
            )
            written += self._push_sub(topic, waiter)
        return written

    def _push_sub(self, topic: str, waiter: _Request, recover: bool = False) -> list[_Pending]:
        """Number a client-made ``sub`` of ``topic`` from its position; ``[item]`` if the
        window lets it out now, else ``[]``."""
        envelope = self._sub_builder(topic, recover)(self._outbox.next_seq, None)
        item = _Pending(envelope, self._codec.encode(envelope), waiter)
        self._requests[envelope.seq] = waiter
        return [item] if self._outbox.push(item) else []

    def _send_recoveries(self) -> list[_Pending]:
        """Version 2: the recoveries waiting, as far as _RECOVERIES_AT_ONCE allows."""
        written: list[_Pending] = []
        while self._to_recover and self._recoveries < _RECOVERIES_AT_ONCE:
            topic, recover = self._to_recover.popleft()
            if topic not in self._topics:
                continue  # unsubscribed meanwhile
            self._recoveries += 1
            waiter = _Request(
                trio.Event(),
                on_data=self._tracker(topic, counted=True),
                on_error=self._retrier(topic, counted=True),
            )
            written += self._push_sub(topic, waiter, recover)
        return written

    def _new_session(self, window: int) -> list[_Pending]:
        """Start numbering afresh; carry over what was never written (docs/protocol.md §5)."""
        old, self._outbox = self._outbox, Outbox(window)
        self._inbox = Inbox(window)
        self._buffer = deque((0, message) for _, message in self._buffer)
        waiting, self._requests = self._requests, {}
        for _, item in old.unacknowledged():
            if item.written:  # it may or may not have been processed: say so
                if item.waiter is None:
                    self._lost_sends += 1
                continue
            seq = self._outbox.next_seq
            envelope = replace(item.envelope, seq=seq, ack=None)  # type: ignore[type-var]
            if isinstance(envelope, Sub) and envelope.topic not in self._server_topics:
                envelope = replace(envelope, recover=None)  # the new session subscribes it
            renumbered = _Pending(envelope, self._codec.encode(envelope), item.waiter)
            if item.waiter is not None:
                self._requests[seq] = item.waiter
            self._outbox.push(renumbered)
        # Every other request went to the old session and its reply is gone with it,
        # whether or not the server had acknowledged (processed) the request.
        carried = set(map(id, self._requests.values()))
        for waiter in waiting.values():
            if id(waiter) not in carried:
                waiter.error = SessionLost("the server dropped the session")
                waiter.done.set()
        if self._lost_sends:
            logger.warning("%d sends may be lost with the old session", self._lost_sends)
        return [item for _, item in self._outbox.in_flight]

    async def _write_loop(self, link: _Link) -> None:
        transport = link.transport
        while True:
            await link.wake.wait()
            link.wake = trio.Event()
            if link.queue and not link.closing:
                self._frame(link)
            try:
                if await transport.flush():
                    return
            except TransportBroken as exc:
                link.abort(CloseCode.ABNORMAL, str(exc.reason))
                return
            except trio.ClosedResourceError:
                return

    def _frame(self, link: _Link) -> None:
        """Everything queued into as few messages as the server's size bound allows."""
        payloads = list(link.queue)
        link.queue.clear()
        for message in self._codec.pack(payloads, link.max_message_size):
            link.transport.send_message(message, self._codec.binary)

    async def _watchdog(self, link: _Link) -> None:
        # docs/protocol.md §7: nothing received for interval + timeout means dead.
        with link.liveness:
            await trio.sleep_forever()
        if link.liveness.cancelled_caught:
            logger.info("no word from the server: the connection is dead")
            link.abort(CloseCode.ABNORMAL, "heartbeat timeout")

    async def _ack_timer(self, link: _Link) -> None:
        while True:
            await link.ack_wanted.wait()
            link.ack_wanted = trio.Event()
            await trio.sleep(0.1)  # docs/protocol.md §4: at most 100 ms after processing
            if not link.closing and self._inbox.ack_pending:
                link.enqueue(self._codec.encode(Ack(self._inbox.take_ack())))


class _Messages:
    """The iterator of :meth:`Client.messages` (a class: nothing to finalize)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def __aiter__(self) -> _Messages:
        return self

    async def __anext__(self) -> Message:
        return await self._client._next_message()


class _StateChanges:
    """The iterator of :meth:`Client.state_changes`; the client forgets it once dropped."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self.seen: deque[ClientState] = deque()
        self._done = client.closed

    def __aiter__(self) -> _StateChanges:
        return self

    async def __anext__(self) -> ClientState:
        while not self.seen:
            if self._done:
                raise StopAsyncIteration
            await self._client._changed.wait()
        state = self.seen.popleft()
        if state is ClientState.CLOSED:
            self._done = True
        return state


@asynccontextmanager
async def open_client(url: str, **options: Any) -> AsyncIterator[Client]:
    """Run a :class:`Client` for the duration of the block.

    The client connects in the background (await :meth:`Client.wait_connected` to
    wait for it); sends made before then are queued. Leaving the block closes it
    gracefully with :meth:`Client.aclose`. Options are :class:`Client`'s.
    """
    client = Client(url, **options)
    try:
        async with trio.open_nursery() as nursery:
            client._tasks = nursery
            nursery.start_soon(client._run)
            try:
                yield client
            finally:
                with trio.CancelScope(shield=True):
                    await client.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # A public context manager does not leak a one-member group (trio's own rule
        # for its context managers): the one error is raised as itself.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
