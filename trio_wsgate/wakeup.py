"""A wake-up call for one task: what a connection's write loop and dispatcher wait on.

Each of them is the only task that waits on its signal, and waits again as soon as it
has done what it was woken for: several times per request under load, and forever on
an idle connection. A :class:`trio.Event` cannot be cleared, so each wait would make a
new one, with its parking lot; and each sleeping task would keep three frames (the
event's, the parking lot's, trio's). :class:`Wakeup` is reused, allocates nothing per
wait, and parks its task directly with :func:`trio.lowlevel.wait_task_rescheduled`
(docs/benchmarks.md, "Optimisation log").
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import trio

__all__ = ["Wakeup"]


class Wakeup:
    """Set by anyone, waited on by one task at a time; a wait consumes the setting.

    :meth:`set` before :meth:`wait` is not lost: the next wait returns at once (after a
    checkpoint, as :meth:`trio.Event.wait` would). A setting after the wake, before the
    woken task has looked at what it was woken for, is kept in the same way; a task
    that looks at everything once it runs calls :meth:`clear` then, so that the next
    wait does not return at once for nothing.
    """

    __slots__ = ("_is_set", "_waiter")

    def __init__(self) -> None:
        self._is_set = False
        self._waiter: trio.lowlevel.Task | None = None

    def set(self) -> None:
        """Wake the waiting task, or the next one to wait."""
        waiter = self._waiter
        if waiter is None:
            self._is_set = True
        else:
            self._waiter = None
            trio.lowlevel.reschedule(waiter)

    def clear(self) -> None:
        """Forget a setting not yet waited for: its waiter has seen what it was for."""
        self._is_set = False

    def wait(self) -> Awaitable[None]:
        """Return once set (at once if it was), and clear it. Cancellable.

        A plain method that returns what to await, so that a task sleeping here keeps
        no frame of this class (docs/benchmarks.md, "Idle"). The task that calls it
        is the one that waits: ``await wakeup.wait()``, not ``start_soon(wakeup.wait)``.
        """
        if self._is_set:
            self._is_set = False
            return trio.lowlevel.checkpoint()  # noqa: ASYNC105 - awaited by the caller
        if self._waiter is not None:
            raise trio.BusyResourceError("another task is already waiting for this wake-up")
        self._waiter = trio.lowlevel.current_task()
        return trio.lowlevel.wait_task_rescheduled(self._abort)  # noqa: ASYNC105 - as above

    def _abort(self, _: Any) -> trio.lowlevel.Abort:
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED
