"""A connection is a nursery (docs/architecture.md, "The shape").

Theory of operation. :meth:`Connection.run` opens one nursery and everything that exists
because the peer is connected runs in it:

* the **reader**, the nursery's own task: the only caller of :meth:`Transport.receive`.
  It decodes envelopes, answers control envelopes (``ping``, ``ack``, ``bye``...)
  itself, checks ``seq`` order and hands sequenced envelopes, in order, to
* the **dispatcher** (:mod:`trio_wsgate.dispatch`), which answers ``hello`` and runs
  the application's handlers one at a time in arrival order. It runs in the
  *application scope*, a cancel scope that also holds the application's
  per-connection tasks, if it has any. Without them, the dispatcher's task retires
  while there is nothing to dispatch (right after ``hello``, or once a heartbeat
  interval has passed idle), and the next envelope starts it again. A request that
  was all its read held, whose handler never waits, is run by the reader itself when
  nothing is ahead of it (:meth:`Connection._dispatch`): it cannot be cancelled nor
  hold the reader up, it saves a task step, and it starts no dispatcher task;
* **one writer** at a time. Producers append encoded envelopes to a bounded queue and
  ask for a flush; the node's timers' task (:meth:`~trio_wsgate.timers.Timers.call_soon`)
  frames everything queued by its next pass, several envelopes batched into one frame,
  and writes it without waiting. Only what the socket does not take at once is left
  to a **write loop**, a task started for it that ends once all is written.

The **heartbeat** (:mod:`trio_wsgate.heartbeat`), the **ack delay** and the **token's
expiry** (:mod:`trio_wsgate.tokens`) are entries in the node's timers
(:mod:`trio_wsgate.timers`), not tasks: an idle connection is one sleeping task, the
reader; a dispatcher waits on a :class:`~trio_wsgate.wakeup.Wakeup`, not on events
made per wait. A ``refresh`` is
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
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

import trio

from .dispatch import Application, Dispatcher, DispatchHost
from .exceptions import ProtocolError
from .heartbeat import Heartbeat
from .identity import Identity
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
    Ping,
    Pong,
    Refresh,
    Reply,
    Sequenced,
)
from .protocol.closecodes import reason_for
from .reliability import Receipt
from .session import Session
from .timers import Timer, Timers
from .tokens import TokenWatch
from .transports.base import Transport, TransportBroken, remote_ip
from .welcome import Opened

if TYPE_CHECKING:
    from .config import Config
    from .metrics import Metrics

__all__ = ["Application", "Connection", "Node"]

logger = logging.getLogger("trio_wsgate.connection")


class Node(DispatchHost, Protocol):
    """What a connection needs of its node: the calls it makes to the hub (and those
    its dispatcher makes, :class:`~trio_wsgate.dispatch.DispatchHost`)."""

    #: The node's timers (heartbeats, deadlines), run by the hub's task.
    timers: Timers

    @property
    def running(self) -> bool:
        """True while the hub's task runs the node's timers."""
        ...

    def detach(self, session: Session) -> None:
        """The session's connection is gone: keep it for a resume, or end it."""
        ...


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


# What waits in the write queue: an encoded envelope and whether it must never be
# dropped (sequenced envelopes, and version 2's pubs).
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
        "_bucket",
        "_clock",
        "_codec",
        "_config",
        "_detached",
        "_dispatcher",
        "_dispatching",
        "_done",
        "_flush_due",
        "_flushed",
        "_framed",
        "_heartbeat",
        "_hello_seen",
        "_hub",
        "_let_go",
        "_metrics",
        "_nursery",
        "_peer_ack",
        "_pub_bytes",
        "_queue",
        "_replayed",
        "_timers",
        "_tokens",
        "_transport",
        "_welcomed",
        "_writing",
        "_written",
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
        self._config = config
        self._metrics = metrics
        self._hub = hub
        self._queue: list[_Item] = []
        # Of what waits in the queue that no outbox counts: version-2 pubs and control
        # envelopes (pongs echo a client's ping, whatever its size), bounded by
        # max_buffered_bytes (enqueue_unsequenced, send_control).
        self._pub_bytes = 0
        self._replayed = 0  # of replays in the queue (not counted by queue_depth)
        # What is queued is written by the node's timers' task (_flush_now), and by a
        # write loop of the connection's own only while the socket does not take it.
        self._flush_due = False
        self._writing = False  # a write loop runs
        self._written: trio.Event | None = None  # made by wait_written, set when it is
        # Envelopes framed so far, and how many of them a completed flush has written.
        self._framed = self._flushed = 0
        # The run's clock, read directly where time is taken per read or per request
        # (trio.current_time() is three calls to it).
        self._clock = trio.lowlevel.current_clock()
        self._dispatcher = Dispatcher(hub, gateway, identity, self._clock)
        # The highest ack the peer sent in the read being processed, checked but not
        # applied yet (acks are cumulative: one apply per read, _apply_ack); 0: none.
        self._peer_ack = 0
        self._hello_seen = False
        # Made when the reader hands hello over and waits for welcome (an idle
        # connection holds no event).
        self._welcomed: trio.Event | None = None
        # The timers: the node's (one task for all), and this connection's in them.
        self._timers = hub.timers if hub.running else Timers()
        self._ack_timer: Timer | None = None
        self._heartbeat: Heartbeat | None = None
        if config.heartbeat_interval is not None:
            self._heartbeat = Heartbeat(self)
        self._tokens: TokenWatch | None = None  # on nodes that check tokens
        if hub.authenticator is not None:
            self._tokens = TokenWatch(hub.authenticator, self._timers, self)
        self._bucket: TokenBucket | None = None
        if config.rate_limit is not None:
            burst = config.rate_burst or max(1, math.ceil(2 * config.rate_limit))
            self._bucket = TokenBucket(config.rate_limit, burst, trio.current_time())
        self._nursery: trio.Nursery | None = None
        # The application scope (the dispatcher, handlers, the application's tasks).
        self._app_scope: trio.CancelScope | None = None
        self._done: trio.Event | None = None
        self._detached: trio.Event | None = None
        self._let_go = False  # the session is let go of (or there never was one)
        # A dispatcher task runs, or is about to: none while it has retired (idle).
        self._dispatching = True
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
    def config(self) -> Config:
        """The node's settings."""
        return self._config

    @property
    def metrics(self) -> Metrics:
        """The node's metrics."""
        return self._metrics

    @property
    def timers(self) -> Timers:
        """The timers of this connection's deadlines: the node's, or its own when the
        node's are not running."""
        return self._timers

    @property
    def backlogged(self) -> bool:
        """True while received envelopes not yet taken by the dispatcher weigh more than
        the inbound bound (the reader has stopped: the peer's acks wait behind them)."""
        return self._dispatcher.backlogged

    @property
    def inbound_bytes(self) -> int:
        """What the received envelopes not yet taken by the dispatcher weigh, decoded."""
        return self._dispatcher.pending_bytes

    @property
    def queue_depth(self) -> int:
        """Envelopes waiting: in the write queue plus those the window holds back."""
        session = self.session
        held = len(session.outbox.waiting) if session and session.connection is self else 0
        return len(self._queue) - self._replayed + held

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
                if self._queue or self._transport.wants_flush():
                    self._start_writer()  # queued before there was a nursery
                # A constant name: trio would otherwise format one per task.
                nursery.start_soon(self._application, name=_APPLICATION)
                # The reader is this nursery's own task: one task fewer per connection.
                try:
                    await self._read_loop()
                except Exception:
                    self.crashed()
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
            # Without a dispatcher task (it had retired), nothing else lets go of the
            # session when the connection is cancelled from outside: no close was
            # decided, so the timers were not asked to either.
            self._let_go_of_session()
            # What calls back into this connection lets go of it: no reference cycle
            # is left for the node's rare cyclic collector (tests/test_leaks.py).
            self._heartbeat = self._tokens = None
            logger.debug(
                "connection %s from %s closed: %s %s",
                self.id,
                self._transport.remote_address,
                self.close_code,
                self.close_reason,
            )
        if self.session is not None:
            await self._dispatcher.disconnected(self.session)

    async def wait_detached(self) -> None:
        """Wait until this connection has let go of its session (or never had one)."""
        if not self._let_go:
            if self._detached is None:
                self._detached = trio.Event()
            await self._detached.wait()

    def internal_error(self, what: str) -> None:
        """Log the exception being handled, once, with this connection's id; count it."""
        self._metrics.internal_errors.inc()
        logger.exception(
            "%s on connection %s from %s", what, self.id, self._transport.remote_address
        )

    def crashed(self) -> None:
        """An unexpected error in any of the connection's own tasks or timers: logged
        once, and it becomes close 1011 (docs/protocol.md §8): the peer is told, the
        node goes on."""
        self.internal_error("internal error")
        self._begin_close(CloseCode.INTERNAL_ERROR, "internal error", CloseReason.INTERNAL_ERROR)

    # -- what the dispatcher calls ----------------------------------------------------

    def opened(self, opened: Opened) -> Session:
        """Take the session ``hello`` opened; queue ``welcome``, then everything above
        the client's ack, in order, before anything new."""
        session = self.session = opened.session
        self.send_control(opened.welcome, kept=True)  # (drop-oldest never drops it)
        if not self.closing:  # a full queue closed it: the session keeps them
            self._queue.extend((item.payload, True) for item in opened.resend)
            if opened.resend:
                session.outbox.sent = max(session.outbox.sent, opened.resend[-1].seq)
        early, session.early = session.early, None
        if early and not self.closing:  # version 2: after welcome, before anything live
            self._queue.extend((payload, True) for payload in early)
        return session

    def welcomed(self, session: Session) -> None:
        """``hello`` is answered: the token's expiry and the pings start (the first ping
        an interval after ``welcome``), and the reader goes back to reading."""
        if self._tokens is not None:
            self._tokens.expire_at(session.identity.deadline)
        if self._heartbeat is not None:
            self._heartbeat.start_pings()
        self._answered_hello()

    def answer(
        self,
        session: Session,
        seq: int,
        data: Any,
        error: ErrorInfo | None,
        written_next: bool = False,
    ) -> None:
        """Queue the reply to the client's ``seq``; acknowledge it now if the inbox
        says so, else within ``ack_delay`` unless an ack goes out first.

        ``written_next``: the caller calls :meth:`write_queued` right after, without
        yielding (the dispatcher for the last envelope of its batch; the reader, at
        the end of its read, for what it ran itself), so the timers' task is not woken
        to write what this queues: one task step fewer per request that comes alone.
        """
        if written_next and not self._flush_due and not self._writing:
            self._flush_due = True  # asked for already: _want_flush asks no one
            try:
                self._answer(session, seq, data, error)
            except BaseException:
                self._timers.call_soon(self._flush_now)  # the flush asked for above
                raise
        else:
            self._answer(session, seq, data, error)

    def _answer(self, session: Session, seq: int, data: Any, error: ErrorInfo | None) -> None:
        inbox = session.inbox
        inbox.mark_processed(seq)
        session.reply(seq, data, error)
        if inbox.acked == inbox.processed and not inbox.reack:
            return  # the reply took the ack (the usual case: no ack pending)
        if inbox.ack_urgent:
            self._send_ack()
        elif inbox.ack_pending and self._ack_timer is None and not self.closing:
            self._ack_timer = self._timers.call_at(
                trio.current_time() + self._config.ack_delay, self._ack_due
            )

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
        self._pub_bytes = self._replayed = 0
        self._note_written()
        self._dispatcher.release()  # and one waiting for the dispatcher too
        self._cancel_application()
        if self._nursery is not None:
            self._nursery.cancel_scope.deadline = self._close_deadline()
        if send:
            self._transport.send_close(code, text)
        self._want_flush()

    def _answered_hello(self) -> None:
        welcomed, self._welcomed = self._welcomed, None
        if welcomed is not None:
            welcomed.set()

    def cut(self) -> None:
        """End the connection now, without waiting for the peer's close: its session is
        kept, detached (a draining node that must park it before its time is up)."""
        self._abort(CloseCode.GOING_AWAY, CloseReason.DRAIN)

    def _abort(self, code: int, label: CloseReason) -> None:
        """The transport is gone: nothing more can be sent or received."""
        self._record_end(code, label)
        self.closing = True
        self._cancel_application()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _cancel_application(self) -> None:
        # Before the application task has entered its scope, it sees ``closing``.
        if self._app_scope is not None:
            self._app_scope.cancel()
        elif not self._dispatching and not self._let_go:
            # The dispatcher has retired: no handler runs (one the reader runs ends
            # before the timers' next pass). Let go of the session in that pass, as
            # the dispatcher's task would have on its way out.
            self._timers.call_soon(self._let_go_of_session)
        self._stop_timers()

    def _stop_timers(self) -> None:
        # The refresh checks in flight are cancelled with them.
        self._timers.cancel(self._ack_timer)
        self._ack_timer = None
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self._tokens is not None:
            self._tokens.stop()

    # -- the reader -----------------------------------------------------------------

    async def _read_loop(self) -> None:
        transport = self._transport
        metrics = self._metrics
        dispatcher = self._dispatcher
        heartbeat = self._heartbeat
        while True:
            try:
                # Awaited here rather than inside receive: an idle connection's reader
                # waits one frame shallower (docs/benchmarks.md, "Idle"). Quiet before
                # hello and while nothing is dispatched: its dispatcher has retired
                # (nothing to do since hello, or for a heartbeat interval) and the
                # reader ran no request itself since the last heartbeat.
                readable = transport.wait_readable(
                    not (self._hello_seen and (self._dispatching or dispatcher.ran_now))
                )
                if readable is not None:
                    await readable
                incoming = await transport.receive()
            except TransportBroken as exc:
                self._abort(CloseCode.ABNORMAL, exc.reason)
                return
            except trio.ClosedResourceError:
                # Closed under us (by whoever holds the stream): nothing more comes.
                self._abort(CloseCode.ABNORMAL, CloseReason.RESET)
                return
            if incoming.frames and heartbeat is not None:
                heartbeat.last_seen = self._clock.current_time()
            if incoming.nbytes:
                metrics.bytes_in.inc(incoming.nbytes)
            if (
                incoming.pings
                and self._bucket is not None
                and not self._within_rate(incoming.pings)
            ):
                continue
            alone = incoming.alone  # answered here if it can be (_dispatch)
            try:
                for payload, binary in incoming.messages:
                    if self.closing:
                        break
                    try:
                        envelopes, weight = self._decode(payload, binary)
                        if self._bucket is not None and not self._within_rate(len(envelopes)):
                            break
                        if len(envelopes) != 1:
                            alone = False
                        for envelope in envelopes:
                            if self.closing:
                                break
                            if self._on_envelope(envelope, alone):
                                # welcome answers hello before anything else is answered.
                                self._welcomed = trio.Event()
                                await self._welcomed.wait()
                        dispatcher.weigh(weight)  # kept, decoded, until dispatched
                    except ProtocolError as exc:
                        self.close(exc.code, exc.reason)
            except BaseException:
                self.write_queued()  # what was answered here (run_now) is not held back
                raise
            if self._peer_ack:
                self._apply_ack()
            if incoming.failed is not None:
                code, text = incoming.failed
                self._begin_close(
                    code, text, reason_for(code, CloseReason.PROTOCOL_ERROR), send=False
                )
            if incoming.peer_close is not None:
                code, text = incoming.peer_close
                self._begin_close(code, text, CloseReason.CLEAN, send=False)
            if transport.wants_flush():
                self._want_flush()
            self.write_queued()  # what this read was answered with (acks, pongs)
            if incoming.eof:
                # The peer closed its end; after a close handshake this is the normal end.
                self._abort(CloseCode.ABNORMAL, CloseReason.EOF)
                return
            if dispatcher.backlogged and not self.closing:
                # Read no more until the dispatcher has taken what waits: what a peer
                # sends faster than its handlers run stays in its socket, not here.
                await dispatcher.wait_taken(self)

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

    def _on_envelope(self, envelope: Envelope, alone: bool) -> bool:
        """Act on one envelope the client sent; True for the hello to answer first.
        ``alone``: it was all its read held (:meth:`_dispatch`)."""
        if not self._hello_seen:
            if not isinstance(envelope, Hello):
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "the first envelope must be hello")
            self._hello_seen = True
            self._dispatcher.put(envelope)
            return True
        if isinstance(envelope, Sequenced):
            if isinstance(envelope, Reply):
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "reply is sent by the server only")
            session = self.session
            assert session is not None  # read only once welcome is out (_session)
            if envelope.ack is not None and envelope.ack > self._peer_ack:
                self._note_ack(session, envelope.ack)
            inbox = session.inbox
            if inbox.receive(envelope.seq) is Receipt.NEW:
                self._dispatch(envelope, session, alone)
            elif inbox.ack_urgent:
                self._send_ack()
        elif isinstance(envelope, Ack):
            if envelope.ack > self._peer_ack:
                self._note_ack(self._session(), envelope.ack)
        elif isinstance(envelope, Ping):
            self.send_control(Pong(envelope.ts))
        elif isinstance(envelope, Pong):
            if self._heartbeat is not None:
                self._heartbeat.pong(envelope.ts)
        elif isinstance(envelope, Bye):
            self._begin_close(CloseCode.NORMAL, "bye", CloseReason.BYE)
        elif isinstance(envelope, Refresh):
            # Without an authenticator there is no token to renew.
            if self._tokens is not None and self._nursery is not None:
                self._tokens.refresh(self._nursery, envelope.token)
        else:  # hello again, welcome
            raise ProtocolError(
                CloseCode.PROTOCOL_ERROR, f"unexpected {envelope.type} from a client"
            )
        return False

    def _session(self) -> Session:
        # Envelopes after hello are read only once welcome is out, so there is one.
        assert self.session is not None
        return self.session

    def _note_ack(self, session: Session, ack: int) -> None:
        """The peer acknowledged ``ack``: refused now if it is above what was sent,
        applied at the end of the read (:meth:`_apply_ack`) with the others it sent."""
        session.outbox.check_ack(ack)
        self._peer_ack = ack

    def _apply_ack(self) -> None:
        """Apply the last ack of the read: release what it acknowledges, and write what
        the window lets through now."""
        ack, self._peer_ack = self._peer_ack, 0
        session = self.session
        assert session is not None  # an ack was noted: there is one (_session)
        released = session.outbox.receive_ack(ack)
        if released and not self.closing:  # (closing: kept for a resume, never framed)
            self._queue.extend((item.payload, True) for item in released)
            session.outbox.sent = released[-1].seq
            self._want_flush()

    # -- producers ------------------------------------------------------------------

    def check_room(self) -> None:
        """Apply the slow-consumer policy if the queue is full (docs/architecture.md, "One writer").

        Either a queued control envelope is dropped, or the connection closes with 4004.
        """
        if self.queue_depth < self._config.queue_size:
            return
        if self._config.slow_consumer == "drop-oldest":
            for index, (payload, kept) in enumerate(self._queue):
                if not kept:
                    del self._queue[index]
                    self._pub_bytes -= len(payload)  # (counted: send_control)
                    return
        self._begin_close(CloseCode.SLOW_CONSUMER, "slow consumer", CloseReason.SLOW_CONSUMER)

    def enqueue_sequenced(self, payload: bytes) -> None:
        """Queue an encoded sequenced envelope the session's window let out."""
        self._queue.append((payload, True))
        self._want_flush()

    def enqueue_unsequenced(self, payload: bytes, replay: bool = False) -> None:
        """Queue a version-2 ``pub`` (docs/protocol.md §14), unless closing.

        Never dropped, whatever the slow-consumer policy (its client would miss an
        offset without knowing); a full queue closes with 4004 instead, and so do more
        than ``max_buffered_bytes`` of them waiting to be framed: the session is kept,
        and its client asks the topics' histories for what it missed. A ``replay``
        (what a client's ``sub`` asked of the history) is neither: it is bounded by the
        history, and the dispatcher takes the next envelope only once it is written
        (:meth:`wait_written`), so that a recovery larger than those bounds completes.
        """
        if self.closing:
            return
        if replay:
            self._queue.append((payload, True))
            self._replayed += 1
            self._want_flush()
            return
        self.check_room()
        if self.closing:
            return
        self._pub_bytes += len(payload)
        if self._pub_bytes > self._config.max_buffered_bytes:
            self._begin_close(CloseCode.SLOW_CONSUMER, "slow consumer", CloseReason.SLOW_CONSUMER)
            return
        self._queue.append((payload, True))
        self._want_flush()

    async def wait_written(self) -> None:
        """Until what is queued now has been handed to the socket (or the connection
        closes): a version-2 recovery's pubs are paced by the client's reading, and
        what is queued after them does not make the wait longer."""
        mark = self._framed + len(self._queue)
        while self._flushed < mark and not self.closing:
            if self._written is None:
                self._written = trio.Event()
            await self._written.wait()

    def _note_written(self) -> None:
        """A flush completed (or the connection is closing): wake a wait_written."""
        written = self._written
        if written is not None:
            self._written = None
            written.set()

    def send_control(self, envelope: Envelope, kept: bool = False) -> None:
        """Queue a control envelope (``welcome``, ``ack``, ``ping``, ``pong``), unless
        closing; a full queue applies the slow-consumer policy first, which may drop
        a queued one, never one ``kept`` (``welcome``)."""
        if self.closing:
            return
        self.check_room()
        if self.closing:
            return
        payload = self._codec.encode(envelope)
        if not kept:  # (the welcome is not: one per connection, whatever the bound)
            self._pub_bytes += len(payload)
        if self._pub_bytes > self._config.max_buffered_bytes:
            # A peer that sends large pings and does not read their pongs: held while
            # the write loop waits for it, they would count only against queue_size.
            self._begin_close(CloseCode.SLOW_CONSUMER, "slow consumer", CloseReason.SLOW_CONSUMER)
            return
        self._queue.append((payload, kept))
        self._want_flush()

    def _send_ack(self) -> None:
        self.send_control(Ack(self._session().inbox.take_ack()))

    def _ack_due(self) -> None:
        self._ack_timer = None
        try:
            if self.session is not None and self.session.inbox.ack_pending:
                self._send_ack()
        except Exception:
            self.crashed()

    # -- writing ----------------------------------------------------------------------

    def write_queued(self) -> None:
        """Write now what is queued, if a flush is due: at the end of a batch of work
        (a read, the dispatcher's envelopes), so that its answers leave at once rather
        than in the timers' next pass."""
        if self._flush_due:
            self._flush_now()

    def _want_flush(self) -> None:
        """Something is queued: the write loop's, if one runs; else the timers' next
        pass writes it (:meth:`_flush_now`), with whatever else is queued by then."""
        if not self._writing and not self._flush_due:  # a write loop looks again
            self._flush_due = True
            self._timers.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        """Frame what is queued and write it without waiting (in the timers' task); a
        write loop takes over what the socket does not take at once."""
        if not self._flush_due:
            return
        self._flush_due = False
        if self._writing:
            return  # a write loop started since: it writes this too
        try:
            if self._queue and not self.closing:
                self._frame_queue()
            if self._transport.flush_now():
                self._flushed = self._framed
                self._note_written()
                return
        except TransportBroken as exc:
            self._abort(CloseCode.ABNORMAL, exc.reason)
            return
        except trio.ClosedResourceError:
            return
        except Exception:
            self.crashed()
            return
        self._start_writer()

    def _start_writer(self) -> None:
        nursery = self._nursery
        if self._writing or nursery is None or self.released_at is not None:
            return  # one at a time; before run, run starts it
        self._writing = True
        try:
            nursery.start_soon(self._write_loop, name=_WRITER)
        except RuntimeError:  # the nursery has closed: nothing more is written
            self._writing = False

    async def _write_loop(self) -> None:
        """Write until nothing is left: what the socket did not take at once, a
        half-close, or a transport that never writes at once (docs/architecture.md,
        "One writer")."""
        transport = self._transport
        try:
            while True:
                if self._queue and not self.closing:
                    self._frame_queue()
                framed = self._framed
                try:
                    finished = await transport.flush()
                except TransportBroken as exc:
                    self._abort(CloseCode.ABNORMAL, exc.reason)
                    return
                except trio.ClosedResourceError:
                    return
                self._flushed = framed  # all framed before the flush is written
                self._note_written()
                if finished:
                    return  # our end of the stream is closed; the reader sees the peer's
                if (not self._queue or self.closing) and not transport.wants_flush():
                    return  # (what is queued once closing is never framed)
        except Exception:
            self._writing = False  # so that the close frame is flushed
            self.crashed()
        finally:
            self._writing = False
            self._note_written()

    def _frame_queue(self) -> None:
        """Move everything queued into frames: one envelope, or a batch per frame."""
        queue, codec, transport = self._queue, self._codec, self._transport
        payloads = [payload for payload, _ in queue]
        queue.clear()
        self._pub_bytes = self._replayed = 0
        envelopes = len(payloads)
        nbytes = 0
        for message in codec.pack(payloads, self._config.max_message_size):
            transport.send_message(message, codec.binary)
            nbytes += len(message)
        self._framed += envelopes
        self._metrics.messages_out.inc(envelopes)
        self._metrics.bytes_out.inc(nbytes)

    # -- the application scope ------------------------------------------------------

    async def _application(self, first: bool = True) -> None:
        """The dispatcher's task, in the application scope: first ``hello`` and the
        connect hooks, then the envelopes in order. Without per-connection tasks it
        retires while there is nothing to dispatch (Dispatcher.serve), and the next
        envelope starts it again (``first`` False)."""
        dispatcher = self._dispatcher
        retired = False
        try:
            with trio.CancelScope() as scope:
                self._app_scope = scope
                if self.closing:
                    scope.cancel()
                elif first and self._heartbeat is not None:
                    self._heartbeat.start()
                try:
                    # A nursery only for an application with per-connection tasks: an
                    # idle connection of any other keeps none (docs/benchmarks.md).
                    if dispatcher.has_tasks:
                        async with trio.open_nursery() as nursery:
                            session = await dispatcher.open(self, nursery)
                            if session is not None:
                                await dispatcher.serve(self, session, retirable=False)
                    else:
                        session = await dispatcher.open(self, None) if first else self.session
                        if session is not None:
                            await dispatcher.serve(self, session, retirable=True)
                            retired = True  # serve returns only to retire
                except Exception:
                    self.crashed()
        finally:
            self._app_scope = None
            if retired:
                self._dispatching = False
            else:
                self._let_go_of_session()

    def _dispatch(self, envelope: Envelope, session: Session, alone: bool) -> None:
        """Hand ``envelope`` to the dispatcher, or, if it was ``alone`` in its read
        (one message of one envelope), run it here and now if it can be
        (Dispatcher.run_now: its handler never waits, nothing is ahead of it); its
        reply is written at the end of the read. Several messages in one read are a
        sign of load: through the dispatcher's step, the replies of more requests
        leave together (docs/benchmarks.md). What the reader ran starts no task; what
        goes to a dispatcher that has retired starts it again."""
        dispatcher = self._dispatcher
        if alone:
            # Its piggybacked ack first, as the dispatcher's step would find it: what
            # it acknowledges no longer counts against max_buffered_bytes when the
            # reply is kept. Nothing else in this read can ack what it lets out.
            if self._peer_ack:
                self._apply_ack()
            try:
                if dispatcher.run_now(self, session, envelope):
                    return
            except Exception:
                # (A bug of the node's, not the handler's: run_now answers those.) As
                # in the dispatcher's task: 1011, and the reader reads on to the
                # close handshake.
                self.crashed()
                return
        dispatcher.put(envelope)
        if not self._dispatching and not self.closing and self._nursery is not None:
            self._dispatching = True
            self._nursery.start_soon(self._application, False, name=_APPLICATION)

    def heartbeat_passed(self) -> None:
        """At each ping: a dispatcher idle since the last one retires, and a reader
        that ran nothing itself since then waits quietly again. (Without heartbeats,
        neither: a reader that ran a request waits through trio from then on, as a
        dispatcher started again never retires.)"""
        self._dispatcher.tick(self._app_scope is not None)

    def _let_go_of_session(self) -> None:
        """Every handler has returned or been cancelled (or none runs): let go of the
        session (docs/protocol.md §5), so that a resume elsewhere can take it."""
        if self._let_go:
            return
        self._stop_timers()
        self._record_end(CloseCode.GOING_AWAY, CloseReason.DRAIN)
        self.closing = True
        session = self.session
        if session is not None and session.connection is self:
            self._hub.detach(session)
        self._let_go = True
        if self._detached is not None:
            self._detached.set()
