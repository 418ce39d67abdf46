"""The node's timers: one task calls every connection's heartbeat and ack delay."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from trio_wsgate.timers import Timers

Recorder = Callable[[str], None]


@asynccontextmanager
async def _running() -> AsyncIterator[tuple[Timers, list[tuple[str, float]], Recorder]]:
    """A running Timers, the calls recorded (name and time), and the recorder."""
    timers = Timers()
    called: list[tuple[str, float]] = []

    def record(name: str) -> None:
        called.append((name, trio.current_time()))

    async with trio.open_nursery() as nursery:
        await nursery.start(timers.run)
        yield timers, called, record
        nursery.cancel_scope.cancel()


async def test_timers_are_called_at_their_time_in_order(autojump_clock: MockClock) -> None:
    async with _running() as (timers, called, record):
        start = trio.current_time()
        timers.call_at(start + 5, lambda: record("b"))
        timers.call_at(start + 2, lambda: record("a"))
        timers.call_at(start + 5, lambda: record("c"))  # same time: in the order set
        # One set while the task sleeps towards a later one wakes it sooner.
        await trio.sleep(1)
        timers.call_at(start + 1.5, lambda: record("first"))
        await trio.sleep(10)
        assert called == [
            ("first", start + 1.5),
            ("a", start + 2),
            ("b", start + 5),
            ("c", start + 5),
        ]


async def test_what_is_asked_for_soon_runs_at_once_and_leaves_the_timers_on_time(
    autojump_clock: MockClock,
) -> None:
    # Most passes are for what is asked for soon (a connection's writes): they run in
    # the next pass, at the time they were asked for, and the timers stay on time.
    async with _running() as (timers, called, record):
        start = trio.current_time()
        timers.call_at(start + 3, lambda: record("timer"))
        for step in range(5):
            await trio.sleep(1)
            timers.call_soon(lambda step=step: record(f"soon {step}"))  # type: ignore[misc]
            if step == 1:
                timers.call_at(start + 2.5, lambda: record("earlier"))
        await trio.sleep(1)
        assert called == [
            ("soon 0", start + 1),
            ("soon 1", start + 2),
            ("earlier", start + 2.5),
            ("timer", start + 3),
            ("soon 2", start + 3),
            ("soon 3", start + 4),
            ("soon 4", start + 5),
        ]


async def test_a_callback_may_set_the_next_timer(autojump_clock: MockClock) -> None:
    timers = Timers()
    ticks: list[float] = []

    def tick() -> None:
        ticks.append(trio.current_time())
        if len(ticks) < 3:
            timers.call_at(trio.current_time() + 25, tick)

    async with trio.open_nursery() as nursery:
        await nursery.start(timers.run)
        start = trio.current_time()
        timers.call_at(start + 25, tick)
        await trio.sleep(100)
        assert ticks == [start + 25, start + 50, start + 75]
        assert len(timers) == 0
        nursery.cancel_scope.cancel()


async def test_cancelled_timers_are_not_called_and_are_swept_out(
    autojump_clock: MockClock,
) -> None:
    timers = Timers()
    called: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(timers.run)
        now = trio.current_time()
        kept = [timers.call_at(now + 10, lambda i=i: called.append(i)) for i in range(50)]
        dropped = [timers.call_at(now + 10, lambda: called.append(-1)) for _ in range(200)]
        for timer in dropped[:60]:
            timers.cancel(timer)
        assert len(timers) == 250  # below the sweep threshold: still in the heap
        for timer in dropped[60:]:
            timers.cancel(timer)
        assert len(timers) < 250  # more than half cancelled: swept
        timers.cancel(None)
        timers.cancel(dropped[0])  # twice: nothing
        await trio.sleep(20)
        assert called == list(range(50))
        timers.cancel(kept[0])  # already called: nothing
        assert len(timers) == 0
        nursery.cancel_scope.cancel()


async def test_a_failing_callback_is_logged_and_the_others_still_run(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    timers = Timers()
    called: list[str] = []

    def broken() -> None:
        raise RuntimeError("broken")

    async with trio.open_nursery() as nursery:
        await nursery.start(timers.run)
        now = trio.current_time()
        timers.call_at(now + 1, broken)
        timers.call_at(now + 1, lambda: called.append("after"))
        with caplog.at_level(logging.ERROR, logger="trio_wsgate.timers"):
            await trio.sleep(2)
        assert called == ["after"]
        assert "a timer's callback failed" in caplog.text
        nursery.cancel_scope.cancel()
