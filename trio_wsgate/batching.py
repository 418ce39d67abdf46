"""Broker calls made while an equal one is under way go together, as the next call.

A reconnect storm sends thousands of sessions to a node within seconds, and each one
asks the broker for the same things: to record that this node holds it, and where each
topic it follows stands. One Redis round trip each is thousands of commands waiting on
a node that is busy with the storm already. :class:`Batcher` lets one call per key be
under way at a time; everything asked for meanwhile waits and goes in the next call.

The next call starts only after every request in it was made, so each request is
answered by a call that began after it: what a call reads is never older than the
moment the request was made (a subscription's position: docs/flows.md, "Recovery of a
topic without gap or duplicate").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import trio

from .exceptions import BrokerUnavailable

__all__ = ["Batcher"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")


class _Batch(Generic[T, R]):
    __slots__ = ("done", "error", "items", "result")

    def __init__(self) -> None:
        self.items: list[T] = []
        self.done = trio.Event()
        self.result: R | None = None
        self.error: BaseException | None = None


class Batcher(Generic[K, T, R]):
    """At most one ``call(key, items)`` under way per key; requests made meanwhile wait
    and are the items of the next call, made as soon as the current one returns.

    The calls run in a task of ``nursery`` (not the caller's: a caller that gives up
    does not take the others' call with it). An exception of the call is raised to
    every caller of that batch as :class:`BrokerUnavailable` (chained to it).
    """

    def __init__(self, call: Callable[[K, list[T]], Awaitable[R]]) -> None:
        self._call = call
        self._next: dict[K, _Batch[T, R]] = {}
        self._running: set[K] = set()

    async def __call__(self, nursery: trio.Nursery, key: K, item: T) -> R:
        batch = self._next.get(key)
        if batch is None:
            batch = self._next[key] = _Batch()
            if key not in self._running:
                self._running.add(key)
                nursery.start_soon(self._run, key)
        batch.items.append(item)
        await batch.done.wait()
        if batch.error is not None:
            raise BrokerUnavailable(str(batch.error)) from batch.error
        return batch.result  # type: ignore[return-value]

    async def _run(self, key: K) -> None:
        batch: _Batch[T, R] | None = None
        try:
            while (batch := self._next.pop(key, None)) is not None:
                try:
                    batch.result = await self._call(key, batch.items)
                except Exception as exc:
                    batch.error = exc
                batch.done.set()
        except BaseException:  # cancelled: the node stops; no caller is left waiting
            for waiting in (batch, self._next.pop(key, None)):
                if waiting is not None and not waiting.done.is_set():
                    waiting.error = BrokerUnavailable("the node is stopping")
                    waiting.done.set()
            raise
        finally:
            self._running.discard(key)
