"""Which handlers run in the reader's step (dispatch.never_waits): a coroutine function
whose own code cannot yield to trio, and nothing else."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import trio

from trio_wsgate.dispatch import never_waits


async def plain(session: Any, data: Any) -> Any:
    return {"echo": data, "doubled": [d * 2 for d in data]}


async def raises(session: Any, data: Any) -> Any:
    raise ValueError(data)


async def awaits(session: Any, data: Any) -> Any:
    await trio.lowlevel.checkpoint()
    return data


async def awaits_on_one_branch(session: Any, data: Any) -> Any:
    if data:
        return data
    await trio.sleep(1)
    return None


async def iterates(session: Any, data: Any) -> Any:
    async for item in data:
        return item
    return None


async def enters(session: Any, data: Any) -> Any:
    async with data:
        return None


async def comprehends(session: Any, data: Any) -> Any:
    return [item async for item in data]


async def defines_one_that_awaits(session: Any, data: Any) -> Any:
    async def inner() -> None:
        await trio.sleep(1)

    return inner  # made, not awaited: this one never waits


def not_a_coroutine_function(session: Any, data: Any) -> Any:
    return data


def generator(session: Any, data: Any) -> Any:
    yield data


class Handlers:
    async def method(self, session: Any, data: Any) -> Any:
        return data

    async def waiting_method(self, session: Any, data: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return data

    async def __call__(self, session: Any, data: Any) -> Any:
        return data


def test_a_coroutine_function_without_await_never_waits() -> None:
    assert never_waits(plain)
    assert never_waits(raises)
    assert never_waits(defines_one_that_awaits)
    assert never_waits(Handlers().method)
    assert never_waits(_made())  # a closure, made at run time


def _made() -> Any:
    async def handler(session: Any, data: Any) -> Any:
        return data

    return handler


def test_await_async_for_and_async_with_wait() -> None:
    for handler in (awaits, awaits_on_one_branch, iterates, enters, comprehends):
        assert not never_waits(handler), handler.__name__
    assert not never_waits(Handlers().waiting_method)


def test_what_is_not_a_coroutine_function_is_taken_to_wait() -> None:
    # Whatever it returns is awaited by the dispatcher as before.
    assert not never_waits(not_a_coroutine_function)
    assert not never_waits(generator)
    assert not never_waits(functools.partial(plain, None))
    assert not never_waits(Handlers())  # an object with an async __call__
    assert not never_waits(print)


def test_a_coroutine_that_never_waits_ends_at_its_first_step() -> None:
    # What never_waits promises, on the very coroutine the reader runs.
    with pytest.raises(StopIteration) as done:
        plain(None, [1, 2]).send(None)
    assert done.value.value == {"echo": [1, 2], "doubled": [2, 4]}
