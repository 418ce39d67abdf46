"""The node's registry of sessions: creation, resume, take-over and expiry.

Theory of operation (docs/protocol.md §5). A :class:`~trio_wsgate.session.Session` is
created by a ``hello`` without ``resume`` and *attached* to that connection. When the
connection ends, the session is either **ended** (``bye``, kick, bad token, protocol
error: docs/protocol.md §8 keeps nothing) or **detached**: it stays here for
``resume_ttl`` seconds, numbering and buffering what the application sends to it, up
to ``max_buffered`` envelopes. A ``hello`` with ``resume`` whose token matches the
session and its user *attaches* it to the new connection; if the old connection still
looks open, that one is closed with 4006 first and the new one waits until it has let
go of the session. A detached session past its deadline, or past ``max_buffered``, is
ended; a resume that finds nothing gets a new session and ``resumed: false``.

Users and topics (docs/protocol.md §6). The hub also keeps who is who (``users``: a user's
sessions across devices) and which local sessions follow which topic (``topics``).
Publications come from the broker (``brokers/base.py``), the only way the hub talks
to other nodes: the node subscribes to a topic at the broker when its first session
does, and each publication the broker hands over is *fanned out* to the local
subscribers by a plain loop: each session numbers it and queues it on its own
bounded queue (a full one closes that connection with 4004, never the others), and
the publication's data is encoded once per encoding, whatever the number of
subscribers. A subscription remembers the last offset and epoch it delivered, which
makes recovery exact: subscribe at the broker first, holding what arrives live; read
the history second; send the history, then what was held, skipping any offset already
sent. Work for the broker that nothing waits for (presence, leaving a topic) goes
into an ordered queue of *chores* that :meth:`Hub.run` carries out.

Resume tokens are ``HMAC-SHA256(secret, session id, user)``: unforgeable without the
secret, bound to one session and one user, and checkable by any node that shares the
secret (``--secret``), which the cluster's session migration relies on.

:meth:`Hub.run` is the hub's one task (started by :func:`trio_wsgate.serve`): it ends
detached sessions when their time is up and runs the application's session-end hooks.
Without it, an expired session is still refused on resume; it is only not reclaimed
until the next resume attempt finds it.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import itertools
import logging
import os
import secrets
import socket
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Protocol

import trio

from .auth import Authenticator
from .batching import Batcher
from .brokers import Broker, History, MemoryBroker, Publication
from .brokers.base import PartlyParked
from .brokers.sharded import ShardedBroker
from .exceptions import BrokerUnavailable, SessionClosed
from .protocol import (
    CloseCode,
    CloseReason,
    Codec,
    ErrorInfo,
    Pub,
    Resume,
    Sequenced,
    Since,
    Sub,
    Unsub,
)
from .protocol.closecodes import ends_session
from .protocol.topics import USER_TOPIC_PREFIX, check_topic, prepare_data, user_topic
from .protocol.values import value_error
from .session import ResumeResult, Session, SubscribeResult, Subscription
from .timers import Timers

if TYPE_CHECKING:
    from .config import Config
    from .connection import Connection
    from .metrics import Metrics

__all__ = ["Hub", "ResumeResult"]

logger = logging.getLogger("trio_wsgate.hub")

#: Sessions parked in one call to the broker (one round trip) when a node drains.
_PARK_STEP = 200
# What a detached session, and each of its subscriptions, holds beside its outbox,
# counted against max_detached_bytes (measured: about 1.8 KB a subscription).
_SESSION_WEIGHT = 2048
_SUBSCRIPTION_WEIGHT = 2048
# How often the node adds up what its live sessions hold (max_live_bytes), seconds.
_LIVE_CHECK = 1.0
# How many of an owner's oldest detached sessions eviction looks at for the largest.
_EVICTION_SCAN = 64


class Application(Protocol):
    """What the hub needs of the application (a :class:`~trio_wsgate.Gateway`)."""

    @property
    def session_end_hooks(self) -> Sequence[Callable[[Session], Awaitable[None]]]:
        """Run once each, when a session ends for good."""
        ...

    @property
    def subscribe_authorizer(self) -> Callable[[Session, str], Awaitable[bool]] | None:
        """Asked when neither a token's claim nor a node pattern allows a ``sub``."""
        ...

    @property
    def publish_authorizer(self) -> Callable[[Session, str], Awaitable[bool]] | None:
        """Asked when no node pattern allows a ``pub``."""
        ...


class Hub:
    """The sessions, users and topics of one node.

    Args:
        gateway: the application (its hooks and authorisers).
        config: the node's settings (``resume_ttl``, ``max_buffered``, ``secret``...).
        metrics: the node's metrics.
        broker: what carries publications; an in-memory one by default.
        authenticator: turns tokens into identities; None runs anonymous.
    """

    def __init__(
        self,
        gateway: Application,
        config: Config,
        metrics: Metrics,
        broker: Broker | None = None,
        authenticator: Authenticator | None = None,
    ) -> None:
        self.gateway = gateway
        self.config = config
        #: The unacknowledged bytes a session may hold (``max_buffered_bytes``): an
        #: attribute, read on every envelope a session sends.
        self.max_buffered_bytes = config.max_buffered_bytes
        self.metrics = metrics
        self.broker: Broker = broker or MemoryBroker(
            config.history_size,
            config.history_ttl,
            topic_bytes=config.history_topic_bytes,
            history_bytes=config.history_bytes,
        )
        self.broker.bind(self._receive, self._on_control)
        self.authenticator = authenticator
        #: This node's name.
        self.node_id = config.node_id or (
            f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        )
        #: Every live connection of the node, by connection id (its ``session`` and
        #: that session's ``user`` complete the registry).
        self.connections: dict[str, Connection] = {}
        #: Every session held, attached or detached, by id.
        self.sessions: dict[str, Session] = {}
        #: Bytes the outboxes of detached sessions hold (``max_detached_bytes``).
        self.detached_bytes = 0
        # The same by owner (a user, or an anonymous client's address), and the owners'
        # detached sessions, oldest first.
        self._held_by: dict[str, int] = {}
        self._detached_of: dict[str, dict[Session, None]] = {}
        self._biggest: list[tuple[int, str]] = []  # (-held, owner), some entries stale
        # Set when the last session has left this node, its hand-over (if it moved)
        # answered: a draining node waits for it.
        self._emptied = trio.Event()
        self._handing_over = 0
        # Sessions being parked (a draining node), each with its batch's event.
        self._parking: dict[str, trio.Event] = {}
        #: The sessions of each user, across devices.
        self.users: dict[str, set[Session]] = {}
        #: The local subscribers of each topic, by session id.
        self.topics: dict[str, dict[str, Session]] = {}
        self._broker_topics: set[str] = set()  # topics the node follows at the broker
        # Sessions that moved here with topics the broker could not be asked to follow
        # then (Hub.migrate), in order, and whether a task follows them again.
        self._unfollowed: dict[Session, None] = {}
        self._following_again = False
        self._broker_lock = trio.Lock()
        self._leaving: set[str] = set()  # topics left, for _leave_topics
        self._leave_queued = False  # a _leave_topics is queued (or under way)
        self.live_check_armed = False  # a _check_live_bytes is due
        # A storm of new sessions asks a shared broker (Redis) the same things at once:
        # claims and topic positions go in batches (batching.py).
        self._claims: Batcher[None, str, None] = Batcher(self._claim_batch)
        self._positions: Batcher[str, None, History] = Batcher(self._read_position)
        self._chores: deque[Callable[[], Awaitable[None]]] = deque()
        self._tasks: trio.Nursery | None = None  # the hub's own, while it runs
        #: The connections' heartbeats and ack delays, run by one task of the hub's.
        self.timers = Timers()
        self._chore_lock = trio.Lock()
        self._chores_queued = trio.Event()
        self._secret = (config.secret or secrets.token_hex(32)).encode()
        # (deadline, tie-breaker, session): stale entries are skipped when popped. The
        # session is held weakly: one that ended (resumed, overflowed, kicked) is not
        # kept alive, with its subscriptions, until its old deadline comes.
        self._deadlines: list[tuple[float, int, weakref.ref[Session]]] = []
        self._counter = 0
        self._ended: list[Session] = []
        self._wake = trio.Event()
        metrics.sessions.set_function(lambda: float(len(self.sessions)))
        metrics.sessions_detached.set_function(lambda: float(self.detached_count()))
        metrics.topics.set_function(lambda: float(len(self.topics)))
        metrics.broker_health = self.broker_health

    def broker_health(self) -> dict[str, bool]:
        """Whether the broker can be reached: ``{"": up}``, or ``{shard: up}`` for each
        shard of a sharded one."""
        broker = self.broker
        if isinstance(broker, ShardedBroker):
            return broker.health()
        return {"": broker.healthy}

    # -- tokens -----------------------------------------------------------------------

    def resume_token(self, session_id: str, user: str | None) -> str:
        """The resume token of a session: an HMAC of its id and user."""
        message = f"wsgate.v1.resume\0{session_id}\0{user or ''}".encode()
        digest = hmac.new(self._secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def _token_matches(self, resume: Resume, user: str | None) -> bool:
        return hmac.compare_digest(
            resume.token.encode(), self.resume_token(resume.session, user).encode()
        )

    # -- the life of a session --------------------------------------------------------

    def create(self, user: str | None, codec: Codec) -> Session:
        """A new session for ``user``, encoding with ``codec`` until attached elsewhere."""

        session_id = secrets.token_urlsafe(16)
        session = Session(self, session_id, user, codec, self.config.window)
        session.resume_token = self.resume_token(session_id, user)
        self._register(session)
        self.metrics.sessions_opened.inc()
        return session

    def _register(self, session: Session) -> None:
        self.sessions[session.id] = session
        if session.user is not None:
            self.users.setdefault(session.user, set()).add(session)

    def _unregister(self, session: Session) -> None:
        self.release_held(session)
        self.sessions.pop(session.id, None)
        self._note_if_empty()
        if session.user is not None:
            mine = self.users.get(session.user)
            if mine is not None:
                mine.discard(session)
                if not mine:
                    del self.users[session.user]
        # It leaves its topics, but its own list stays (for the session-end hooks).
        for topic in session.subscriptions:
            self._leave(session, topic)

    def _note_if_empty(self) -> None:
        if not self.sessions and not self._handing_over:
            self._emptied.set()

    async def wait_no_sessions(self) -> None:
        """Until this node holds no session (each one handed over, ended or expired)."""
        while self.sessions or self._handing_over:
            self._emptied = trio.Event()
            await self._emptied.wait()

    async def claim(self, session: Session) -> None:
        """Record in the broker that this node holds the session (for migration)."""
        try:
            if self.broker.shared and self._tasks is not None:
                await self._claims(self._tasks, None, session.id)
            else:
                await self.broker.claim_sessions([session.id], self.node_id)
        except BrokerUnavailable:
            logger.warning("session %s is not recorded as this node's: broker down", session.id)

    async def _claim_batch(self, _: None, sessions: list[str]) -> None:
        await self.broker.claim_sessions(sessions, self.node_id)

    async def _read_position(self, topic: str, _: list[None]) -> History:
        return await self.broker.history(topic, None)

    def detached_count(self) -> int:
        """Sessions waiting for their client to resume."""
        return sum(1 for s in self.sessions.values() if s.connection is None)

    def find(self, resume: Resume, user: str | None) -> tuple[Session | None, ResumeResult]:
        """The session a ``hello.resume`` names, if it may be resumed by ``user``.

        The token is checked first, so that nothing about a session (whether it
        exists, whether it expired) is told to someone who does not hold its token.
        """
        if not self._token_matches(resume, user):
            return None, ResumeResult.BAD_TOKEN
        session = self.sessions.get(resume.session)
        if session is None or session.ended:
            return None, ResumeResult.UNKNOWN
        deadline = self._deadline(session)
        if deadline is not None and trio.current_time() >= deadline:
            self.end(session, CloseCode.GOING_AWAY, CloseReason.DRAIN, why="expired")
            return None, ResumeResult.EXPIRED
        return session, ResumeResult.RESUMED

    def detach(self, session: Session) -> None:
        """Its connection ended (and let go of it): keep the session or end it."""
        connection = session.connection
        assert connection is not None
        session.connection = None
        code, reason = connection.close_code, connection.close_reason
        session.close_code, session.close_reason = code, reason
        if session.ended:
            return
        if ends_session(reason) or not self.config.resume_ttl:
            assert code is not None
            assert reason is not None
            self.end(session, code, reason, why=str(reason))
            return
        session.inbox.detach()
        session.detached_at = trio.current_time()
        if not self.hold(session, self._weight(session)):
            return
        self._expire_later(session)

    def _expire_later(self, session: Session) -> None:
        """Put a detached session on the expiry heap (``resume_ttl`` from its drop)."""
        deadline = self._deadline(session)
        assert deadline is not None
        self._counter += 1
        heapq.heappush(self._deadlines, (deadline, self._counter, weakref.ref(session)))
        self._wake.set()

    @staticmethod
    def _weight(session: Session) -> int:
        """What a detached session holds: its outbox, and the session and subscriptions
        themselves (a session that follows 128 topics holds about 240 KB)."""
        return (
            _SESSION_WEIGHT
            + session.outbox.nbytes
            + sum(_SUBSCRIPTION_WEIGHT + len(topic) for topic in session.subscriptions)
        )

    def overflows(self, session: Session) -> bool:
        """True if ``session`` holds more than a session may keep for a resume."""
        config, outbox = self.config, session.outbox
        return len(outbox) > config.max_buffered or outbox.nbytes > config.max_buffered_bytes

    def hold(self, session: Session, nbytes: int) -> bool:
        """Count ``nbytes`` more of a detached session's outbox against the node's bound.

        Past ``max_buffered`` or ``max_buffered_bytes``, the session ends
        (``overflow``): its client recovers by offset (docs/protocol.md, "Topics"). Past
        ``max_detached_bytes`` for the node, the owner holding the most (the user, or
        the address of an anonymous client) gives up detached sessions, the largest of
        its oldest 64 first, until the node is under it again: one client cannot push
        everyone else's sessions out. Returns False if ``session`` ended.
        """
        owner = session.owner
        if nbytes:
            session.held_bytes += nbytes
            self.detached_bytes += nbytes
            held = self._held_by[owner] = self._held_by.get(owner, 0) + nbytes
            self._detached_of.setdefault(owner, {})[session] = None
            self._note_held(owner, held)
        if self.overflows(session):
            self.end(session, CloseCode.SLOW_CONSUMER, CloseReason.SLOW_CONSUMER, why="overflow")
            return False
        biggest = self._biggest
        while self.detached_bytes > self.config.max_detached_bytes and biggest:
            negative, owner = biggest[0]
            if self._held_by.get(owner) != -negative:
                heapq.heappop(biggest)  # stale: that owner holds another amount now
                continue
            # Of its oldest few, the one holding the most: behind one address, an idle
            # neighbour's session is not the first to pay for a big one's.
            candidates = itertools.islice(self._detached_of[owner], _EVICTION_SCAN)
            victim = max(candidates, key=lambda candidate: candidate.held_bytes)
            self.end(victim, CloseCode.SLOW_CONSUMER, CloseReason.SLOW_CONSUMER, why="overflow")
        return not session.ended

    def _note_held(self, owner: str, held: int) -> None:
        # A lazy max-heap of what each owner holds: eviction finds the biggest in
        # O(log n), not by a scan per session evicted (a fan-out to a full node).
        heapq.heappush(self._biggest, (-held, owner))
        if len(self._biggest) > 2 * len(self._held_by) + 64:
            self._biggest = [(-amount, name) for name, amount in self._held_by.items()]
            heapq.heapify(self._biggest)

    def arm_live_check(self) -> None:
        """Something was queued for a live session: check what they all hold within a
        second (:meth:`_check_live_bytes`), unless a check is due already. A node
        whose sessions hold nothing makes no check."""
        if not self.live_check_armed and self.running:
            self.live_check_armed = True
            self.timers.call_at(trio.current_time() + _LIVE_CHECK, self._check_live_bytes)

    def _check_live_bytes(self) -> None:
        """Every second while live sessions hold anything: their unacknowledged
        envelopes together are held to ``max_live_bytes``. Past it the owner holding
        the most (a user, or an anonymous client's address) loses its largest sessions
        (4004, and they end), until the node is under it: one client with many
        connections cannot make the node hold more than that, whatever each
        connection's own bound."""
        self.live_check_armed = False
        try:
            held: dict[str, list[Session]] = {}
            total = 0
            for session in self.sessions.values():
                if session.connection is not None and session.outbox.nbytes:
                    held.setdefault(session.owner, []).append(session)
                    total += session.outbox.nbytes
            if total:
                self.arm_live_check()  # again in a second, while anything is held
            limit = self.config.max_live_bytes
            if total <= limit:
                return
            owners = [
                (-sum(s.outbox.nbytes for s in sessions), owner) for owner, sessions in held.items()
            ]
            heapq.heapify(owners)
            while total > limit and owners:
                negative, owner = heapq.heappop(owners)
                sessions = held[owner]
                victim = max(sessions, key=lambda session: session.outbox.nbytes)
                sessions.remove(victim)
                freed = victim.outbox.nbytes
                total -= freed
                if victim.connection is not None:
                    victim.connection.close(CloseCode.SLOW_CONSUMER, "slow consumer")
                self.end(victim, CloseCode.SLOW_CONSUMER, CloseReason.SLOW_CONSUMER, why="overflow")
                if sessions:
                    heapq.heappush(owners, (negative + freed, owner))
        except Exception:  # a task of the node's: one bad session must not end it
            self.metrics.internal_errors.inc()
            logger.exception("checking what live sessions hold failed")

    def release_held(self, session: Session) -> None:
        """The session is attached again, or gone: its bytes no longer count as detached."""
        owner = session.owner
        sessions = self._detached_of.get(owner)
        if sessions is None or session not in sessions:
            return
        del sessions[session]
        self.detached_bytes -= session.held_bytes
        left = self._held_by[owner] - session.held_bytes
        session.held_bytes = 0
        if sessions:
            self._held_by[owner] = left
            self._note_held(owner, left)
        else:
            del self._detached_of[owner], self._held_by[owner]

    def end(self, session: Session, code: int, reason: CloseReason, *, why: str) -> None:
        """End a session for good: it will not be resumed."""
        if session.ended:
            return
        session.ended = True
        if session.connection is None:
            session.close_code, session.close_reason = code, reason
        self._unregister(session)
        session.outbox.clear()  # what it kept for a resume, at once
        self._chore(lambda: self.broker.release_session(session.id, self.node_id))
        self.metrics.sessions_ended.labels(why).inc()
        if self.gateway.session_end_hooks:
            self._ended.append(session)
            self._wake.set()

    def _deadline(self, session: Session) -> float | None:
        if session.detached_at is None or session.connection is not None:
            return None
        assert self.config.resume_ttl is not None
        return session.detached_at + self.config.resume_ttl

    def expire(self) -> None:
        """End every detached session whose ``resume_ttl`` has run out."""
        now = trio.current_time()
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, _, ref = heapq.heappop(self._deadlines)
            session = ref()
            if session is not None and not session.ended and self._deadline(session) == deadline:
                self.end(session, CloseCode.GOING_AWAY, CloseReason.DRAIN, why="expired")

    # -- the hub's task ---------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while :meth:`run` runs (connections need its timers)."""
        return self._tasks is not None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run what the node's sessions need, until cancelled.

        In one nursery: the broker (its connections, subscriptions and receivers),
        the node's timers (every connection's heartbeat, ack-delay and token-expiry
        deadlines: :mod:`trio_wsgate.timers`), and the hub's own loop, which expires
        detached sessions, runs session-end hooks and the hub's chores.
        """
        async with trio.open_nursery() as nursery:
            await nursery.start(self.broker.run)
            await nursery.start(self.timers.run)
            self._tasks = nursery
            # The chores in a task of their own: while Redis hangs, each one waits its
            # command timeout, and expiry and the session-end hooks do not wait behind.
            nursery.start_soon(self._chore_loop)
            task_status.started()
            try:
                await self._run()
            finally:
                self._tasks = None

    async def _run(self) -> None:
        while True:
            self.expire()
            ended, self._ended = self._ended, []
            for session in ended:
                await self._run_end_hooks(session)
            if self._ended:
                continue
            self._wake = trio.Event()
            deadline = self._deadlines[0][0] if self._deadlines else float("inf")
            with trio.move_on_at(deadline):
                await self._wake.wait()

    async def _run_end_hooks(self, session: Session) -> None:
        # Bounded like the disconnect hooks, so that one hook cannot stall expiry.
        with trio.move_on_after(self.config.close_timeout):
            for hook in self.gateway.session_end_hooks:
                try:
                    await hook(session)
                except Exception:
                    logger.exception("session-end hook failed")

    # -- chores: broker work that nothing waits for, in order ------------------------

    def _chore(self, chore: Callable[[], Awaitable[None]]) -> None:
        self._chores.append(chore)
        self._chores_queued.set()

    async def _chore_loop(self) -> None:
        while True:
            self._chores_queued = trio.Event()  # (before: what is queued meanwhile wakes it)
            await self.do_chores()
            if not self._chores:
                await self._chores_queued.wait()

    async def do_chores(self) -> None:
        """Carry out the queued broker work, in the order it was queued.

        While the broker is down, each chore does its local part only: it runs in a
        cancelled scope, so up to its first checkpoint (the broker's own bookkeeping,
        which its refreshes write to Redis again once it is back: presence, the
        sessions it holds) and not through a wait of its command's timeout, with the
        queue growing behind it. What needs Redis itself is asked again once it is
        back: the user topics followed, the topics left (``{"kind": "recovered"}``).
        """
        async with self._chore_lock:
            while self._chores:
                chore = self._chores.popleft()
                with trio.CancelScope() as scope:
                    if not self.broker.healthy:
                        scope.cancel()
                    try:
                        await chore()
                    except BrokerUnavailable as exc:
                        # Presence and ownership entries expire by themselves in Redis.
                        logger.warning("broker chore skipped: %s", exc)
                    except Exception:
                        logger.exception("broker chore failed")

    # -- topics -----------------------------------------------------------------------

    async def subscribe(
        self, session: Session, topic: str, since: Since | None = None, *, before_held: bool = False
    ) -> SubscribeResult:
        """Subscribe a session to a topic; with ``since``, recover what it missed first.

        Every publication after ``since.offset`` that the history holds is queued for
        the session, then those that arrived live meanwhile, each exactly once
        (docs/protocol.md §6). Without ``since``, a session already subscribed is told
        where it stands and nothing else changes; with it, the subscription restarts
        from ``since``. No authorisation is checked here (server-side code may
        subscribe a session to any topic).

        The answer is where the session stands: in version 1 after the publications
        that came while the history was read (they are queued before the ``sub``'s
        reply); with ``before_held``, before them, for a new session's user topic,
        whose ``welcome`` goes out before anything queued (docs/protocol.md §6.6).

        Raises:
            ValueError: not a valid topic name.
            SessionClosed: the session has ended.
        """
        check_topic(topic)
        if session.ended:
            raise SessionClosed(session.close_code, session.close_reason)
        current = session.subscriptions.get(topic)
        kept = current is not None and not current.followed
        if current is not None and kept:
            # Not followed here yet (Hub.migrate): from where the session stopped, so
            # that a plain sub leaves no gap. (A place without an epoch is none: the
            # session moved while its first read of the topic was under way.)
            if since is None and current.epoch:
                since = Since(current.offset, current.epoch)
        elif current is not None and since is None and current.pending is None:
            return SubscribeResult(current.offset, current.epoch)
        subscription = Subscription(topic, pending=[])
        if current is not None:
            subscription.floor, subscription.floor_epoch = current.floor, current.floor_epoch
            subscription.by_client = current.by_client
        if since is not None and kept:
            # Until its history has come, it is still to follow from there: for a
            # sub meanwhile, and for a hand-over to another node.
            subscription.offset, subscription.epoch = since.offset, since.epoch
            subscription.followed = False
        session.subscriptions[topic] = subscription
        local = self.topics.setdefault(topic, {})
        local[session.id] = session
        if current is None or not current.followed:
            self._chore(lambda: self.broker.set_presence(topic, session.id, session.user, True))
        try:
            if topic not in self._broker_topics:
                async with self._broker_lock:
                    if topic not in self._broker_topics:
                        await self.broker.subscribe(topic)
                        self._broker_topics.add(topic)
            if since is None and self.broker.shared and self._tasks is not None:
                # Where the topic stands, read after this subscription was registered.
                history = await self._positions(self._tasks, topic, None)
            else:
                history = await self.broker.history(topic, None if since is None else since.offset)
        except BaseException:
            # Cancelled (the connection dropped) or the broker failed: the envelope is
            # not processed, and the client will send it again.
            if session.subscriptions.get(topic) is subscription:
                if current is not None and current.followed and session.codec.version == 2:
                    # A version-2 recovery of a topic the session follows: it still
                    # does (its client asks again with recover), with what came meanwhile.
                    session.subscriptions[topic] = current
                    for publication in subscription.pending or ():
                        self._deliver(session, current, publication)
                    raise
                self.unsubscribe(session, topic)
                if current is not None and kept:  # still to follow from there
                    place = Subscription(topic, current.offset, current.epoch, followed=False)
                    place.floor, place.floor_epoch = current.floor, current.floor_epoch
                    session.subscriptions[topic] = place
                    self._follow_again(session)
            raise
        if session.subscriptions.get(topic) is not subscription:
            # Replaced or dropped while the history was read: the newer call answers.
            return SubscribeResult(history.offset, history.epoch)
        recovered: bool | None = None
        if since is not None:
            recovered = history.recovers(since.offset, since.epoch)
            self.metrics.recoveries.labels("recovered" if recovered else "lost").inc()
            if since.epoch == history.epoch:
                # What the history still holds after since, even with a gap before it.
                for publication in history.publications:
                    self._deliver(session, subscription, publication, replay=True)
        if history.epoch != subscription.epoch or history.offset > subscription.offset:
            subscription.offset, subscription.epoch = history.offset, history.epoch
        if current is None:
            # Where the subscription began: what a client's recovery may not read before
            # (§14). With since, where the caller chose to begin (an application that
            # grants a topic's history from there), if that is of the current history.
            if since is not None and since.epoch == history.epoch:
                subscription.floor, subscription.floor_epoch = since.offset, since.epoch
            else:
                subscription.floor, subscription.floor_epoch = history.offset, history.epoch
        answer = subscription.offset, subscription.epoch
        held, subscription.pending = subscription.pending, None
        subscription.followed = True
        for publication in held or ():
            self._deliver(session, subscription, publication)
        if session.codec.version == 1 and not before_held:
            answer = subscription.offset, subscription.epoch
        # In version 2, where the history stood, before those held: they may die with
        # the connection (or never leave, without one), and a client places the topic
        # at the answer, then asks from there (its position only moves forward).
        return SubscribeResult(*answer, recovered)

    def unsubscribe(self, session: Session, topic: str) -> bool:
        """Unsubscribe a session from a topic. Returns False if it was not subscribed."""
        if session.subscriptions.pop(topic, None) is None:
            return False
        self._leave(session, topic)
        return True

    def _leave(self, session: Session, topic: str) -> None:
        local = self.topics.get(topic)
        if local is not None:
            local.pop(session.id, None)
            if not local:
                del self.topics[topic]
                # One chore for every topic left meanwhile: a chore per topic took the
                # broker lock (a checkpoint) each, and under a churn of subscriptions
                # the queue grew faster than it drained, holding every ended session.
                self._leaving.add(topic)
                if not self._leave_queued:
                    self._leave_queued = True
                    self._chore(self._leave_topics)
        self._chore(lambda: self.broker.set_presence(topic, session.id, session.user, False))

    async def _leave_topics(self) -> None:
        self._leave_queued = False  # (what is left from now on queues the next pass)
        async with self._broker_lock:
            try:
                while self._leaving:  # one at a time: cut short, the rest stay to leave
                    topic = self._leaving.pop()
                    if topic in self._broker_topics and topic not in self.topics:
                        # Forgotten before the await: a session subscribing meanwhile
                        # then waits for the lock and listens again. (Discarded after,
                        # it took the topic for one still listened to, and went deaf.)
                        self._broker_topics.discard(topic)
                        try:
                            await self.broker.unsubscribe(topic)
                        except trio.Cancelled:
                            # Perhaps still followed there: left again next pass.
                            self._broker_topics.add(topic)
                            self._leaving.add(topic)
                            raise
                        except Exception:
                            # That topic's alone: the others are still left (a cluster's
                            # pub/sub can fail one whose slot just moved).
                            logger.exception("leaving %s at the broker failed", topic)
            finally:
                if self._leaving and not self._leave_queued:
                    # Cancelled (a presence() caller runs the chores in its own task):
                    # the rest go with the next pass.
                    self._leave_queued = True
                    self._chore(self._leave_topics)

    def _receive(self, publication: Publication) -> None:
        """Fan a publication out to the local subscribers of its topic (the broker's call)."""
        local = self.topics.get(publication.topic)
        if not local:
            return
        self.metrics.fanout.observe(len(local))
        for session in list(local.values()):
            subscription = session.subscriptions.get(publication.topic)
            if subscription is None:
                continue
            if subscription.pending is not None:
                subscription.pending.append(publication)
            else:
                self._deliver(session, subscription, publication)

    def _deliver(
        self, session: Session, subscription: Subscription, pub: Publication, replay: bool = False
    ) -> None:
        if pub.epoch == subscription.epoch and pub.offset <= subscription.offset:
            return  # already sent (a live one that the history also held)
        subscription.offset, subscription.epoch = pub.offset, pub.epoch
        try:
            if replay:
                session.deliver(pub, True)
            else:
                session.deliver(pub)
        except SessionClosed:
            pass  # it ended (or overflowed max_buffered): only its own loss
        except Exception:
            # The broker's task calls this for every subscriber: one session's failure
            # must not reach it (nor the others). That session ends; its client
            # recovers by offset.
            self.metrics.internal_errors.inc()
            logger.exception("publication to %s failed for session %s", pub.topic, session.id)
            self.end(session, CloseCode.INTERNAL_ERROR, CloseReason.INTERNAL_ERROR, why="internal")
            if session.connection is not None:
                session.connection.close(CloseCode.INTERNAL_ERROR, "internal error")

    async def publish(self, topic: str, data: Any, event: str | None = None) -> Publication:
        """Publish to a topic: every subscriber, on every node, gets it once, in order.

        Raises:
            ValueError: not a valid topic name, or ``data`` cannot be encoded in both
                encodings.
        """
        check_topic(topic)
        if event is not None and (not isinstance(event, str) or value_error(event)):
            raise ValueError(f"an event is a string of valid Unicode, not {event!r}")
        encoded = prepare_data(data)
        publication = await self.broker.publish(topic, data, event, encoded=encoded)
        self.metrics.publications.inc()
        return publication

    async def send_to_user(self, user: str, data: Any, event: str | None = None) -> Publication:
        """Publish to the topic ``user:<user>``, which each of the user's sessions follows."""
        return await self.publish(user_topic(user), data, event)

    async def kick(self, *, user: str | None = None, session: str | None = None) -> int:
        """Close the user's sessions, or one session, with 4005, on every node (§8).

        Kicked sessions end: they cannot be resumed. Returns how many were kicked: for
        a user, the sessions of the user on every node (those following ``user:<sub>``);
        for a session, 1 if this node holds it (a session of another node is kicked
        there, but not counted here).
        """
        if (user is None) == (session is None):
            raise ValueError("kick takes a user or a session")
        if user is not None:
            count = len(await self.presence(user_topic(user)))
        else:
            count = 1 if session in self.sessions else 0
        await self.broker.broadcast({"kind": "kick", "user": user, "session": session})
        return count

    def _on_control(self, message: dict[str, Any]) -> None:
        """A control message from any node, or from the broker itself (its call)."""
        kind = message.get("kind")
        if kind == "kick":
            self.kick_here(user=message.get("user"), session=message.get("session"))
        elif kind == "recovered":
            self._chore(self._follow_user_topics)
            if self._leaving and not self._leave_queued:  # (dropped while it was down)
                self._leave_queued = True
                self._chore(self._leave_topics)
        elif kind == "gap":
            self._gap(message["topic"], message["epoch"], message["upto"])
        elif kind == "moved":
            self._moved(message["sessions"])
        elif (
            kind == "handover" and message.get("owner") == self.node_id and self._tasks is not None
        ):
            self._tasks.start_soon(
                self._hand_over, message["session"], message["to"], message["request"]
            )

    # -- session migration (docs/architecture.md, "Session migration") ---------------------------

    async def migrate(self, resume: Resume, user: str | None, codec: Codec) -> Session | None:
        """Fetch a session that another node holds, for a resume here; None if none.

        The holder closes its connection (4006) if it still has one, and passes the
        session's state: its numbering and unacknowledged envelopes both ways, its
        subscriptions and the application's ``state``. The session follows its topics
        here from where it was, so publications made meanwhile are not lost.

        Raises:
            BrokerUnavailable: the broker could not tell; the session may still be
                there (parked, or held by another node) for a later resume.
        """
        state, owner = await self.broker.find_session(resume.session)
        if state is None and owner is not None and owner != self.node_id:
            state = await self.broker.request_handover(
                resume.session, owner, self.node_id, timeout=2 * self.config.close_timeout
            )
            if state is None:
                # The owner may have parked it meanwhile (it drains); then it
                # answered "not here" only once the state was in the broker.
                state, _ = await self.broker.find_session(resume.session)
        if state is None or state.get("id") != resume.session or state.get("user") != user:
            return None
        if state.get("version", 1) != codec.version:
            return None  # numbered by the other version's rules: a new session

        try:
            session = self._import(state, user, codec)
        except Exception:
            # Another node's state that cannot be read here: that session only is
            # lost (resumed: false), and the node goes on.
            self.metrics.internal_errors.inc()
            logger.exception("the state of session %s could not be taken over", resume.session)
            return None
        floors = state.get("floors") or {}
        by_client = set(state.get("by_client") or ())
        for topic, (offset, epoch) in state["subscriptions"].items():
            # Each topic a place to follow from until it is followed here, so that a
            # hand-over, a park or a resume meanwhile finds them all, and those left
            # when this is cut short are followed later (_refollow). A place without
            # an epoch is none: the session moved while its first read of the topic
            # was under way (it had been sent nothing of it); in version 2 the
            # client asks the history itself, from its own place. Only the floors
            # the state has: one set here, at the hand-over, would hide from its
            # client what was published while it was away.
            place = Subscription(topic, offset, epoch if codec.version == 1 else "", followed=False)
            place.floor, place.floor_epoch = floors.get(topic) or (0, "")
            place.by_client = topic in by_client
            session.subscriptions[topic] = place
        session.detached_at = trio.current_time()
        self._register(session)
        if not self.hold(session, self._weight(session)):
            return None  # more than a session may keep here
        self._expire_later(session)  # if the resume fails from here on, it still expires
        try:
            await self.claim(session)
            self.metrics.sessions_migrated.labels("in").inc()
            for topic, place in list(session.subscriptions.items()):
                if session.subscriptions.get(topic) is not place or place.followed:
                    continue  # a sub of a resume meanwhile has answered for it
                since = Since(place.offset, place.epoch) if place.epoch else None
                try:
                    result = await self.subscribe(session, topic, since)
                except BrokerUnavailable:
                    # It keeps its place, and the hub follows the topic from there
                    # once the broker answers (Hub.subscribe): what was published
                    # meanwhile comes from the history, in order. (Dropped, the
                    # session would have been resumed deaf to the topic.)
                    logger.warning(
                        "migrated session %s follows %s once the broker answers", session.id, topic
                    )
                    continue
                if result.recovered is False:
                    # The history no longer reaches back to where the session stopped
                    # (or the topic began again): resumed, it would miss publications
                    # without a word. It ends, and its client, told resumed: false,
                    # recovers by offset and learns recovered: false.
                    self._history_lost(session)
                    return None
        except SessionClosed:
            pass  # it overflowed, or was evicted, while its history came
        except BaseException:
            # Cut short (its connection closed, the node drains): the topics not
            # followed yet keep their places, and are followed once this has gone.
            if not session.ended:
                self._follow_again(session)
            raise
        if session.ended:
            return None
        return session

    def _follow_again(self, session: Session) -> None:
        """Follow, as soon as the broker answers, the topics ``session`` keeps unfollowed."""
        self._unfollowed[session] = None
        if not self._following_again and self._tasks is not None:
            self._following_again = True
            self._tasks.start_soon(self._refollow)

    async def _refollow(self) -> None:
        """Subscribe each session kept unfollowed to its topics from where it stopped;
        while the broker does not answer, try again after a pause that doubles (0.5 s
        to 8 s)."""
        pause = 0.5
        try:
            while self._unfollowed:
                await trio.sleep(pause)
                pause = min(2 * pause, 8.0)
                for session in list(self._unfollowed):
                    try:
                        for topic, place in list(session.subscriptions.items()):
                            # Skipped if the client unsubscribed meanwhile, or a sub
                            # of its own is reading the history (it answers).
                            if (
                                session.subscriptions.get(topic) is place
                                and not place.followed
                                and place.pending is None
                                and not session.ended
                            ):
                                result = await self.subscribe(session, topic)
                                if result.recovered is False and session.codec.version == 1:
                                    # (In version 2 the client recovers each topic
                                    # itself, and learns the gap from its own sub.)
                                    self._history_lost(session)
                                    break
                    except BrokerUnavailable:
                        break  # again later, this session first
                    except SessionClosed:
                        pass
                    except Exception:
                        # One session's failure, not the hub's: it is tried again.
                        self.metrics.internal_errors.inc()
                        logger.exception("following the topics of %s again failed", session.id)
                    if session.ended or all(p.followed for p in session.subscriptions.values()):
                        self._unfollowed.pop(session, None)
                        pause = 0.5
                for session in [s for s in self._unfollowed if s.ended]:
                    del self._unfollowed[session]
        finally:
            self._following_again = False

    def _moved(self, sessions: list[str]) -> None:
        """The broker says another node holds these sessions now, or that their state
        is parked for one (a park whose answer came too late went through): a detached
        copy here, older than theirs, ends without a word to the broker (not released:
        the holder is another's). One whose client is connected here is this node's
        whatever Redis says (a failover that lost the last claims): it is claimed again."""
        connected: list[str] = []
        for session_id in sessions:
            session = self.sessions.get(session_id)
            if session is None or session.ended:
                continue
            if session.connection is not None and not session.connection.closing:
                connected.append(session_id)
                continue
            self._lives_elsewhere(session, CloseCode.GOING_AWAY, CloseReason.DRAIN, "out")
        if connected:
            self._chore(lambda: self.broker.claim_sessions(connected, self.node_id))

    def _lives_elsewhere(
        self, session: Session, code: CloseCode, reason: CloseReason, how: str
    ) -> None:
        """The session lives on at another node (handed over, parked, or held there
        now): it ends here without hooks nor a word to the broker, and is counted as
        migrated ``how``."""
        session.ended = True
        session.close_code, session.close_reason = code, reason
        self._unregister(session)
        self.metrics.sessions_migrated.labels(how).inc()

    def _gap(self, topic: str, epoch: str, upto: int) -> None:
        """The broker lost the topic's publications up to ``upto`` for this node (they
        are not in the history any more): the local sessions that had not got them
        end as a moved session whose history is lost does, and their clients, told
        ``resumed: false``, learn ``recovered: false`` for the topic and reload."""
        for session in list(self.topics.get(topic, {}).values()):
            place = session.subscriptions.get(topic)
            if place is not None and place.epoch == epoch and place.offset < upto:
                self._history_lost(session)

    def _history_lost(self, session: Session) -> None:
        """End a moved session whose topic history no longer reaches back to its place:
        the client, told ``resumed: false``, recovers by offset, and the ``sub`` reply
        says ``recovered: false`` (docs/protocol.md §5.8)."""
        self.end(session, CloseCode.INTERNAL_ERROR, CloseReason.INTERNAL_ERROR, why="history_lost")
        if session.connection is not None:
            session.connection.close(CloseCode.INTERNAL_ERROR, "topic history lost: resume")

    def _import(self, state: dict[str, Any], user: str | None, codec: Codec) -> Session:
        """A session made from the state another node exported (:meth:`Session.export`)."""
        resume_token = self.resume_token(state["id"], user)
        return Session.restore(self, state, user, codec, resume_token)

    async def _hand_over(self, session_id: str, to: str, request: str) -> None:
        """Another node asks for a session of ours: let go of it and send its state."""
        self._handing_over += 1
        try:
            await self._hand_over_one(session_id, to, request)
        except Exception:
            # A task of the hub's, on behalf of one session: its failure is that
            # session's alone (the other node's resume times out: resumed: false).
            self.metrics.internal_errors.inc()
            logger.exception("handing session %s over failed", session_id)
        finally:
            self._handing_over -= 1
            self._note_if_empty()

    async def _hand_over_one(self, session_id: str, to: str, request: str) -> None:
        parking = self._parking.get(session_id)
        if parking is not None:
            # Parked (then the answer is "not here" and the state is in the broker
            # before it), or, if the broker refused it, still here to hand over.
            await parking.wait()
        state: dict[str, Any] | None = None
        session = self.sessions.get(session_id)
        if session is not None and not session.ended:
            old = session.connection
            if old is not None:
                old.close(CloseCode.TAKEN_OVER, "session taken over", CloseReason.TAKE_OVER)
                await old.wait_detached()
            if not session.ended and session.connection is None:
                state = self._exported(session)
            if state is not None:
                self._lives_elsewhere(session, CloseCode.TAKEN_OVER, CloseReason.TAKE_OVER, "out")
        try:
            await self.broker.answer_handover(request, to, state)
            if state is not None:
                # No longer ours (the new holder claims it; this only stops our refresh).
                await self.broker.release_session(session_id, self.node_id)
        except BrokerUnavailable:
            logger.warning("could not hand session %s over: broker down", session_id)

    async def park(self) -> int:
        """Leave every detached session in the shared broker; how many were left.

        A draining node's last act: the node a client resumes on then takes the
        session's state from the broker, without a round trip to this node, which
        may exit. Sessions the broker refuses (it is down) stay here, and can still
        be handed over on request.
        """
        if not self.broker.shared:
            return 0
        parked = 0
        waiting = [s for s in self.sessions.values() if not s.ended and s.connection is None]
        for start in range(0, len(waiting), _PARK_STEP):
            now = trio.current_time()
            done = trio.Event()
            batch: list[tuple[Session, float]] = []
            for session in waiting[start : start + _PARK_STEP]:
                deadline = self._deadline(session)
                if not session.ended and deadline is not None:
                    batch.append((session, deadline - now))
                    self._parking[session.id] = done
            states: list[tuple[dict[str, Any], float]] = []
            for session, ttl in batch:
                state = self._exported(session)
                if state is not None:
                    states.append((state, ttl))
            refused: BrokerUnavailable | None = None
            taken = batch
            try:
                await self.broker.park_sessions(states, self.node_id)
            except PartlyParked as exc:  # some instances of the broker took theirs
                refused = exc
                taken = [(session, ttl) for session, ttl in batch if session.id in exc.parked]
            except BrokerUnavailable as exc:
                logger.warning("could not park %d sessions: %s", len(batch), exc)
                return parked
            finally:
                for session, _ in batch:
                    del self._parking[session.id]
                done.set()  # hand-overs asked for meanwhile go on (no checkpoint first)
            for session, _ in taken:
                if session.ended:
                    continue  # expired meanwhile: its parked state expires too
                self._lives_elsewhere(session, CloseCode.GOING_AWAY, CloseReason.DRAIN, "parked")
                parked += 1
            if refused is not None:
                logger.warning("could not park every session: %s", refused)
                return parked
        return parked

    def _exported(self, session: Session) -> dict[str, Any] | None:
        """The state of ``session`` to move to another node, or None if it cannot move.

        A session that cannot be written out ends here (``resumed: false`` wherever
        its client comes back); the others move all the same.
        """
        try:
            return self._export(session)
        except Exception:
            self.metrics.internal_errors.inc()
            logger.exception("session %s cannot move to another node", session.id)
            self.end(session, CloseCode.INTERNAL_ERROR, CloseReason.INTERNAL_ERROR, why="internal")
            return None

    @staticmethod
    def _export(session: Session) -> dict[str, Any]:
        # One place where a session is written out for another node (tests inject a
        # failure here); the format is the session's own (Session.export).
        return session.export()

    async def _follow_user_topics(self) -> None:
        """Subscribe the sessions that could not follow their user topic (broker outage)."""
        for session in list(self.sessions.values()):
            if session.user is not None and user_topic(session.user) not in session.subscriptions:
                try:
                    await self.subscribe(session, user_topic(session.user))
                except SessionClosed:
                    continue
                except BrokerUnavailable:
                    return  # down again: the next recovery tries again

    def kick_here(self, *, user: str | None = None, session: str | None = None) -> int:
        """Close this node's sessions of the user, or the session, with 4005."""
        if user is not None:
            targets: Iterable[Session] = list(self.users.get(user, ()))
        else:
            assert session is not None
            found = self.sessions.get(session)
            targets = [found] if found is not None else []
        kicked = 0
        for target in targets:
            if not target.ended:
                target.close(CloseCode.KICKED, "kicked")
                kicked += 1
        return kicked

    async def presence(self, topic: str) -> dict[str, str | None]:
        """The sessions subscribed to a topic, with their users (docs/protocol.md §9)."""
        await self.do_chores()
        return await self.broker.presence(topic)

    # -- authorisation ----------------------------------------------------------------

    async def topic_operation(
        self, session: Session, envelope: Sequenced
    ) -> tuple[Any, ErrorInfo | None]:
        """Answer a client's ``sub``, ``unsub`` or ``pub`` (docs/protocol.md §6):
        ``(data, error)``; its authorisation and limits are checked here."""
        assert isinstance(envelope, Sub | Unsub | Pub)
        hub, topic = self, envelope.topic
        try:
            check_topic(topic)
        except ValueError as exc:
            return None, ErrorInfo("bad_topic", str(exc))
        if isinstance(envelope, Sub):
            limit = self.config.max_subscriptions
            if topic not in session.subscriptions and _counted(session) >= limit:
                return None, ErrorInfo("limit_exceeded", f"at most {limit} subscriptions")
            since, raised = envelope.since, False
            if envelope.recover and session.codec.version == 2:
                # A client's recovery of a topic the session follows (docs/protocol.md
                # §14): it grants nothing new, and never subscribes the session again.
                current = session.subscriptions.get(topic)
                if current is None:
                    return None, ErrorInfo(
                        "not_subscribed", f"the session does not follow {topic!r}"
                    )
                if (
                    since is not None
                    and current.floor_epoch == since.epoch
                    and since.offset < current.floor
                    and not await hub.may_subscribe(session, topic)
                ):
                    # The application subscribed it from there: nothing from before,
                    # and what came between is missed (recovered: false).
                    since, raised = Since(current.floor, since.epoch), True
            elif not await hub.may_subscribe(session, topic):
                return None, ErrorInfo("forbidden", f"not allowed to subscribe to {topic!r}")
            result = await hub.subscribe(session, topic, since)
            place = session.subscriptions.get(topic)
            if place is not None:
                place.by_client = True
            if raised:
                result = SubscribeResult(result.offset, result.epoch, False)
            return result.to_data(), None
        if isinstance(envelope, Unsub):
            if session.user is not None and topic == user_topic(session.user):
                return None, ErrorInfo("forbidden", "the user topic follows the session")
            hub.unsubscribe(session, topic)
            return None, None
        if not await hub.may_publish(session, topic):
            return None, ErrorInfo("forbidden", f"not allowed to publish to {topic!r}")
        try:
            publication = await hub.publish(topic, envelope.data)
        except ValueError as exc:
            return None, ErrorInfo("bad_data", str(exc))
        return {"offset": publication.offset, "epoch": publication.epoch}, None

    async def may_subscribe(self, session: Session, topic: str) -> bool:
        """May the client of this session subscribe to the topic itself?

        Its own ``user:<sub>`` topic, yes; other users' topics only if the
        application's hook says so. Other topics: the token's ``topics`` claim, the
        node's ``allow_subscribe`` patterns, or the hook.
        """
        if topic.startswith(USER_TOPIC_PREFIX):
            if session.user is not None and topic == user_topic(session.user):
                return True
        elif _matches(topic, session.identity.topics) or _matches(
            topic, self.config.allow_subscribe
        ):
            return True
        hook = self.gateway.subscribe_authorizer
        return hook is not None and bool(await hook(session, topic))

    async def may_publish(self, session: Session, topic: str) -> bool:
        """May the client of this session publish to the topic (``pub``)?

        The node's ``allow_publish`` patterns, or the application's hook; ``user:``
        topics, which carry what the server sends to users, only by the hook.
        """
        if not topic.startswith(USER_TOPIC_PREFIX) and _matches(topic, self.config.allow_publish):
            return True
        hook = self.gateway.publish_authorizer
        return hook is not None and bool(await hook(session, topic))


def _matches(topic: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(topic, pattern) for pattern in patterns)


def _counted(session: Session) -> int:
    """The session's subscriptions that count against ``max_subscriptions``: the
    client's own and its user topic, not the application's (docs/protocol.md §6.3)."""
    mine = user_topic(session.user) if session.user is not None else None
    return sum(1 for t, place in session.subscriptions.items() if place.by_client or t == mine)
