"""Waiting for a quiet socket to become readable, one task for all of them.

An idle connection's reader spends its life waiting for readability, a pong a
heartbeat. :func:`trio.lowlevel.wait_readable` keeps, per waiting socket, four frames
(the generated wrapper, the I/O manager's two, trio's park), an abort closure with its
cells and an entry in the I/O manager's registrations: about 1.3 KiB per idle
connection, more than the rest of its reader (docs/benchmarks.md, "Idle").

Here the quiet sockets are registered in an epoll set of the node's own, which one
system task waits on through trio (an epoll descriptor is readable while one of its
sockets is); that task wakes each reader whose socket is ready. A reader parks with
:func:`trio.lowlevel.wait_task_rescheduled` directly: one frame, and an entry in a
dict. Registration is one-shot, re-armed at each wait, as trio's own is. The watcher
is one more task step between readability and the read, so a busy connection's reader
waits through trio instead (``Transport.wait_readable``). Where there is no epoll (not
Linux), or the watcher has failed, :func:`wait_readable` is trio's.

trio wakes a task waiting through it when trio closes its socket; the watcher hears
of a close only through :func:`notify_closing`. Closing a socket whose reader waits
here any other way leaves that reader parked until the descriptor's number is used
again, so a socket waits here only if whoever can close it says so first: the node
does this for the sockets of its own listeners, not for streams handed to it.
"""

from __future__ import annotations

import logging
import select
from collections.abc import Awaitable
from typing import Any

import outcome
import trio

__all__ = ["notify_closing", "start", "wait_readable"]

logger = logging.getLogger(__name__)

_EPOLL = getattr(select, "epoll", None)
_ONE_SHOT = getattr(select, "EPOLLIN", 0) | getattr(select, "EPOLLONESHOT", 0)


class _Wait:
    """One reader's wait: what the watcher wakes, and the abort trio calls to cancel it
    (the object itself, so that a wait allocates nothing else)."""

    __slots__ = ("fd", "sock", "task", "waiting")

    def __init__(self, sock: trio.socket.SocketType, fd: int, waiting: dict[int, _Wait]) -> None:
        self.sock = sock
        self.fd = fd
        self.task = trio.lowlevel.current_task()
        self.waiting = waiting

    def __call__(self, _: Any) -> trio.lowlevel.Abort:
        # Left armed: an event for a descriptor nobody waits on is dropped.
        if self.waiting.get(self.fd) is self:
            del self.waiting[self.fd]
        return trio.lowlevel.Abort.SUCCEEDED


class _Watcher:
    """The node's quiet sockets, and the system task that wakes their readers."""

    __slots__ = ("_epoll", "_waiting", "failed")

    def __init__(self) -> None:
        assert _EPOLL is not None
        self._epoll = _EPOLL()
        # Descriptor -> the wait of the reader it is to wake.
        self._waiting: dict[int, _Wait] = {}
        self.failed = False

    def wait(self, sock: trio.socket.SocketType, fd: int) -> Awaitable[None]:
        waiting = self._waiting
        previous = waiting.get(fd)
        if previous is not None:
            if previous.sock is sock:
                raise trio.BusyResourceError("another task is already reading this socket")
            # Its socket was closed under it and the number given to another: it will
            # never be ready (trio's own wait would have been woken the same way).
            self.closing(fd)
        epoll = self._epoll
        try:
            try:
                epoll.modify(fd, _ONE_SHOT)
            except FileNotFoundError:  # the first wait on this socket
                epoll.register(fd, _ONE_SHOT)
        except OSError:  # not a descriptor epoll takes: trio's wait says what is wrong
            return trio.lowlevel.wait_readable(sock)  # noqa: ASYNC105 - awaited by the caller
        waiting[fd] = wait = _Wait(sock, fd, waiting)
        return trio.lowlevel.wait_task_rescheduled(wait)  # noqa: ASYNC105 - as above

    def closing(self, fd: int) -> None:
        """``fd`` is about to be closed: its waiter, if any, gets ClosedResourceError."""
        wait = self._waiting.pop(fd, None)
        if wait is not None:
            error = trio.ClosedResourceError("another task closed this socket")
            trio.lowlevel.reschedule(wait.task, outcome.Error(error))

    async def run(self) -> None:
        """Wake the readers of every ready socket, for the life of the run."""
        epoll, waiting = self._epoll, self._waiting
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _ in epoll.poll(0):
                    wait = waiting.pop(fd, None)
                    if wait is not None:
                        trio.lowlevel.reschedule(wait.task)
        except trio.Cancelled:
            raise  # the run is ending: every reader has ended before
        except Exception:  # a system task must not fail: trio would end the run
            logger.exception("the readiness watcher failed; readers wait through trio")
        finally:
            self.failed = True
            # Whoever still waits is woken: its read finds nothing and waits again,
            # through trio.
            for wait in waiting.values():
                trio.lowlevel.reschedule(wait.task)
            waiting.clear()
            self.close()

    def close(self) -> None:
        self._epoll.close()


class _NoWatcher:
    """What a run has where no watcher could be made: every wait is trio's."""


_WATCHER: trio.lowlevel.RunVar[_Watcher | _NoWatcher | None] = trio.lowlevel.RunVar(
    "trio_wsgate_readiness", default=None
)


def start() -> None:
    """Start this run's watcher now rather than at the first wait (a node does, so that
    its task count does not move at its first connection). Idempotent."""
    _running()


def _running() -> _Watcher | None:
    """This run's watcher, started if need be; None where trio's wait is to be used."""
    watcher = _WATCHER.get()
    if watcher is None:
        if _EPOLL is None:
            return None
        try:
            watcher = _Watcher()
        except OSError:  # out of descriptors, say: trio's wait, for the rest of the run
            logger.warning("no epoll set for the readiness watcher; readers wait through trio")
            _WATCHER.set(_NoWatcher())
            return None
        try:
            trio.lowlevel.spawn_system_task(watcher.run, name="trio_wsgate.readiness")
        except RuntimeError:  # the run is ending: nothing would wake its readers
            watcher.failed = True
            watcher.close()
        _WATCHER.set(watcher)
    if isinstance(watcher, _NoWatcher) or watcher.failed:
        return None
    return watcher


def wait_readable(sock: trio.socket.SocketType) -> Awaitable[None]:
    """Return once ``sock`` may be readable (a spurious wake is possible: the read
    that follows must take "nothing yet" in its stride). Cancellable.

    A plain function that returns what to await: the waiting task keeps no frame of
    this module.
    """
    watcher = _running()
    if watcher is None:
        return trio.lowlevel.wait_readable(sock)  # noqa: ASYNC105 - awaited by the caller
    fd = sock.fileno()
    if fd == -1:
        raise trio.ClosedResourceError("socket was already closed")
    return watcher.wait(sock, fd)


def notify_closing(sock: trio.socket.SocketType) -> None:
    """``sock`` is about to be closed: a task waiting for it through
    :func:`wait_readable` gets :exc:`trio.ClosedResourceError`, as one waiting through
    trio does when trio closes the socket (:func:`trio.lowlevel.notify_closing`)."""
    fd = sock.fileno()
    if fd == -1:
        return
    watcher = _WATCHER.get()
    if isinstance(watcher, _Watcher):
        watcher.closing(fd)
