"""Broker calls under a storm go in batches (trio_wsgate/batching.py)."""

from __future__ import annotations

import pytest
import trio
from trio.testing import MockClock

from trio_wsgate import BrokerUnavailable
from trio_wsgate.batching import Batcher


class Backend:
    """A broker call that takes a second and records what it was asked, and when."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str, list[int]]] = []
        self.fail: set[int] = set()

    async def call(self, key: str, items: list[int]) -> str:
        self.calls.append((trio.current_time(), key, list(items)))
        await trio.sleep(1)
        if self.fail & set(items):
            raise ConnectionError("Redis went away")
        return f"{key}@{trio.current_time():g}"


async def test_requests_made_during_a_call_go_together_in_the_next(
    autojump_clock: MockClock,
) -> None:
    backend = Backend()
    batcher: Batcher[str, int, str] = Batcher(backend.call)
    answers: dict[int, str] = {}

    async def ask(key: str, item: int, at: float) -> None:
        await trio.sleep(at)
        answers[item] = await batcher(nursery, key, item)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, "a", 1, 0)
        for item, at in ((2, 0.2), (3, 0.5), (4, 0.9)):  # while the first call runs
            nursery.start_soon(ask, "a", item, at)
        nursery.start_soon(ask, "b", 5, 0.5)  # another key: its own call, at once
        nursery.start_soon(ask, "a", 6, 2.5)  # after both calls: a new one
    assert backend.calls == [
        (0, "a", [1]),
        (0.5, "b", [5]),
        (1, "a", [2, 3, 4]),  # each call begins after every request in it was made
        (2.5, "a", [6]),
    ]
    assert answers == {1: "a@1", 2: "a@2", 3: "a@2", 4: "a@2", 5: "b@1.5", 6: "a@3.5"}


async def test_a_failed_call_fails_its_batch_only(autojump_clock: MockClock) -> None:
    backend = Backend()
    backend.fail = {2}
    batcher: Batcher[str, int, str] = Batcher(backend.call)
    outcomes: dict[int, str] = {}

    async def ask(item: int, at: float) -> None:
        await trio.sleep(at)
        try:
            outcomes[item] = await batcher(nursery, "a", item)
        except BrokerUnavailable as exc:
            outcomes[item] = f"refused: {exc} ({type(exc.__cause__).__name__})"

    async with trio.open_nursery() as nursery:
        for item, at in ((1, 0), (2, 0.5), (3, 0.5), (4, 2.5)):
            nursery.start_soon(ask, item, at)
    assert outcomes == {
        1: "a@1",
        2: "refused: Redis went away (ConnectionError)",
        3: "refused: Redis went away (ConnectionError)",
        4: "a@3.5",
    }


async def test_a_caller_that_gives_up_leaves_the_call_to_the_others(
    autojump_clock: MockClock,
) -> None:
    backend = Backend()
    batcher: Batcher[str, int, str] = Batcher(backend.call)
    answers: dict[int, str] = {}

    async def ask(item: int, give_up_after: float) -> None:
        with trio.move_on_after(give_up_after):
            answers[item] = await batcher(nursery, "a", item)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, 1, 0.5)  # the one whose request started the call
        nursery.start_soon(ask, 2, 10)
    ((when, _, items),) = backend.calls  # one call, for both
    assert (when, sorted(items)) == (0, [1, 2])
    assert answers == {2: "a@1"}


async def test_callers_are_released_when_the_node_stops(autojump_clock: MockClock) -> None:
    backend = Backend()
    batcher: Batcher[str, int, str] = Batcher(backend.call)
    refused: list[int] = []

    async def ask(item: int, at: float) -> None:
        await trio.sleep(at)
        with pytest.raises(BrokerUnavailable, match="the node is stopping"):
            await batcher(calls, "a", item)
        refused.append(item)

    # calls is the hub's nursery: cancelled as the node stops.
    async with trio.open_nursery() as callers, trio.open_nursery() as calls:
        callers.start_soon(ask, 1, 0)
        callers.start_soon(ask, 2, 0.5)  # waiting for the next call
        await trio.sleep(0.7)
        calls.cancel_scope.cancel()
    assert sorted(refused) == [1, 2]
    assert backend.calls == [(0, "a", [1])]
