"""A connection is a nursery (docs/architecture.md, "The shape").

Theory of operation. :meth:`Connection.run` opens one nursery and everything that exists
because the peer is connected runs in it:

* the **reader**, the nursery's own task: the only caller of :meth:`Transport.receive`.
  It decodes envelopes, answers control envelopes (``ping``, ``ack``, ``bye``...)
  itself, checks ``seq`` order and hands sequenced envelopes to the dispatcher, in
  order;
* the **write loop**: the only task that writes. Producers append encoded envelopes to
  a bounded queue and wake it; it writes everything queued in one ``send_all``, several
  envelopes batched into one frame;
* the *application scope*, a cancel scope around the **dispatcher** (waits for
  ``hello``, answers ``welcome``, runs the application's handlers one at a time in
  arrival order) and, for an application that has per-connection tasks, a nursery
  holding them beside it.

The **heartbeat** (a ping every interval, and a liveness deadline that every received
frame moves forward), the **ack delay** and the **token's expiry** are entries in the
node's timers (:mod:`trio_wsgate.timers`), not tasks: an idle connection is three
sleeping tasks, the reader, the write loop and the dispatcher, and they wait on a
:class:`~trio_wsgate.wakeup.Wakeup` each, not on events made per wait. A ``refresh`` is
checked by a short task with a cancel scope of its own. They belong to the application
scope all the same: deciding to close cancels them.

Closing is a decision, never a wait: :meth:`Connection.close` records the code and
reason, cancels the application scope, queues the close frame and sets the nursery's
deadline to ``close_timeout`` from now. The reader keeps reading until the peer
answers the close handshake; whatever the peer does, the deadline then cancels what
is left and the transport is released. Nothing the connection started outlives
:meth:`run`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import trio

from .auth import Authenticator, Identity, identify
from .exceptions import (
    BrokerUnavailable,
    HandlerError,
    ProtocolError,
    SessionClosed,
    Unauthorized,
)
from .limits import TokenBucket
from .protocol import (
    Ack,
    Bye,
    CloseCode,
    CloseReason,
    Codec,
    Envelope,
    ErrorInfo,
    Hello,
    Msg,
    Ping,
    Pong,
    Refresh,
    Reply,
    Sequenced,
)
from .protocol.closecodes import reason_for
from .protocol.values import value_error
from .reliability import Receipt
from .session import Session
from .timers import Timer, Timers
from .transports.base import Transport, TransportBroken, remote_ip
from .wakeup import Wakeup
from .welcome import WelcomeHost, follow_user_topic, open_session

if TYPE_CHECKING:
    from .config import Config
    from .metrics import Metrics

__all__ = ["Application", "Connection", "Node"]

logger = logging.getLogger("trio_wsgate.connection")

#: What a handler, a hook and a per-connection task are (the application's).
_Handler = Callable[[Session, Any], Awaitable[Any]]
_Hook = Callable[[Session], Awaitable[None]]


class Application(Protocol):
    """What a connection runs of the application's (a :class:`~trio_wsgate.Gateway`)."""

    @property
    def handlers(self) -> Mapping[str, _Handler]:
        """The handler of each client ``msg`` event."""
        ...

    @property
    def connect_hooks(self) -> Sequence[_Hook]:
        """Run after ``welcome`` is queued, before any handler."""
        ...

    @property
    def disconnect_hooks(self) -> Sequence[_Hook]:
        """Run once the connection is released."""
        ...

    @property
    def session_tasks(self) -> Sequence[_Hook]:
        """Run for the connection's life, in its nursery."""
        ...


class Node(WelcomeHost, Protocol):
    """What a connection needs of its node: the calls it makes to the hub (and those
    opening a session makes, :class:`~trio_wsgate.welcome.WelcomeHost`)."""

    #: Turns tokens into identities; None runs anonymous.
    authenticator: Authenticator | None
    #: The node's timers (heartbeats, deadlines), run by the hub's task.
    timers: Timers

    @property
    def running(self) -> bool:
        """True while the hub's task runs the node's timers."""
        ...

    def detach(self, session: Session) -> None:
        """The session's connection is gone: keep it for a resume, or end it."""
        ...

    async def topic_operation(
        self, session: Session, envelope: Sequenced
    ) -> tuple[Any, ErrorInfo | None]:
        """Answer a client's ``sub``, ``unsub`` or ``pub``: ``(data, error)``."""
        ...


# Bytes that received envelopes waiting for the dispatcher hold, decoded (weighed by
# protocol.values.weigh), past which the reader stops reading (Connection._wait_taken);
# a message heavier than this is taken alone.
_INBOUND_HIGH_WATER = 1 << 20

_WRITER = f"{__name__}.Connection._write_loop"
_APPLICATION = f"{__name__}.Connection._application"

# On a running node, a connection's timers are the node's, run by the hub's task.
_NO_TIMERS: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()


@contextlib.asynccontextmanager
async def _running(timers: Timers) -> AsyncIterator[None]:
    """Run ``timers`` in a task of their own for as long as the block lasts."""
    async with trio.open_nursery() as nursery:
        await nursery.start(timers.run)
        yield
        nursery.cancel_scope.cancel()


# What waits in the write queue: an encoded envelope and whether it is sequenced
# (sequenced envelopes are never dropped).
_Item = tuple[bytes, bool]


class Connection:
    """One WebSocket connection: its nursery, queue, sequencing and close.

    Args:
        transport: the upgraded WebSocket.
        codec: the encoding chosen at the handshake.
        gateway: the application's handlers and hooks.
        config: the node's settings.
        metrics: the node's metrics.
        hub: the node's sessions.
        identity: who the client is, if a token came with the handshake.
    """

    __slots__ = (
        "_ack_timer",
        "_app_scope",
        "_arrived",
        "_bucket",
        "_codec",
        "_config",
        "_detached",
        "_done",
        "_expiry_timer",
        "_gateway",
        "_hello_seen",
        "_hub",
        "_identity",
        "_last_seen",
        "_let_go",
        "_liveness_timer",
        "_metrics",
        "_nursery",
        "_pending",
        "_pending_bytes",
        "_ping_timer",
        "_pings",
        "_queue",
        "_refresh_scopes",
        "_refreshes",
        "_slack",
        "_taken",
        "_timers",
        "_transport",
        "_wake",
        "_welcomed",
        "close_code",
        "close_decided_at",
        "close_reason",
        "closing",
        "id",
        "opened_at",
        "released_at",
        "session",
    )

    def __init__(
        self,
        transport: Transport,
        codec: Codec,
        gateway: Application,
        config: Config,
        metrics: Metrics,
        hub: Node,
        identity: Identity | None = None,
    ) -> None:
        self._transport = transport
        self._codec = codec
        self._gateway = gateway
        self._config = config
        self._metrics = metrics
        self._hub = hub
        self._identity = identity
        self._refreshes = 0  # refresh envelopes received: the latest one decides
        self._queue: list[_Item] = []
        self._wake = Wakeup()  # the write loop's
        # Envelopes for the dispatcher, in order, and the event it waits on for more.
        self._pending: list[Envelope] = []
        self._arrived = Wakeup()
        # The bytes of the messages those came in; past _INBOUND_HIGH_WATER the reader
        # waits on _taken (made then) until the dispatcher takes them.
        self._pending_bytes = 0
        self._taken: Wakeup | None = None
        self._hello_seen = False
        # Made when the reader hands hello over and waits for welcome; the events
        # below, when someone first waits (an idle connection holds none of them).
        self._welcomed: trio.Event | None = None
        # The timers: the node's (one task for all), and this connection's in them:
        # the next ping, the liveness check and the ack delay.
        self._timers = hub.timers if hub.running else Timers()
        self._ping_timer: Timer | None = None
        self._liveness_timer: Timer | None = None
        self._ack_timer: Timer | None = None
        self._expiry_timer: Timer | None = None  # the token's exp (on nodes that check)
        self._last_seen = 0.0  # trio time of the last frame received
        interval = config.heartbeat_interval
        self._slack = min(config.heartbeat_slack, interval / 10) if interval else 0.0
        self._pings: list[tuple[int, float]] = []  # (ts, sent at), the 4 newest
        self._bucket: TokenBucket | None = None
        if config.rate_limit is not None:
            burst = config.rate_burst or max(1, math.ceil(2 * config.rate_limit))
            self._bucket = TokenBucket(config.rate_limit, burst, trio.current_time())
        self._nursery: trio.Nursery | None = None
        # The application scope (the dispatcher, handlers, the application's tasks),
        # and the refresh checks in flight, cancelled with it.
        self._app_scope: trio.CancelScope | None = None
        self._refresh_scopes: set[trio.CancelScope] | None = None
        self._done: trio.Event | None = None
        self._detached: trio.Event | None = None
        self._let_go = False  # the session is let go of (or there never was one)
        #: This connection's id, unique within the node (logs, the hub's registry).
        self.id = secrets.token_urlsafe(8)
        #: The session, once ``hello`` was answered.
        self.session: Session | None = None
        #: True from the decision to close on.
        self.closing = False
        #: The close code and classified reason, once decided (first decision wins).
        self.close_code: int | None = None
        self.close_reason: CloseReason | None = None
        #: trio time of the decision to close, and of the release of the transport.
        self.close_decided_at: float | None = None
        self.released_at: float | None = None
        #: trio time the connection was opened at (the oldest goes first, if the
        #: user limit says so).
        self.opened_at = trio.current_time()

    # -- public ---------------------------------------------------------------------

    @property
    def remote_ip(self) -> str:
        """The peer's IP address (the whole remote address if it has no port)."""
        return remote_ip(self._transport.remote_address)

    @property
    def codec(self) -> Codec:
        """The connection's encoding."""
        return self._codec

    @property
    def backlogged(self) -> bool:
        """True while received envelopes not yet taken by the dispatcher weigh more than
        the inbound bound (the reader has stopped: the peer's acks wait behind them)."""
        return self._pending_bytes > _INBOUND_HIGH_WATER

    @property
    def queue_depth(self) -> int:
        """Envelopes waiting: in the write queue plus those the window holds back."""
        session = self.session
        held = len(session.outbox.waiting) if session and session.connection is self else 0
        return len(self._queue) + held

    def close(self, code: int, reason: str = "", label: CloseReason | None = None) -> None:
        """Decide to close with ``code``; return at once (docs/architecture.md, "Bounded close")."""
        self._begin_close(code, reason, label or reason_for(code))

    async def aclose(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close and wait until the transport is released (at most ``close_timeout``)."""
        self.close(code, reason)
        await self.wait_released()

    async def wait_released(self) -> None:
        """Wait until the connection has ended and its transport is released."""
        if self.released_at is None:
            if self._done is None:
                self._done = trio.Event()
            await self._done.wait()

    async def run(self) -> None:
        """Serve the connection until it ends; release everything before returning."""
        self._metrics.connections_open.inc()
        self._metrics.connections_total.inc()
        # The connection's nursery is opened here rather than in a method of its own,
        # so that its reader (this task) keeps one frame fewer (docs/benchmarks.md,
        # "Idle"). Served while the hub is not running (``serve_stream`` on a server
        # that is not serving), the connection runs timers of its own around it.
        timers = _NO_TIMERS if self._timers is self._hub.timers else _running(self._timers)
        try:
            async with timers, trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.closing:  # closed before it started (a drain raced us)
                    nursery.cancel_scope.deadline = self._close_deadline()
                # Constant names: trio would otherwise format one per task.
                nursery.start_soon(self._write_loop, name=_WRITER)
                nursery.start_soon(self._application, name=_APPLICATION)
                # The reader is this nursery's own task: one task fewer per connection.
                try:
                    await self._read_loop()
                except Exception:
                    self._crashed()
        finally:
            with trio.CancelScope(shield=True):
                await self._transport.aclose()
            self.released_at = trio.current_time()
            if self.close_code is None:  # cancelled from outside (server shutdown)
                self._record_end(CloseCode.GOING_AWAY, CloseReason.DRAIN)
            self.closing = True
            self._metrics.connections_open.dec()
            self._metrics.closes.labels(str(self.close_code), str(self.close_reason)).inc()
            if self._done is not None:
                self._done.set()
            logger.debug(
                "connection %s from %s closed: %s %s",
                self.id,
                self._transport.remote_address,
                self.close_code,
                self.close_reason,
            )
        if self.session is not None:
            await self._run_disconnect_hooks(self.session)

    async def wait_detached(self) -> None:
        """Wait until this connection has let go of its session (or never had one)."""
        if not self._let_go:
            if self._detached is None:
                self._detached = trio.Event()
            await self._detached.wait()

    # -- closing --------------------------------------------------------------------

    def _close_deadline(self) -> float:
        assert self.close_decided_at is not None
        return self.close_decided_at + self._config.close_timeout

    def _record_end(self, code: int, reason: CloseReason) -> None:
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason

    def _begin_close(self, code: int, text: str, label: CloseReason, *, send: bool = True) -> None:
        self._record_end(code, label)
        if self.closing:
            return
        self.closing = True
        self.close_decided_at = trio.current_time()
        self._answered_hello()  # a reader waiting for welcome goes back to reading
        self._queue.clear()  # never framed now: only the close frame goes out
        if self._taken is not None:
            self._taken.set()  # and one waiting for the dispatcher too
        self._cancel_application()
        self._stop_timers()
        if self._nursery is not None:
            self._nursery.cancel_scope.deadline = self._close_deadline()
        if send:
            self._transport.send_close(code, text)
        self._wake.set()

    def _answered_hello(self) -> None:
        welcomed, self._welcomed = self._welcomed, None
        if welcomed is not None:
            welcomed.set()

    def _abort(self, code: int, label: CloseReason) -> None:
        """The transport is gone: nothing more can be sent or received."""
        self._record_end(code, label)
        self.closing = True
        self._cancel_application()
        self._stop_timers()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def internal_error(self, what: str) -> None:
        """Log the exception being handled, once, with this connection's id; count it."""
        self._metrics.internal_errors.inc()
        logger.exception(
            "%s on connection %s from %s", what, self.id, self._transport.remote_address
        )

    def _crashed(self) -> None:
        # An unexpected error in any of the connection's own tasks or timers: logged
        # once, and it becomes close 1011 (docs/protocol.md §8): the peer is told, the
        # node goes on.
        self.internal_error("internal error")
        self._begin_close(CloseCode.INTERNAL_ERROR, "internal error", CloseReason.INTERNAL_ERROR)

    async def _guard(self, task: Callable[[], Awaitable[None]]) -> None:
        # The root of the application's per-connection tasks.
        try:
            await task()
        except Exception:
            self._crashed()

    def _cancel_application(self) -> None:
        # Before the application task has entered its scope, it sees ``closing``.
        if self._app_scope is not None:
            self._app_scope.cancel()
        for scope in self._refresh_scopes or ():
            scope.cancel()

    # -- the reader -----------------------------------------------------------------

    async def _read_loop(self) -> None:
        transport = self._transport
        metrics = self._metrics
        while True:
            try:
                incoming = await transport.receive()
            except TransportBroken as exc:
                self._abort(CloseCode.ABNORMAL, exc.reason)
                return
            except trio.ClosedResourceError:
                # Closed under us (by whoever holds the stream): nothing more comes.
                self._abort(CloseCode.ABNORMAL, CloseReason.RESET)
                return
            if incoming.frames:
                self._last_seen = trio.current_time()
            if incoming.nbytes:
                metrics.bytes_in.inc(incoming.nbytes)
            if incoming.pings and not self._within_rate(incoming.pings):
                continue
            for payload, binary in incoming.messages:
                if self.closing:
                    break
                try:
                    envelopes, weight = self._decode(payload, binary)
                    if not self._within_rate(len(envelopes)):
                        break
                    for envelope in envelopes:
                        if self.closing:
                            break
                        self._on_envelope(envelope)
                        if isinstance(envelope, Hello):
                            # welcome answers hello before anything else is answered.
                            self._welcomed = trio.Event()
                            await self._welcomed.wait()
                    if self._pending:  # kept, decoded, until the dispatcher takes it
                        self._pending_bytes += weight
                except ProtocolError as exc:
                    self.close(exc.code, exc.reason)
            if incoming.failed is not None:
                code, text = incoming.failed
                self._begin_close(
                    code, text, reason_for(code, CloseReason.PROTOCOL_ERROR), send=False
                )
            if incoming.peer_close is not None:
                code, text = incoming.peer_close
                self._begin_close(code, text, CloseReason.CLEAN, send=False)
            if transport.wants_flush():
                self._wake.set()
            if incoming.eof:
                # The peer closed its end; after a close handshake this is the normal end.
                self._abort(CloseCode.ABNORMAL, CloseReason.EOF)
                return
            if self._pending_bytes > _INBOUND_HIGH_WATER and not self.closing:
                await self._wait_taken()

    async def _wait_taken(self) -> None:
        """Read no more until the dispatcher has taken what waits for it: what a peer
        sends faster than its handlers run stays in its socket, not in this process
        (TCP pushes back on the peer). A close decided meanwhile ends the wait."""
        taken = self._taken
        if taken is None:
            taken = self._taken = Wakeup()
        while self._pending_bytes > _INBOUND_HIGH_WATER and not self.closing:
            await taken.wait()

    def _within_rate(self, count: int) -> bool:
        """Take ``count`` from the rate limit's bucket; over it, close with 4009."""
        bucket = self._bucket
        if bucket is None or bucket.take(trio.current_time(), count):
            return True
        self._metrics.rate_limited.inc()
        self._begin_close(CloseCode.RATE_LIMITED, "rate limit exceeded", CloseReason.RATE_LIMIT)
        return False

    def _decode(self, payload: bytes, binary: bool) -> tuple[list[Envelope], int]:
        codec = self._codec
        if binary is not codec.binary:
            kind = "binary" if binary else "text"
            raise ProtocolError(
                CloseCode.UNSUPPORTED_DATA, f"{kind} frame under {codec.subprotocol}"
            )
        envelopes, weight = codec.decode_weighed(payload)
        self._metrics.messages_in.inc(len(envelopes))
        return envelopes, weight

    def _on_envelope(self, envelope: Envelope) -> None:
        if not self._hello_seen:
            if not isinstance(envelope, Hello):
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "the first envelope must be hello")
            self._hello_seen = True
            self._pending.append(envelope)
            self._arrived.set()
            return
        if isinstance(envelope, Sequenced):
            if isinstance(envelope, Reply):
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "reply is sent by the server only")
            if envelope.ack is not None:
                self._on_ack(envelope.ack)
            inbox = self._session().inbox
            if inbox.receive(envelope.seq) is Receipt.NEW:
                self._pending.append(envelope)
                self._arrived.set()
            elif inbox.ack_urgent:
                self._send_ack()
        elif isinstance(envelope, Ack):
            self._on_ack(envelope.ack)
        elif isinstance(envelope, Ping):
            self._enqueue_control(Pong(envelope.ts))
        elif isinstance(envelope, Pong):
            self._on_pong(envelope.ts)
        elif isinstance(envelope, Bye):
            self._begin_close(CloseCode.NORMAL, "bye", CloseReason.BYE)
        elif isinstance(envelope, Refresh):
            # Without an authenticator there is no token to renew.
            if self._hub.authenticator is not None and self._nursery is not None:
                self._refreshes += 1
                self._nursery.start_soon(self._check_refresh, envelope.token, self._refreshes)
        else:  # hello again, welcome
            raise ProtocolError(
                CloseCode.PROTOCOL_ERROR, f"unexpected {envelope.type} from a client"
            )

    def _session(self) -> Session:
        # Envelopes after hello are read only once welcome is out, so there is one.
        assert self.session is not None
        return self.session

    def _on_ack(self, ack: int) -> None:
        released = self._session().outbox.receive_ack(ack)
        if released:
            self._queue.extend((item.payload, True) for item in released)
            self._wake.set()

    def _on_pong(self, ts: Any) -> None:
        if isinstance(ts, int):
            for index, (pinged, sent) in enumerate(self._pings):
                if pinged == ts:
                    del self._pings[index]
                    self._metrics.heartbeat_rtt.observe(trio.current_time() - sent)
                    return

    # -- producers ------------------------------------------------------------------

    def check_room(self) -> None:
        """Apply the slow-consumer policy if the queue is full (docs/architecture.md, "One writer").

        Either a queued control envelope is dropped, or the connection closes with 4004.
        """
        if self.queue_depth < self._config.queue_size:
            return
        if self._config.slow_consumer == "drop-oldest":
            for index, (_, sequenced) in enumerate(self._queue):
                if not sequenced:
                    del self._queue[index]
                    return
        self._begin_close(CloseCode.SLOW_CONSUMER, "slow consumer", CloseReason.SLOW_CONSUMER)

    def enqueue_sequenced(self, payload: bytes) -> None:
        """Queue an encoded sequenced envelope the session's window let out."""
        self._queue.append((payload, True))
        self._wake.set()

    def _enqueue_control(self, envelope: Envelope) -> None:
        if self.closing:
            return
        self.check_room()
        if self.closing:
            return
        self._queue.append((self._codec.encode(envelope), False))
        self._wake.set()

    def _send_ack(self) -> None:
        self._enqueue_control(Ack(self._session().inbox.take_ack()))

    # -- the write loop -------------------------------------------------------------

    async def _write_loop(self) -> None:
        transport = self._transport
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()  # all that is queued now goes out in this pass
                if self._queue and not self.closing:
                    self._frame_queue()
                try:
                    finished = await transport.flush()
                except TransportBroken as exc:
                    self._abort(CloseCode.ABNORMAL, exc.reason)
                    return
                except trio.ClosedResourceError:
                    return
                if finished:
                    return  # our end of the stream is closed; the reader sees the peer's
        except Exception:
            self._crashed()

    def _frame_queue(self) -> None:
        """Move everything queued into frames: one envelope, or a batch per frame."""
        queue, codec, transport = self._queue, self._codec, self._transport
        payloads = [payload for payload, _ in queue]
        queue.clear()
        envelopes = len(payloads)
        nbytes = 0
        for message in codec.pack(payloads, self._config.max_message_size):
            transport.send_message(message, codec.binary)
            nbytes += len(message)
        self._metrics.messages_out.inc(envelopes)
        self._metrics.bytes_out.inc(nbytes)

    # -- the application scope ------------------------------------------------------

    async def _application(self) -> None:
        try:
            with trio.CancelScope() as scope:
                self._app_scope = scope
                if self.closing:
                    scope.cancel()
                elif self._config.heartbeat_interval is not None:
                    self._start_heartbeat()
                try:
                    # A nursery only for an application with per-connection tasks: an
                    # idle connection of any other keeps none (docs/benchmarks.md).
                    if self._gateway.session_tasks:
                        async with trio.open_nursery() as nursery:
                            await self._dispatcher(nursery)
                    else:
                        await self._dispatcher(None)
                except Exception:
                    self._crashed()
        finally:
            self._stop_timers()
            # Every handler has returned or been cancelled: let go of the session
            # (docs/protocol.md §5), so that a resume elsewhere can take it.
            self._record_end(CloseCode.GOING_AWAY, CloseReason.DRAIN)
            self.closing = True
            session = self.session
            if session is not None and session.connection is self:
                self._hub.detach(session)
            self._let_go = True
            if self._detached is not None:
                self._detached.set()

    # -- the timers: heartbeat and ack delay ----------------------------------------

    def _start_heartbeat(self) -> None:
        # Liveness from the start; pings only once the session is open (below).
        interval = self._config.heartbeat_interval
        assert interval is not None
        now = trio.current_time()
        self._last_seen = now
        self._liveness_timer = self._timers.call_at(
            self._late(now + interval + self._config.heartbeat_timeout), self._check_liveness
        )

    def _start_pings(self) -> None:
        """Pings belong to a session: the first goes an interval after ``welcome``."""
        interval = self._config.heartbeat_interval
        if interval is not None and not self.closing:
            when = self._early(trio.current_time() + interval)
            self._ping_timer = self._timers.call_at(when, self._ping)

    # On the slack's grid: every connection's ping due in the same step goes out in
    # one pass of the timers, and so are the liveness checks (Config.heartbeat_slack).
    # A ping is never late and a close is never early, so the client's own
    # interval + timeout (docs/protocol.md §7) always holds.

    def _early(self, when: float) -> float:
        slack = self._slack
        return math.floor(when / slack) * slack if slack else when

    def _late(self, when: float) -> float:
        slack = self._slack
        # max(): the float product may fall a hair short of ``when``.
        return max(math.ceil(when / slack) * slack, when) if slack else when

    def _stop_timers(self) -> None:
        timers = self._timers
        timers.cancel(self._ping_timer)
        timers.cancel(self._liveness_timer)
        timers.cancel(self._ack_timer)
        timers.cancel(self._expiry_timer)
        self._ping_timer = self._liveness_timer = self._ack_timer = self._expiry_timer = None

    def _ping(self) -> None:
        """Due every heartbeat interval: queue a ping."""
        try:
            interval = self._config.heartbeat_interval
            assert interval is not None
            now = trio.current_time()
            ts = round(now * 1000)
            self._pings.append((ts, now))
            if len(self._pings) > 4:  # unanswered pings are forgotten
                del self._pings[0]
            self._ping_timer = self._timers.call_at(self._early(now + interval), self._ping)
            self._enqueue_control(Ping(ts))
        except Exception:
            self._crashed()

    def _check_liveness(self) -> None:
        """Due when nothing may have come for interval + timeout: close, or look again
        at the deadline the last frame set."""
        interval = self._config.heartbeat_interval
        assert interval is not None
        if self._pending_bytes > _INBOUND_HIGH_WATER:
            self._last_seen = trio.current_time()  # not silent: not read (_wait_taken)
        deadline = self._last_seen + interval + self._config.heartbeat_timeout
        if trio.current_time() >= deadline:
            self._liveness_timer = None
            self._begin_close(
                CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout", CloseReason.HEARTBEAT_TIMEOUT
            )
        else:
            self._liveness_timer = self._timers.call_at(self._late(deadline), self._check_liveness)

    def _want_ack(self) -> None:
        """An ack is pending: send it within ``ack_delay`` unless one goes out first."""
        if self._ack_timer is None and not self.closing:
            self._ack_timer = self._timers.call_at(
                trio.current_time() + self._config.ack_delay, self._ack_due
            )

    def _ack_due(self) -> None:
        self._ack_timer = None
        try:
            if self.session is not None and self.session.inbox.ack_pending:
                self._send_ack()
        except Exception:
            self._crashed()

    async def _dispatcher(self, nursery: trio.Nursery | None) -> None:
        timeout = self._config.hello_timeout
        with trio.move_on_after(math.inf if timeout is None else timeout) as waiting:
            (hello,) = await self._next_envelopes()  # the reader waits for welcome
        if waiting.cancelled_caught:
            self._begin_close(
                CloseCode.HELLO_TIMEOUT, "no hello in time", CloseReason.HELLO_TIMEOUT
            )
            return
        assert isinstance(hello, Hello)
        gateway = self._gateway
        identity = await self._authenticate(hello.token)
        if identity is None:
            return
        session = await self._open_session(hello, identity)
        if session is None:
            return
        if self._hub.authenticator is not None:
            self._expire_token_at(session.identity.deadline)
        self._start_pings()
        self._answered_hello()
        for hook in gateway.connect_hooks:
            await hook(session)
        if nursery is not None:  # there are per-connection tasks
            for task in gateway.session_tasks:
                nursery.start_soon(self._guard, lambda task=task: task(session))
        arrived = self._arrived
        while True:
            # _next_envelopes() inline: an idle connection's dispatcher waits one
            # frame shallower (docs/benchmarks.md, "Idle").
            while not self._pending:
                await arrived.wait()
            envelopes, self._pending = self._pending, []
            self._took()
            # Settings made while this task was busy are for envelopes taken here:
            # kept, they would wake the next wait for nothing.
            arrived.clear()
            # Everything already read is processed before this task yields, so the
            # write loop finds all the replies of one read queued, and sends them in
            # one write.
            for envelope in envelopes:
                await self._process(session, envelope)

    async def _next_envelopes(self) -> list[Envelope]:
        """Every envelope the reader has handed over, in order; waits for one."""
        while not self._pending:
            await self._arrived.wait()
        envelopes, self._pending = self._pending, []
        self._took()
        self._arrived.clear()
        return envelopes

    def _took(self) -> None:
        self._pending_bytes = 0
        if self._taken is not None:
            self._taken.set()

    async def _authenticate(self, token: str | None) -> Identity | None:
        """Who the client is (docs/protocol.md §3); None after closing with 4001."""
        authenticator = self._hub.authenticator
        if authenticator is None:
            return Identity(None)  # anonymous node: hello.token means nothing
        if token is None and self._identity is not None:
            return self._identity  # verified at the handshake
        try:
            return await identify(authenticator, token)
        except Unauthorized as exc:
            self.close(CloseCode.UNAUTHORIZED, f"unauthorized: {exc}")
            return None

    def _expire_token_at(self, deadline: float | None) -> None:
        """Close with 4001 at the token's ``exp`` (docs/protocol.md §8), unless renewed."""
        self._timers.cancel(self._expiry_timer)
        self._expiry_timer = None
        if deadline is not None and not self.closing:
            self._expiry_timer = self._timers.call_at(deadline, self._token_expired)

    def _token_expired(self) -> None:
        self._expiry_timer = None
        self.close(CloseCode.UNAUTHORIZED, "unauthorized: token expired")

    async def _check_refresh(self, token: str, refresh: int) -> None:
        # A task of the connection's nursery, cancelled with the application scope.
        scopes = self._refresh_scopes
        if scopes is None:
            scopes = self._refresh_scopes = set()
        with trio.CancelScope() as scope:
            scopes.add(scope)
            if self.closing:  # decided between start_soon and now
                scope.cancel()
            try:
                await self._verify_refresh(token, refresh)
            except Exception:
                self._crashed()
            finally:
                scopes.discard(scope)

    async def _verify_refresh(self, token: str, refresh: int) -> None:
        """Check a ``refresh`` token; if it is still the latest, renew or close (§8)."""
        authenticator = self._hub.authenticator
        session = self.session
        assert authenticator is not None
        assert session is not None
        try:
            identity = await identify(authenticator, token)
        except Unauthorized as exc:
            if refresh == self._refreshes:
                self.close(CloseCode.UNAUTHORIZED, f"unauthorized: {exc}")
            return
        if refresh != self._refreshes:
            return  # a later refresh came meanwhile: it decides
        if identity.user != session.user:
            self.close(CloseCode.UNAUTHORIZED, "unauthorized: a token for another user")
            return
        session.identity = identity
        self._expire_token_at(identity.deadline)

    async def _open_session(self, hello: Hello, identity: Identity) -> Session | None:
        """Resume the session ``hello`` names, or make a new one (welcome.py); queue
        ``welcome`` and what the client has not acknowledged. None if closing instead."""
        opened = await open_session(self._hub, self, hello, identity)
        if opened is None:
            return None
        session = self.session = opened.session
        self._enqueue_control(opened.welcome)
        # Everything above the client's ack, in order, before anything new.
        self._queue.extend((item.payload, True) for item in opened.resend)
        await follow_user_topic(session)
        return session

    async def _process(self, session: Session, envelope: Envelope) -> None:
        assert isinstance(envelope, Sequenced)
        data: Any = None
        error: ErrorInfo | None = None
        if isinstance(envelope, Msg):
            handler = self._gateway.handlers.get(envelope.event or "")
            if handler is None:
                error = ErrorInfo("unknown_event", f"no handler for event {envelope.event!r}")
            else:
                started = trio.current_time()
                outcome = "ok"
                try:
                    data = await handler(session, envelope.data)
                except SessionClosed:
                    # The handler's own session closed under it (4004, kick...): the
                    # envelope is not processed and there is no one to reply to.
                    self._metrics.handler_outcome["closed"].observe(trio.current_time() - started)
                    return
                except HandlerError as exc:
                    error, outcome = ErrorInfo(exc.code, exc.reason), "error"
                    if value_error([exc.code, exc.reason]) is not None or not (
                        isinstance(exc.code, str) and isinstance(exc.reason, str)
                    ):
                        logger.error("a HandlerError's code and reason are strings: %r", exc)
                        error, outcome = ErrorInfo("internal", "internal error"), "exception"
                except Exception:
                    self.internal_error(f"handler for {envelope.event!r} failed")
                    error, outcome = ErrorInfo("internal", "internal error"), "exception"
                self._metrics.handler_outcome[outcome].observe(trio.current_time() - started)
        else:
            try:
                data, error = await self._hub.topic_operation(session, envelope)
            except SessionClosed:
                return  # as for a handler: not processed, no one to reply to
            except BrokerUnavailable as exc:
                error = ErrorInfo("unavailable", str(exc))
            except Exception:
                self.internal_error(f"{envelope.type} failed")
                error = ErrorInfo("internal", "internal error")
        inbox = session.inbox
        inbox.mark_processed(envelope.seq)
        session.reply(envelope.seq, data, error)
        if inbox.ack_urgent:
            self._send_ack()
        elif inbox.ack_pending:
            self._want_ack()

    async def _run_disconnect_hooks(self, session: Session) -> None:
        # Shielded and bounded: a hook runs even when the node shuts down, briefly.
        with trio.move_on_after(self._config.close_timeout) as scope:
            scope.shield = True
            for hook in self._gateway.disconnect_hooks:
                try:
                    await hook(session)
                except Exception:
                    logger.exception("disconnect hook failed")
