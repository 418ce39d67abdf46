"""The one-task wake-up call of the write loop, the dispatcher and the timers."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from trio_wsgate.wakeup import Wakeup


async def test_a_setting_before_the_wait_is_kept_and_consumed(autojump_clock: MockClock) -> None:
    wakeup = Wakeup()
    wakeup.set()
    wakeup.set()  # twice before a wait: one wake
    with trio.testing.assert_checkpoints():
        await wakeup.wait()
    with trio.move_on_after(1) as scope:
        await wakeup.wait()
    assert scope.cancelled_caught  # consumed: the second wait waits


async def test_a_waiting_task_is_woken_at_the_time_of_the_setting(
    autojump_clock: MockClock,
) -> None:
    wakeup, woken, start = Wakeup(), [], trio.current_time()

    async def waiter() -> None:
        for _ in range(2):
            await wakeup.wait()
            wakeup.clear()  # it has looked at what it was woken for
            woken.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(3)
        wakeup.set()
        wakeup.set()  # before the waiter runs: part of the same wake, once cleared
        await trio.sleep(2)
        assert woken == [3]
        wakeup.set()
    assert woken == [3, 5]


async def test_a_setting_after_the_wake_is_not_lost(autojump_clock: MockClock) -> None:
    wakeup, woken, start = Wakeup(), [], trio.current_time()

    async def waiter() -> None:
        for _ in range(2):
            await wakeup.wait()
            woken.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(3)
        wakeup.set()
        wakeup.set()  # the waiter has not run yet, and does not clear: a second wake
    assert woken == [3, 3]


async def test_a_cancelled_wait_lets_the_next_one_wait(autojump_clock: MockClock) -> None:
    wakeup, start = Wakeup(), trio.current_time()
    with trio.move_on_after(1):
        await wakeup.wait()
    assert trio.current_time() - start == 1
    wakeup.set()
    await wakeup.wait()  # not refused as busy: the cancelled waiter is gone
    assert trio.current_time() - start == 1


async def test_only_one_task_may_wait() -> None:
    wakeup = Wakeup()

    async def waiter() -> None:
        await wakeup.wait()  # called by the task that awaits it (Wakeup.wait)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await wakeup.wait()
        wakeup.set()


async def test_a_cleared_setting_does_not_wake_the_next_wait(autojump_clock: MockClock) -> None:
    wakeup = Wakeup()
    wakeup.set()
    wakeup.clear()
    with trio.move_on_after(1) as scope:
        await wakeup.wait()
    assert scope.cancelled_caught
