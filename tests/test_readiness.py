"""The node's readiness watcher: one task and one epoll set wake the readers of many
sockets (trio_wsgate/readiness.py)."""

from __future__ import annotations

import logging
import select

import pytest
import trio

from trio_wsgate import readiness

pytestmark = pytest.mark.skipif(not hasattr(select, "epoll"), reason="epoll is Linux's")


def _waiting() -> int:
    """How many readers the watcher of this run is to wake."""
    watcher = readiness._WATCHER.get()
    return 0 if watcher is None else len(watcher._waiting)


async def test_each_reader_is_woken_when_its_socket_has_data_and_only_then() -> None:
    pairs = [trio.socket.socketpair() for _ in range(20)]
    woken: list[int] = []
    three = trio.Event()

    async def reader(index: int) -> None:
        await readiness.wait_readable(pairs[index][0])
        woken.append(index)
        if len(woken) == 3:
            three.set()
        assert await pairs[index][0].recv(10) == b"x"

    try:
        async with trio.open_nursery() as nursery:
            for index in range(len(pairs)):
                nursery.start_soon(reader, index)
            await trio.testing.wait_all_tasks_blocked()
            assert _waiting() == 20
            for index in (3, 11, 17):
                await pairs[index][1].send(b"x")
            with trio.fail_after(5):
                await three.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(woken) == [3, 11, 17]
            assert _waiting() == 17
            for index in range(len(pairs)):
                if index not in (3, 11, 17):
                    await pairs[index][1].send(b"x")
        assert sorted(woken) == list(range(20))
        assert _waiting() == 0
    finally:
        for a, b in pairs:
            a.close()
            b.close()


async def test_a_socket_that_has_data_already_wakes_its_reader_at_once() -> None:
    a, b = trio.socket.socketpair()
    with a, b:
        await b.send(b"early")
        with trio.fail_after(5):
            await readiness.wait_readable(a)
        assert await a.recv(10) == b"early"
        # Waited on again while still holding data (nothing read): level, not edge.
        await b.send(b"more")
        with trio.fail_after(5):
            await readiness.wait_readable(a)
            await readiness.wait_readable(a)


async def test_a_cancelled_wait_leaves_nothing_behind_and_the_next_wait_works() -> None:
    a, b = trio.socket.socketpair()
    cancelled = []

    async def reader() -> None:
        try:
            await readiness.wait_readable(a)
        except trio.Cancelled:
            cancelled.append(True)
            raise

    with a, b:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert _waiting() == 1
            nursery.cancel_scope.cancel()
        assert cancelled == [True]
        assert _waiting() == 0
        await b.send(b"x")  # fires the registration left armed: nobody is woken for it
        await trio.testing.wait_all_tasks_blocked()  # the watcher has seen it
        assert _waiting() == 0
        with trio.fail_after(5):
            await readiness.wait_readable(a)  # re-armed: the data is still there
        assert await a.recv(10) == b"x"


async def test_notify_closing_wakes_the_reader_with_closed_resource_error() -> None:
    a, b = trio.socket.socketpair()
    failed: list[BaseException] = []

    async def reader() -> None:
        try:
            await readiness.wait_readable(a)
        except trio.ClosedResourceError as exc:
            failed.append(exc)

    with b:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            readiness.notify_closing(a)
            a.close()
        assert len(failed) == 1
        assert _waiting() == 0
        with pytest.raises(trio.ClosedResourceError):
            await readiness.wait_readable(a)  # closed: fileno() is -1


async def test_a_socket_closed_under_its_reader_wakes_it_when_its_number_is_reused() -> None:
    # Closed without notify_closing, the reader cannot know; the next socket with that
    # descriptor number tells: the old reader gets ClosedResourceError, the new one
    # waits for its own data.
    a, b = trio.socket.socketpair()
    failed: list[BaseException] = []
    got: list[bytes] = []
    done = trio.Event()

    async def old_reader() -> None:
        try:
            await readiness.wait_readable(a)
        except trio.ClosedResourceError as exc:
            failed.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(old_reader)
        await trio.testing.wait_all_tasks_blocked()
        number = a.fileno()
        a.close()
        b.close()
        c, d = trio.socket.socketpair()
        with c, d:
            assert number in (c.fileno(), d.fileno())  # the lowest free number
            reused = c if c.fileno() == number else d
            other = d if reused is c else c

            async def new_reader() -> None:
                await readiness.wait_readable(reused)
                got.append(await reused.recv(10))
                done.set()

            nursery.start_soon(new_reader)
            await trio.testing.wait_all_tasks_blocked()
            assert len(failed) == 1
            await other.send(b"new")
            with trio.fail_after(5):
                await done.wait()
    assert got == [b"new"]


async def test_a_failed_watcher_wakes_its_readers_and_trio_waits_after_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def __init__(self) -> None:
            self.epoll = select.epoll()

        def __getattr__(self, name: str) -> object:
            return getattr(self.epoll, name)

        def poll(self, *_: object) -> list[tuple[int, int]]:
            raise OSError("broken")

    monkeypatch.setattr(readiness, "_EPOLL", Broken)
    a, b = trio.socket.socketpair()
    with a, b:
        woken = []

        async def reader() -> None:
            await readiness.wait_readable(a)
            woken.append(trio.current_time())

        with caplog.at_level(logging.ERROR, logger="trio_wsgate.readiness"):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                await b.send(b"x")  # the watcher wakes, fails, and wakes its reader
        assert len(woken) == 1
        watcher = readiness._WATCHER.get()
        assert watcher is not None
        assert watcher.failed
        assert "the readiness watcher failed" in caplog.text
        # Later waits go through trio, and still work.
        assert await a.recv(10) == b"x"
        await b.send(b"y")
        with trio.fail_after(5):
            await readiness.wait_readable(a)
        assert await a.recv(10) == b"y"


async def test_a_second_reader_of_the_same_socket_is_refused() -> None:
    a, b = trio.socket.socketpair()

    async def reader() -> None:
        await readiness.wait_readable(a)

    with a, b:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await readiness.wait_readable(a)
            await b.send(b"x")  # the first reader is still woken


async def test_without_a_system_task_the_waits_are_trios(monkeypatch: pytest.MonkeyPatch) -> None:
    # A watcher that could not be started (the run is ending) must not park readers
    # that nothing would wake.
    def refuse(*_: object, **__: object) -> None:
        raise RuntimeError("the system nursery is closed")

    monkeypatch.setattr(trio.lowlevel, "spawn_system_task", refuse)
    a, b = trio.socket.socketpair()
    with a, b:
        await b.send(b"x")
        with trio.fail_after(5):
            await readiness.wait_readable(a)
        assert _waiting() == 0
