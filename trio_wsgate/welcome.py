"""hello → welcome: the session a connection opens (docs/protocol.md §3, §5, §6.6).

A ``hello`` either resumes a session (held here, handed over by the node that holds
it, or taken over from a connection that still looks open) or opens a new one, which
follows its user's topic before its ``welcome`` is sent. Either way the user's
connection limit applies before the session is attached. :func:`open_session` decides
all of it and returns the ``welcome`` and what to resend; the connection queues them.

It knows the node only through :class:`WelcomeHost` (what it asks of the hub) and the
connection only through :class:`Opener`, so that it sits between the two without
importing either (docs/architecture.md, "How the layers meet").
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .config import UserLimitPolicy
from .exceptions import BrokerUnavailable, ProtocolError, SessionClosed
from .identity import Identity
from .protocol import CloseCode, CloseReason, Codec, Hello, Resume, Since, Welcome
from .protocol.topics import user_topic
from .session import Outgoing, ResumeResult, Session, SessionLink, SubscribeResult

if TYPE_CHECKING:
    from .config import Config
    from .metrics import Metrics

__all__ = ["Opened", "Opener", "WelcomeHost", "follow_user_topic", "open_session"]

logger = logging.getLogger("trio_wsgate.connection")


class WelcomeHost(Protocol):
    """What opening a session asks of the node (its hub)."""

    @property
    def config(self) -> Config:
        """The node's settings (heartbeat, window, limits)."""
        ...

    @property
    def metrics(self) -> Metrics:
        """The node's metrics (``wsgate_resumes_total``)."""
        ...

    @property
    def users(self) -> Mapping[str, set[Session]]:
        """The sessions of each user."""
        ...

    def find(self, resume: Resume, user: str | None) -> tuple[Session | None, ResumeResult]:
        """The session a ``hello.resume`` names, if this node holds it for ``user``."""
        ...

    async def migrate(self, resume: Resume, user: str | None, codec: Codec) -> Session | None:
        """The session, handed over by the node that holds it, if any."""
        ...

    def create(self, user: str | None, codec: Codec) -> Session:
        """A new session of ``user``."""
        ...

    async def claim(self, session: Session) -> None:
        """Record this node as the session's owner."""
        ...

    async def subscribe(
        self, session: Session, topic: str, since: Since | None = None, *, before_held: bool = False
    ) -> SubscribeResult:
        """Subscribe ``session`` to ``topic``; where it stands (``before_held``: before
        what came while the history was read)."""
        ...

    def end(self, session: Session, code: int, reason: CloseReason, *, why: str) -> None:
        """End the session for good."""
        ...


class Opener(SessionLink, Protocol):
    """What opening a session asks of the connection that received the ``hello``."""

    @property
    def codec(self) -> Codec:
        """The connection's encoding."""
        ...

    def internal_error(self, what: str) -> None:
        """Log the exception being handled, with the connection's id; count it."""
        ...


@dataclass(slots=True)
class Opened:
    """A session opened for a connection: its ``welcome``, then what to resend."""

    session: Session
    welcome: Welcome
    resend: list[Outgoing]


async def open_session(
    host: WelcomeHost, connection: Opener, hello: Hello, identity: Identity
) -> Opened | None:
    """Resume the session ``hello`` names, or make a new one, for ``connection``.

    Returns None if the connection is closing instead (docs/protocol.md §5): a resume
    the broker cannot answer (1011), a take-over lost to a newer one (4006), an ack
    out of range (1002), the user's connection limit (1008).
    """
    config, metrics = host.config, host.metrics
    codec = connection.codec
    user = identity.user
    session: Session | None = None
    resend: list[Outgoing] = []
    start: dict[str, Any] | None = None  # welcome.user_topic of a new session
    if hello.resume is not None:
        session, result = host.find(hello.resume, user)
        if session is not None and session.codec.version != codec.version:
            # Another protocol version: what it keeps is numbered by the other's rules
            # (docs/protocol.md, "Version"). A new session; this one expires.
            session, result = None, ResumeResult.OTHER_VERSION
        if session is None and result is ResumeResult.UNKNOWN:
            # Perhaps another node holds it (docs/protocol.md §5: sessions may move).
            try:
                session = await host.migrate(hello.resume, user, codec)
            except BrokerUnavailable:
                # It may well be there: a new session would lose it. 1011 keeps
                # it, and the client comes back after a pause (docs/protocol.md).
                metrics.resumes.labels(str(ResumeResult.UNAVAILABLE)).inc()
                connection.close(
                    CloseCode.INTERNAL_ERROR,
                    "session store unreachable: try again",
                    CloseReason.BROKER_UNAVAILABLE,
                )
                return None
            if session is not None:
                if session.claimant is not None or session.connection is not None:
                    # A newer resume found it while its topics were followed here,
                    # and has it: the newest claim wins.
                    connection.close(
                        CloseCode.TAKEN_OVER, "session taken over", CloseReason.TAKE_OVER
                    )
                    return None
                result = ResumeResult.MIGRATED
        if session is not None:
            # The newest claim wins: an earlier connection still waiting for the
            # session to be let go loses it to this one.
            session.claimant = connection
        claimed = session
        try:
            if session is not None and session.connection is not None:
                # Take-over: the old connection still looks open. It is closed with
                # 4006, and lets go of the session once its handlers have stopped.
                old = session.connection
                old.close(CloseCode.TAKEN_OVER, "session taken over", CloseReason.TAKE_OVER)
                await old.wait_detached()
                if session.claimant is not connection:  # a newer connection claimed it since
                    connection.close(
                        CloseCode.TAKEN_OVER, "session taken over", CloseReason.TAKE_OVER
                    )
                    return None
                result = ResumeResult.TAKEN_OVER
                if session.ended:  # it overflowed max_buffered as it let go
                    session, result = None, ResumeResult.UNKNOWN
            metrics.resumes.labels(str(result)).inc()
            if session is not None:
                try:
                    resend = session.outbox.rewind(hello.resume.ack)
                except ProtocolError as exc:
                    connection.close(exc.code, exc.reason)
                    return None
                if not _within_user_limit(host, connection, session):
                    return None  # the session stays detached, for a resume within the limit
                try:
                    session.attach(connection, codec, resumed=True)
                except Exception:
                    # What it kept cannot go out in this encoding (the value domain
                    # rules it out): that session ends, and the client gets a new one
                    # (resumed: false) rather than a session stuck to this connection.
                    connection.internal_error(f"session {session.id} could not be resumed here")
                    host.end(
                        session,
                        CloseCode.INTERNAL_ERROR,
                        CloseReason.INTERNAL_ERROR,
                        why="internal",
                    )
                    session = None
        finally:
            if claimed is not None and claimed.claimant is connection:
                # Decided: the session no longer keeps this connection (closed, it
                # would hold its transport for as long as the session waits).
                claimed.claimant = None

    if session is None:
        new = await _new_session(host, connection, identity)
        if new is None:
            return None
        session, start = new
        if not _within_user_limit(host, connection, session):
            host.end(session, CloseCode.POLICY_VIOLATION, CloseReason.POLICY, why="user limit")
            return None
        # What the user topic sent it already, after the welcome.
        resend = [item for _, item in session.outbox.in_flight]
        session.attach(connection, codec, resumed=False)
        ack = 0
    else:
        ack = session.inbox.resume()
    session.identity = identity
    welcome = Welcome(
        session=session.id,
        resume_token=session.resume_token,
        resumed=session.resumed,
        ack=ack,
        heartbeat_interval=config.heartbeat_interval or 0,
        heartbeat_timeout=config.heartbeat_timeout,
        # The session's own: one made, or resumed, on a node whose --window differs
        # keeps the window it was made with, and a client that sent up to this node's
        # would be closed with 1002 for a window it was never given.
        window=session.inbox.window,
        max_message_size=config.max_message_size,
        user=user,
        user_topic=None if session.resumed else start,
    )
    return Opened(session, welcome, resend)


async def follow_user_topic(session: Session) -> None:
    """After a resumed session's ``welcome``: follow its user topic if subscribing
    failed when it was new (the broker was down; it is tried again now)."""
    user = session.user
    if session.resumed and user is not None and user_topic(user) not in session.subscriptions:
        with contextlib.suppress(SessionClosed, BrokerUnavailable):
            await session.subscribe(user_topic(user))


def _within_user_limit(host: WelcomeHost, connection: Opener, session: Session) -> bool:
    """Apply ``max_connections_per_user`` before ``session`` is attached to ``connection``.

    Over the limit, either this connection or the user's oldest is closed with
    1008, as ``user_limit_policy`` says. Called with no await between it and the
    attach, so that two connections at once cannot both slip under the limit.
    """
    config, user = host.config, session.user
    limit = config.max_connections_per_user
    if limit is None or user is None:
        return True
    live = [
        other.connection
        for other in host.users.get(user, ())
        if other is not session and other.connection is not None and not other.connection.closing
    ]
    if len(live) < limit:
        return True
    reason = f"too many connections for this user (at most {limit})"
    if config.user_limit_policy is UserLimitPolicy.REJECT_NEWEST:
        connection.close(CloseCode.POLICY_VIOLATION, reason)
        return False
    for oldest in sorted(live, key=lambda other: other.opened_at)[: len(live) - limit + 1]:
        oldest.close(CloseCode.POLICY_VIOLATION, reason)
    return True


async def _new_session(
    host: WelcomeHost, connection: Opener, identity: Identity
) -> tuple[Session, dict[str, Any] | None] | None:
    """A new session, following ``user:<sub>`` before its ``welcome`` is sent, and where
    it began following it (``welcome.user_topic``).

    So that nothing sent to the user after the client has its ``welcome`` can be
    missed (docs/protocol.md §6). Returns None if the connection closed meanwhile.
    """
    user = identity.user
    session = host.create(user, connection.codec)
    session.identity = identity
    if connection.codec.version == 2:
        session.early = []  # what its user topic gives it before its welcome
    start: dict[str, Any] | None = None
    try:
        await host.claim(session)
        if user is not None:
            try:
                # Where it stood before what came meanwhile: those are queued, and go
                # out after the welcome; a client drops what is at or below user_topic.
                position = await host.subscribe(session, user_topic(user), before_held=True)
                start = {"topic": user_topic(user), **position.to_data()}
            except BrokerUnavailable:
                # Serve it all the same; it follows its topic once the broker is back.
                logger.warning("session of %s opened without its user topic", user)
    except BaseException:
        # Cancelled (the client left) or failed: no one can resume a session that
        # was never welcomed.
        host.end(session, CloseCode.GOING_AWAY, CloseReason.DRAIN, why="unwelcomed")
        raise
    if connection.closing:
        host.end(session, CloseCode.GOING_AWAY, CloseReason.DRAIN, why="unwelcomed")
        return None
    if session.ended:  # evicted (max_detached_bytes) while it subscribed
        connection.close(CloseCode.TRY_AGAIN_LATER, "try again later")
        return None
    return session, start
