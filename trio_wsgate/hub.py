"""The node's registry of sessions: creation, resume, take-over and expiry.

Theory of operation (PROTOCOL.md §5). A :class:`~trio_wsgate.connection.Session` is
created by a ``hello`` without ``resume`` and *attached* to that connection. When the
connection ends, the session is either **ended** (``bye``, kick, bad token, protocol
error: PROTOCOL.md §8 keeps nothing) or **detached**: it stays here for
``resume_ttl`` seconds, numbering and buffering what the application sends to it, up
to ``max_buffered`` envelopes. A ``hello`` with ``resume`` whose token matches the
session and its user *attaches* it to the new connection; if the old connection still
looks open, that one is closed with 4006 first and the new one waits until it has let
go of the session. A detached session past its deadline, or past ``max_buffered``, is
ended; a resume that finds nothing gets a new session and ``resumed: false``.

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
import enum
import hashlib
import heapq
import hmac
import logging
import secrets
from typing import TYPE_CHECKING

import trio

from .protocol import CloseCode, CloseReason, Codec, Resume

if TYPE_CHECKING:
    from .config import Config
    from .connection import Session
    from .gateway import Gateway
    from .metrics import Metrics

__all__ = ["Hub", "ResumeResult"]

logger = logging.getLogger("trio_wsgate.hub")

# Connection ends after which PROTOCOL.md §8 keeps nothing to resume.
_ENDS_SESSION = frozenset(
    {
        CloseReason.BYE,
        CloseReason.KICK,
        CloseReason.UNAUTHORIZED,
        CloseReason.PROTOCOL_ERROR,
        CloseReason.POLICY,
    }
)


class ResumeResult(enum.StrEnum):
    """What became of a ``hello`` with ``resume``: the label of ``wsgate_resumes_total``."""

    RESUMED = "resumed"
    TAKEN_OVER = "taken_over"  # resumed from a connection that still looked open
    UNKNOWN = "unknown"  # never held here, ended, or expired
    EXPIRED = "expired"  # found, but its resume_ttl had run out
    BAD_TOKEN = "bad_token"  # the token is not this session's (forged, or another user's)


class Hub:
    """The sessions of one node.

    Args:
        gateway: the application (its session-end hooks).
        config: the node's settings (``resume_ttl``, ``max_buffered``, ``secret``).
        metrics: the node's metrics.
    """

    def __init__(self, gateway: Gateway, config: Config, metrics: Metrics) -> None:
        self.gateway = gateway
        self.config = config
        self.metrics = metrics
        #: Every session held, attached or detached, by id.
        self.sessions: dict[str, Session] = {}
        self._secret = (config.secret or secrets.token_hex(32)).encode()
        # (deadline, tie-breaker, session): stale entries are skipped when popped.
        self._deadlines: list[tuple[float, int, Session]] = []
        self._counter = 0
        self._ended: list[Session] = []
        self._wake = trio.Event()
        metrics.sessions.set_function(lambda: float(len(self.sessions)))
        metrics.sessions_detached.set_function(
            lambda: float(sum(1 for s in self.sessions.values() if s.connection is None))
        )

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
        from .connection import Session  # the connection module imports this one

        session_id = secrets.token_urlsafe(16)
        session = Session(self, session_id, user, codec, self.config.window)
        session._resume_token = self.resume_token(session_id, user)
        self.sessions[session_id] = session
        self.metrics.sessions_opened.inc()
        return session

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
        if self.ends_session(reason) or not self.config.resume_ttl:
            assert code is not None
            assert reason is not None
            self.end(session, code, reason, why=str(reason))
            return
        session.inbox.detach()
        session.detached_at = trio.current_time()
        if len(session.outbox) > self.config.max_buffered:
            self.end(session, CloseCode.SLOW_CONSUMER, CloseReason.SLOW_CONSUMER, why="overflow")
            return
        deadline = self._deadline(session)
        assert deadline is not None
        self._counter += 1
        heapq.heappush(self._deadlines, (deadline, self._counter, session))
        self._wake.set()

    @staticmethod
    def ends_session(reason: CloseReason | None) -> bool:
        """True if a connection that ended this way ends its session (PROTOCOL.md §8)."""
        return reason in _ENDS_SESSION

    def end(self, session: Session, code: int, reason: CloseReason, *, why: str) -> None:
        """End a session for good: it will not be resumed."""
        if session.ended:
            return
        session.ended = True
        if session.connection is None:
            session.close_code, session.close_reason = code, reason
        self.sessions.pop(session.id, None)
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
            deadline, _, session = heapq.heappop(self._deadlines)
            if not session.ended and self._deadline(session) == deadline:
                self.end(session, CloseCode.GOING_AWAY, CloseReason.DRAIN, why="expired")

    # -- the hub's task ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Expire detached sessions and run session-end hooks, until cancelled."""
        task_status.started()
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
