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
    keeping them: one object per connection, kept small.

    Args:
        connection: the connection it keeps alive.
    """

    __slots__ = ("_connection", "_liveness_timer", "_ping_timer", "_pings", "last_seen")

    def __init__(self, connection: Beating) -> None:
        self._connection = connection
        self._ping_timer: Timer | None = None
        self._liveness_timer: Timer | None = None
        self._pings: list[tuple[int, float]] = []  # (ts, sent at), the 4 newest
        #: trio time of the last frame received (the reader sets it).
        self.last_seen = 0.0

    def start(self) -> None:
        """Liveness from the start; pings only once the session is open."""
        interval = self._interval()
        now = trio.current_time()
        self.last_seen = now
        self._liveness_timer = self._connection.timers.call_at(
            self._late(now + interval + self._connection.config.heartbeat_timeout),
            self._check_liveness,
        )

    def start_pings(self) -> None:
        """Pings belong to a session: the first goes an interval after ``welcome``."""
        if not self._connection.closing:
            when = self._early(trio.current_time() + self._interval())
            self._ping_timer = self._connection.timers.call_at(when, self._ping)

    def stop(self) -> None:
        """No more pings or checks (the connection is closing)."""
        timers = self._connection.timers
        timers.cancel(self._ping_timer)
        timers.cancel(self._liveness_timer)
        self._ping_timer = self._liveness_timer = None

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

    def _slack(self) -> float:
        return min(self._connection.config.heartbeat_slack, self._interval() / 10)

    def _early(self, when: float) -> float:
        slack = self._slack()
        return math.floor(when / slack) * slack if slack else when

    def _late(self, when: float) -> float:
        slack = self._slack()
        # max(): the float product may fall a hair short of ``when``.
        return max(math.ceil(when / slack) * slack, when) if slack else when

    def _ping(self) -> None:
        """Due every heartbeat interval: queue a ping."""
        try:
            now = trio.current_time()
            ts = round(now * 1000)
            self._pings.append((ts, now))
            if len(self._pings) > 4:  # unanswered pings are forgotten
                del self._pings[0]
            self._ping_timer = self._connection.timers.call_at(
                self._early(now + self._interval()), self._ping
            )
            self._connection.send_control(Ping(ts))
            self._connection.heartbeat_passed()
        except Exception:
            self._connection.crashed()

    def _check_liveness(self) -> None:
        """Due when nothing may have come for interval + timeout: close, or look again
        at the deadline the last frame set."""
        connection = self._connection
        if connection.backlogged:
            self.last_seen = trio.current_time()  # not silent: not read
        deadline = self.last_seen + self._interval() + self._connection.config.heartbeat_timeout
        if trio.current_time() >= deadline:
            self._liveness_timer = None
            connection.close(
                CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout", CloseReason.HEARTBEAT_TIMEOUT
            )
        else:
            self._liveness_timer = self._connection.timers.call_at(
                self._late(deadline), self._check_liveness
            )
