"""Limits against abuse: token buckets and connection counts (sans-I/O).

Nothing here reads a clock or does I/O: callers pass ``now`` (``trio.current_time()``
in the server), so every limit is tested on MockClock at exact times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["ConnectionCounts", "TokenBucket"]


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full.

    Args:
        rate: tokens added per second.
        burst: the bucket's size: how many may be taken at once after a quiet spell.
        now: the time the bucket starts (full) at.
    """

    rate: float
    burst: float
    now: float
    tokens: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def _refill(self, now: float) -> None:
        if now > self.now:
            self.tokens = min(self.burst, self.tokens + (now - self.now) * self.rate)
            self.now = now

    def take(self, now: float, count: float = 1) -> bool:
        """Take ``count`` tokens if there are as many; False (nothing taken) if not."""
        self._refill(now)
        if self.tokens >= count:
            self.tokens -= count
            return True
        return False

    def wait(self, now: float, count: float = 1) -> float:
        """Seconds until ``count`` tokens will be there (0 if they are now)."""
        self._refill(now)
        return max(0.0, (count - self.tokens) / self.rate)

    def retry_after(self, now: float) -> str:
        """The ``Retry-After`` header for one token: whole seconds, at least 1."""
        return str(max(1, math.ceil(self.wait(now))))


@dataclass(slots=True)
class ConnectionCounts:
    """The WebSocket connections of a node, in all and by client IP address."""

    total: int = 0
    by_ip: dict[str, int] = field(default_factory=dict)

    def add(self, ip: str) -> None:
        self.total += 1
        self.by_ip[ip] = self.by_ip.get(ip, 0) + 1

    def remove(self, ip: str) -> None:
        self.total -= 1
        left = self.by_ip[ip] - 1
        if left:
            self.by_ip[ip] = left
        else:
            del self.by_ip[ip]  # no entry per address ever seen: bounded memory

    def of(self, ip: str) -> int:
        return self.by_ip.get(ip, 0)
