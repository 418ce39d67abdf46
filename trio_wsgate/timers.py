"""One task runs the node's timers (docs/architecture.md, "The shape"; docs/benchmarks.md, "Idle").

Every connection has a heartbeat (a ping every interval, and a liveness deadline that
each received frame moves forward), an ack delay, and with JWTs its token's expiry. As
tasks, that is three sleeping tasks and a cancel scope per connection, and a deadline
moved in trio's heap on every read. Here they are entries in one heap, run by one task:
a connection costs a few small objects, a read only records the time, and an idle node
wakes once per due timer instead of once per task.

Callbacks run in the timers' task, so they must be quick and must not block: they
decide (queue a ping, begin a close) and return. An exception in one is logged and
does not stop the others.

The same task also runs what is asked for "soon" (:meth:`Timers.call_soon`): the
writes of every connection that has something to send, so that a publication to a
thousand subscribers, or a heartbeat due on as many connections, is written in one
pass of one task rather than by a thousand tasks woken one after the other
(docs/architecture.md, "One writer").
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections.abc import Callable

import trio

from .wakeup import Wakeup

__all__ = ["Timer", "Timers"]

logger = logging.getLogger("trio_wsgate.timers")


class Timer:
    """A pending call, from :meth:`Timers.call_at`."""

    __slots__ = ("callback", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback: Callable[[], None] | None = callback


class Timers:
    """A heap of timers and the task that calls them when due (:meth:`run`)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()  # equal times run in the order they were set
        self._next = math.inf
        self._wake = Wakeup()
        self._cancelled = 0  # entries in the heap that will not be called
        self._soon: list[Callable[[], None]] = []

    def __len__(self) -> int:
        """Timers pending (cancelled ones included until they are swept out)."""
        return len(self._heap)

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Call ``callback()`` at trio time ``when`` (at once if it is past)."""
        timer = Timer(when, callback)
        heapq.heappush(self._heap, (when, next(self._order), timer))
        if when < self._next:
            self._wake.set()
        return timer

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` in the timers' next pass, after those due then."""
        self._soon.append(callback)
        if self._next != -math.inf:  # not in a pass, which would see it
            self._wake.set()

    def cancel(self, timer: Timer | None) -> None:
        """Do not call ``timer`` (None, or one already called or cancelled: nothing).

        What its callback refers to is let go at once; once cancelled entries are
        half the heap, they are swept out, so that a node with many short connections
        does not keep an entry per closed connection until it would have been due.
        """
        if timer is None or timer.callback is None:
            return
        timer.callback = None
        self._cancelled += 1
        heap = self._heap
        if self._cancelled > 64 and 2 * self._cancelled > len(heap):
            heap[:] = [entry for entry in heap if entry[2].callback is not None]
            heapq.heapify(heap)
            self._cancelled = 0

    def _call_soon_ones(self) -> None:
        """Call what was asked for soon (since the last pass, and by these calls)."""
        while self._soon:
            soon, self._soon = self._soon, []
            for callback in soon:
                try:
                    callback()
                except Exception:
                    logger.exception("a timer's callback failed")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Call each timer when it is due, until cancelled."""
        heap = self._heap
        task_status.started()
        try:
            await self._run(heap)
        finally:
            # What was asked for soon will not be called: let go of what it refers to
            # (a connection's own timers would otherwise keep it in a cycle).
            self._soon.clear()

    async def _run(self, heap: list[tuple[float, int, Timer]]) -> None:
        # One cancel scope per due time reached, not per wait: most wakes are for
        # what was asked for soon (a connection's writes, per request under load),
        # and entering and leaving a cancel scope cost more than the rest of a pass.
        # The scope's deadline follows the earliest timer; reaching it ends the scope,
        # and the next pass runs what is due.
        while True:
            with trio.CancelScope() as scope:
                while True:
                    self._pass(heap)
                    if scope.deadline != self._next:
                        scope.deadline = self._next
                    await self._wake.wait()

    def _pass(self, heap: list[tuple[float, int, Timer]]) -> None:
        # Timers set by the callbacks below are seen by this pass or by the next
        # computation of _next: they need no wake-up.
        self._next = -math.inf
        now = trio.current_time()
        while heap and heap[0][0] <= now:
            timer = heapq.heappop(heap)[2]
            callback, timer.callback = timer.callback, None
            if callback is None:
                self._cancelled -= 1
            else:
                try:
                    callback()
                except Exception:
                    logger.exception("a timer's callback failed")
        if self._soon:
            self._call_soon_ones()
        self._next = heap[0][0] if heap else math.inf
