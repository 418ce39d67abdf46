"""A connection's heartbeat (docs/protocol.md §7): a ``ping`` every interval once the
session is open, the round trip of each one measured, and a close with 4002 when
nothing came from the peer for interval + timeout.

Both are entries in the node's timers (:mod:`trio_wsgate.timers`), not tasks. They keep
to the slack's grid (``Config.heartbeat_slack``): every connection's ping due in the
same step goes out in one pass of the timers, and so do the liveness checks. A ping is
never late and a close is never early, so the client's own interval + timeout always
holds.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol

import trio

from .protocol import CloseCode, CloseReason, Envelope, Ping
from .timers import Timer, Timers

if TYPE_CHECKING:
    from .config import Config
    from .metrics import Metrics

__all__ = ["Beating", "Heartbeat"]


class Beating(Protocol):
    """What the heartbeat needs of its connection."""

    @property
    def config(self) -> Config:
        """The node's settings (``heartbeat_interval`` is set)."""
        ...

    @property
    def timers(self) -> Timers:
        """The timers the heartbeat runs on (the node's, or the connection's own)."""
        ...

    @property
    def metrics(self) -> Metrics:
        """Where the round trips go (``wsgate_heartbeat_rtt_seconds``)."""
        ...

    @property
    def closing(self) -> bool:
        """True from the decision to close on."""
        ...

    @property
    def backlogged(self) -> bool:
        """True while the reader has stopped reading (the peer is not silent then)."""
        ...

    def send_control(self, envelope: Envelope) -> None:
        """Queue a control envelope (the ping)."""
        ...

    def close(self, code: int, reason: str = "", label: CloseReason | None = None) -> None:
        """Decide to close; return at once."""
        ...

    def crashed(self) -> None:
        """An unexpected error: log it and close with 1011."""
        ...

    def heartbeat_passed(self) -> None:
        """An interval has passed (at each ping): what idles that long may let go."""
        ...


class Heartbeat:
    """The pings and the liveness deadline of one connection.

    It asks its connection for the settings, the timers and the metrics rather than
    keeping them: one object per connection, kept small. Pings and liveness checks
    share one entry in the timers, due at whichever comes first: an idle connection
    keeps one entry, not two.

    Args:
        connection: the connection it keeps alive.
    """

    __slots__ = ("_connection", "_next_ping", "_pings", "_timer", "last_seen")

    def __init__(self, connection: Beating) -> None:
        self._connection = connection
        self._timer: Timer | None = None
        self._next_ping = math.inf  # no pings before the session is open
        self._pings: list[tuple[int, float]] = []  # (ts, sent at), the 4 newest
        #: trio time of the last frame received (the reader sets it).
        self.last_seen = 0.0

    def start(self) -> None:
        """Liveness from the start; pings only once the session is open.

        The timer is first due an interval from now, no later than the first ping can
        be: set then, the pings need no entry of their own, and no cancelled one stays
        in the heap until its time (it looks at liveness, and waits for what is next).
        """
        now = self.last_seen = trio.current_time()
        self._timer = self._connection.timers.call_at(
            self._early(now + self._interval()), self._due
        )

    def start_pings(self) -> None:
        """Pings belong to a session: the first goes an interval after ``welcome``."""
        if not self._connection.closing:
            self._next_ping = self._early(trio.current_time() + self._interval())
            if self._timer is None or self._timer.when > self._next_ping:
                self._arm()

    def stop(self) -> None:
        """No more pings or checks (the connection is closing)."""
        self._connection.timers.cancel(self._timer)
        self._timer = None
        self._next_ping = math.inf

    def pong(self, ts: Any) -> None:
        """The peer answered the ping ``ts``: measure its round trip."""
        if isinstance(ts, int):
            for index, (pinged, sent) in enumerate(self._pings):
                if pinged == ts:
                    del self._pings[index]
                    self._connection.metrics.heartbeat_rtt.observe(trio.current_time() - sent)
                    return

    def _interval(self) -> float:
        interval = self._connection.config.heartbeat_interval
        assert interval is not None
        return interval

    def _deadline(self) -> float:
        """When the peer's silence is too long, from the last frame it sent."""
        return self.last_seen + self._interval() + self._connection.config.heartbeat_timeout

    def _slack(self) -> float:
        return min(self._connection.config.heartbeat_slack, self._interval() / 10)

    def _early(self, when: float) -> float:
        slack = self._slack()
        return math.floor(when / slack) * slack if slack else when

    def _late(self, when: float) -> float:
        slack = self._slack()
        # max(): the float product may fall a hair short of ``when``.
        return max(math.ceil(when / slack) * slack, when) if slack else when

    def _arm(self) -> None:
        """One timer, at the next ping or the next liveness check, whichever is first."""
        timers = self._connection.timers
        timers.cancel(self._timer)
        when = min(self._next_ping, self._late(self._deadline()))
        self._timer = timers.call_at(when, self._due)

    def _due(self) -> None:
        """Due at a ping or a liveness check: close if nothing came for interval +
        timeout (looking again at the deadline the last frame set), queue a ping if
        one is due, and set the timer again."""
        connection = self._connection
        self._timer = None
        try:
            now = trio.current_time()
            if connection.backlogged:
                self.last_seen = now  # not silent: not read
            if now >= self._deadline():
                connection.close(
                    CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout", CloseReason.HEARTBEAT_TIMEOUT
                )
                return
            if now >= self._next_ping:
                self._ping(now)
            if not connection.closing and self._timer is None:
                self._arm()
        except Exception:
            connection.crashed()

    def _ping(self, now: float) -> None:
        """Queue a ping; the next is due an interval later."""
        ts = round(now * 1000)
        self._pings.append((ts, now))
        if len(self._pings) > 4:  # unanswered pings are forgotten
            del self._pings[0]
        self._next_ping = self._early(now + self._interval())
        self._connection.send_control(Ping(ts))
        self._connection.heartbeat_passed()
