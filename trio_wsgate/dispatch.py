"""The dispatcher: what a connection runs of the application's, in order.

The reader hands it ``hello``, then every new sequenced envelope, in order. It answers
``hello`` (:func:`~trio_wsgate.welcome.open_session` finds or makes the session), runs
the connect hooks and starts the application's per-connection tasks, then takes each
envelope in arrival order: a ``msg`` goes to the handler of its event, a ``sub``,
``unsub`` or ``pub`` to the node (:meth:`DispatchHost.topic_operation`), and what they
answer goes back through the connection as a ``reply``. One envelope at a time: a
handler that waits holds up the next one, never the reader. An application without
per-connection tasks needs no dispatcher task while there is nothing to dispatch:
:meth:`Dispatcher.serve` returns when told to retire (right after ``hello``, or by
:meth:`Dispatcher.tick` at a ping), and the connection starts it again for the next
envelope.

A handler that cannot wait, a coroutine function whose own code has no ``await``,
``async for`` or ``async with`` (:func:`never_waits`), runs in the reader's own step
when nothing is ahead of it (:meth:`Dispatcher.run_now`): it runs to its end at its
first step, so there is nothing for a cancel scope to cancel and nothing to hold up
the reader for, and its reply leaves with the read's other answers, one task step
sooner than through the dispatcher task.

What waits for it is weighed, decoded (:func:`~trio_wsgate.protocol.values.weigh`):
past :data:`INBOUND_HIGH_WATER` the reader stops reading until the dispatcher has taken
it, so a peer that sends faster than its handlers run is held back by TCP, not by this
process's memory. A message heavier than that is taken alone.
"""

from __future__ import annotations

import contextvars
import dis
import functools
import inspect
import logging
import math
import types
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, Protocol

import trio

from .auth import Authenticator, refusal_reason
from .exceptions import BrokerUnavailable, HandlerError, SessionClosed, Unauthorized
from .identity import Identity
from .protocol import CloseCode, CloseReason, Envelope, ErrorInfo, Hello, Msg, Sequenced, Sub
from .protocol.values import value_error
from .session import Session
from .tokens import authenticate
from .wakeup import Wakeup
from .welcome import Opened, Opener, WelcomeHost, follow_user_topic, open_session

__all__ = [
    "INBOUND_HIGH_WATER",
    "Application",
    "DispatchHost",
    "Dispatched",
    "Dispatcher",
    "never_waits",
]

logger = logging.getLogger("trio_wsgate.connection")

#: Bytes that received envelopes waiting for the dispatcher may hold, decoded, before
#: the reader stops reading.
INBOUND_HIGH_WATER = 1 << 20

#: What a handler, a hook and a per-connection task are (the application's).
_Handler = Callable[[Session, Any], Awaitable[Any]]
_Hook = Callable[[Session], Awaitable[None]]

# The instructions through which a coroutine's own code can yield to trio: an await
# (GET_AWAITABLE, SEND, YIELD_VALUE), async for and async with.
_WAITING = frozenset(
    (
        "ASYNC_GEN_WRAP",
        "BEFORE_ASYNC_WITH",
        "END_ASYNC_FOR",
        "GET_AITER",
        "GET_ANEXT",
        "GET_AWAITABLE",
        "SEND",
        "YIELD_FROM",
        "YIELD_VALUE",
    )
)


def never_waits(handler: Callable[..., Any]) -> bool:
    """True if ``handler`` is a coroutine function (or a method of one) whose own code
    has no ``await``, ``async for`` or ``async with``: each coroutine it makes runs to
    its end at its first step, without ever yielding to trio. Anything else (a
    wrapper, a ``functools.partial``, an object with ``__call__``) is taken to wait."""
    function = handler.__func__ if isinstance(handler, types.MethodType) else handler
    return type(function) is types.FunctionType and _function_never_waits(function)


# Keyed by the function (hashed by identity, at C speed: asked per request), whose
# code is read once; bounded, so that handlers made at run time are not all kept.
@functools.lru_cache(maxsize=1024)
def _function_never_waits(function: types.FunctionType) -> bool:
    code = function.__code__
    if not code.co_flags & inspect.CO_COROUTINE:
        return False
    return not any(instruction.opname in _WAITING for instruction in dis.get_instructions(code))


class _Waited(RuntimeError):
    """A handler taken by :func:`never_waits` not to wait yielded all the same."""


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


class DispatchHost(WelcomeHost, Protocol):
    """What the dispatcher asks of the node (and opening a session asks, WelcomeHost)."""

    #: Turns tokens into identities; None runs anonymous.
    authenticator: Authenticator | None

    async def topic_operation(
        self, session: Session, envelope: Sequenced
    ) -> tuple[Any, ErrorInfo | None]:
        """Answer a client's ``sub``, ``unsub`` or ``pub``: ``(data, error)``."""
        ...


class Dispatched(Opener, Protocol):
    """What the dispatcher needs of its connection."""

    def opened(self, opened: Opened) -> Session:
        """Take the session, queue its ``welcome`` and what the client has not
        acknowledged."""
        ...

    def welcomed(self, session: Session) -> None:
        """``hello`` is answered: the session's timers start, the reader reads on."""
        ...

    def answer(
        self,
        session: Session,
        seq: int,
        data: Any,
        error: ErrorInfo | None,
        written_next: bool = False,
    ) -> None:
        """Queue the reply to the client's ``seq`` and acknowledge it; with
        ``written_next``, :meth:`write_queued` is called right after."""
        ...

    async def wait_written(self) -> None:
        """Until what is queued has been handed to the socket."""

    def crashed(self) -> None:
        """An unexpected error: log it and close with 1011."""
        ...

    def write_queued(self) -> None:
        """Write what is queued now, rather than in the timers' next pass."""
        ...


class Dispatcher:
    """One connection's dispatcher, and the envelopes waiting for it.

    It keeps no reference to its connection (which holds it): the connection is
    passed to each call, so that the two make no reference cycle.

    Args:
        node: the node's sessions and topics.
        application: the handlers and hooks it runs.
        verified: who the client is, if a token came with the handshake.
    """

    __slots__ = (
        "_application",
        "_arrived",
        "_busy",
        "_clock",
        "_node",
        "_pending",
        "_ran_now",
        "_retiring",
        "_taken",
        "_verified",
        "_worked",
        "pending_bytes",
    )

    def __init__(
        self,
        node: DispatchHost,
        application: Application,
        verified: Identity | None,
        clock: trio.abc.Clock,
    ) -> None:
        self._node = node
        self._clock = clock  # the run's: handlers are timed by it
        self._application = application
        self._verified = verified
        # Envelopes for the dispatcher, in order, and the wakeup it waits on for more.
        self._pending: list[Envelope] = []
        self._arrived = Wakeup()
        # True from the start (hello, the connect hooks) and while a batch is taken:
        # what is read meanwhile waits its turn (run_now).
        self._busy = True
        #: What the messages those came in weigh, decoded; past INBOUND_HIGH_WATER
        #: the reader waits on _taken (made then) until the dispatcher takes them.
        self.pending_bytes = 0
        self._taken: Wakeup | None = None
        # Whether it took anything since the last heartbeat, and whether it was told to
        # retire (tick): an idle connection keeps no dispatcher task (docs/benchmarks.md).
        self._worked = False
        self._ran_now = False  # run_now ran something since the last heartbeat
        self._retiring = False

    @property
    def has_tasks(self) -> bool:
        """True if the application has per-connection tasks (they need a nursery)."""
        return bool(self._application.session_tasks)

    @property
    def backlogged(self) -> bool:
        """True while what waits weighs more than the bound."""
        return self.pending_bytes > INBOUND_HIGH_WATER

    def put(self, envelope: Envelope) -> None:
        """The reader hands over ``hello`` or a new sequenced envelope."""
        pending = self._pending
        pending.append(envelope)
        if len(pending) == 1:  # else it was woken for the first, and takes them all
            self._arrived.set()

    def weigh(self, weight: int) -> None:
        """A message is read: what it decoded to is counted while any of it waits."""
        if self._pending:
            self.pending_bytes += weight

    async def wait_taken(self, connection: Dispatched) -> None:
        """Return once what waits is taken, or ``connection`` is closing: the reader
        reads no more until then (TCP pushes back on the peer)."""
        taken = self._taken
        if taken is None:
            taken = self._taken = Wakeup()
        while self.pending_bytes > INBOUND_HIGH_WATER and not connection.closing:
            await taken.wait()

    def release(self) -> None:
        """The connection is closing: a reader waiting in :meth:`wait_taken` returns."""
        if self._taken is not None:
            self._taken.set()

    async def open(self, connection: Dispatched, nursery: trio.Nursery | None) -> Session | None:
        """Answer ``hello`` through ``connection``, run the connect hooks and start the
        application's per-connection tasks in ``nursery``; the session, or None if the
        connection closes instead."""
        timeout = self._node.config.hello_timeout
        with trio.move_on_after(math.inf if timeout is None else timeout) as waiting:
            (hello,) = await self._next()  # the reader waits for welcome
        if waiting.cancelled_caught:
            connection.close(CloseCode.HELLO_TIMEOUT, "no hello in time", CloseReason.HELLO_TIMEOUT)
            return None
        assert isinstance(hello, Hello)
        session = await self._open(connection, hello)
        if session is None:
            return None
        connection.welcomed(session)
        application = self._application
        for hook in application.connect_hooks:
            await hook(session)
        if nursery is not None:  # there are per-connection tasks
            for task in application.session_tasks:
                nursery.start_soon(self._guard, connection, task, session)
        # Most connections say nothing for a while after hello: the dispatcher of one
        # that does not (and can retire) goes at once, not a heartbeat later.
        self._retiring = True
        return session

    async def serve(self, connection: Dispatched, session: Session, *, retirable: bool) -> None:
        """Process every envelope in order, until cancelled; or, if ``retirable``,
        return when told to retire (right after :meth:`open`, or by :meth:`tick`) with
        nothing waiting. The connection starts a dispatcher again when an envelope
        comes."""
        arrived = self._arrived
        while True:
            # _next() inline: an idle connection's dispatcher waits one frame
            # shallower (docs/benchmarks.md, "Idle").
            if not self._pending:
                self._busy = False
                while not self._pending:
                    if self._retiring:
                        self._retiring = False
                        if retirable and not connection.closing:
                            return
                    await arrived.wait()
            self._busy = True
            self._worked = True
            envelopes, self._pending = self._pending, []
            self._took()
            # Settings made while this task was busy are for envelopes taken here:
            # kept, they would wake the next wait for nothing.
            arrived.clear()
            # Everything already read is processed before this task yields, so the
            # replies of one read leave in one write.
            last = envelopes[-1]
            for envelope in envelopes:
                await self._process(connection, session, envelope, envelope is last)
            connection.write_queued()  # the replies of this batch, at once

    @property
    def ran_now(self) -> bool:
        """True if :meth:`run_now` ran a request since the last heartbeat (the
        connection's reader then waits through trio, a task step sooner, as while a
        dispatcher runs)."""
        return self._ran_now

    def tick(self, running: bool) -> None:
        """A heartbeat interval has passed: if the dispatcher is ``running`` and took
        nothing since the last one, :meth:`serve` is told to return once nothing waits
        (what :meth:`run_now` ran keeps no task)."""
        if running:
            if not self._worked and not self._pending:
                self._retiring = True
                self._arrived.set()
            self._worked = False
        self._ran_now = False

    async def disconnected(self, session: Session) -> None:
        """Run the disconnect hooks: shielded and bounded, so that they run even when
        the node shuts down, briefly."""
        with trio.move_on_after(self._node.config.close_timeout) as scope:
            scope.shield = True
            for hook in self._application.disconnect_hooks:
                try:
                    await hook(session)
                except Exception:
                    logger.exception("disconnect hook failed")

    async def _next(self) -> list[Envelope]:
        """Every envelope the reader has handed over, in order; waits for one."""
        while not self._pending:
            await self._arrived.wait()
        envelopes, self._pending = self._pending, []
        self._took()
        self._arrived.clear()
        return envelopes

    def _took(self) -> None:
        self.pending_bytes = 0
        if self._taken is not None:
            self._taken.set()

    async def _guard(self, connection: Dispatched, task: _Hook, session: Session) -> None:
        # The root of each of the application's per-connection tasks.
        try:
            await task(session)
        except Exception:
            connection.crashed()

    async def _open(self, connection: Dispatched, hello: Hello) -> Session | None:
        """Authenticate the client and resume or make its session (welcome.py); the
        connection queues ``welcome`` and what to resend. None if closing instead."""
        node = self._node
        try:
            identity = await authenticate(node.authenticator, hello.token, self._verified)
        except Unauthorized as exc:
            connection.close(CloseCode.UNAUTHORIZED, refusal_reason(exc))
            return None
        opened = await open_session(node, connection, hello, identity)
        if opened is None:
            return None
        session = connection.opened(opened)
        await follow_user_topic(session)
        return session

    def run_now(self, connection: Dispatched, session: Session, envelope: Envelope) -> bool:
        """Run ``envelope`` here and now if it is a ``msg`` whose handler never waits
        (:func:`never_waits`) and nothing is ahead of it (nothing waits, no batch is
        under way, ``hello`` and the connect hooks are done): True if it did, and its
        answer is queued for the caller to write before it yields
        (:meth:`Dispatched.answer`'s ``written_next``). Else False: hand it over
        (:meth:`put`)."""
        if self._busy or self._pending or type(envelope) is not Msg:
            return False
        handler = self._application.handlers.get(envelope.event or "")
        if handler is None or not never_waits(handler):
            return False
        self._ran_now = True
        data: Any = None
        error: ErrorInfo | None = None
        outcome = "ok"
        metrics = self._node.metrics
        clock = self._clock
        started = clock.current_time()
        try:
            coroutine: Coroutine[Any, Any, Any] = handler(session, envelope.data)  # type: ignore[assignment]
            try:
                # In a context of its own, as a handler in the dispatcher's task has:
                # what it sets is not left in the reader's, nor in what that starts.
                contextvars.copy_context().run(coroutine.send, None)
            except StopIteration as done:
                data = done.value
            else:  # never_waits read its code: it cannot get here
                coroutine.close()
                raise _Waited(f"the handler for {envelope.event!r} waited")
        except SessionClosed:
            metrics.handler_outcome["closed"].observe(clock.current_time() - started)
            return True  # as in _process: not processed, no one to reply to
        except Exception as exc:
            error, outcome = _failed(connection, envelope, exc)
        metrics.handler_outcome[outcome].observe(clock.current_time() - started)
        connection.answer(session, envelope.seq, data, error, True)
        return True

    async def _process(
        self, connection: Dispatched, session: Session, envelope: Envelope, last: bool
    ) -> None:
        """Run one envelope and answer it; ``last`` of its batch, the answer is written
        by :meth:`serve` right after (:meth:`Dispatched.answer`'s ``written_next``)."""
        assert isinstance(envelope, Sequenced)
        data: Any = None
        error: ErrorInfo | None = None
        metrics = self._node.metrics
        if isinstance(envelope, Msg):
            handler = self._application.handlers.get(envelope.event or "")
            if handler is None:
                error = ErrorInfo("unknown_event", f"no handler for event {envelope.event!r}")
            else:
                clock = self._clock
                started = clock.current_time()
                outcome = "ok"
                try:
                    data = await handler(session, envelope.data)
                except SessionClosed:
                    # The handler's own session closed under it (4004, kick...): the
                    # envelope is not processed and there is no one to reply to.
                    metrics.handler_outcome["closed"].observe(clock.current_time() - started)
                    return
                except Exception as exc:
                    error, outcome = _failed(connection, envelope, exc)
                metrics.handler_outcome[outcome].observe(clock.current_time() - started)
        else:
            try:
                data, error = await self._node.topic_operation(session, envelope)
            except SessionClosed:
                return  # as for a handler: not processed, no one to reply to
            except BrokerUnavailable as exc:
                error = ErrorInfo("unavailable", str(exc))
            except Exception:
                connection.internal_error(f"{envelope.type} failed")
                error = ErrorInfo("internal", "internal error")
        recovery = (
            isinstance(envelope, Sub) and envelope.since is not None and session.codec.version == 2
        )
        connection.answer(session, envelope.seq, data, error, last and not recovery)
        if recovery:
            # A version-2 recovery sent what the history holds, past the bounds of what
            # may wait to be written (docs/protocol.md §14): the next envelope waits
            # until the client has read it, so that recoveries go one at a time.
            await connection.wait_written()


def _failed(connection: Dispatched, envelope: Msg, exc: Exception) -> tuple[ErrorInfo, str]:
    """The error a handler's exception answers with, and its outcome for the metrics:
    a :class:`HandlerError`'s own code and reason if they are strings of the value
    domain; else ``internal``, logged (called where ``exc`` is being handled)."""
    if isinstance(exc, HandlerError):
        if value_error([exc.code, exc.reason]) is None and (
            isinstance(exc.code, str) and isinstance(exc.reason, str)
        ):
            return ErrorInfo(exc.code, exc.reason), "error"
        logger.error("a HandlerError's code and reason are strings: %r", exc)
    else:
        connection.internal_error(f"handler for {envelope.event!r} failed")
    return ErrorInfo("internal", "internal error"), "exception"
