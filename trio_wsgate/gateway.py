"""The application's side: a :class:`Gateway` holds handlers, hooks and tasks.

Everything registered here runs inside the nursery of the connection it serves
(DESIGN.md, "The shape"), so it is cancelled when that connection ends::

    gateway = Gateway()

    @gateway.on("echo")
    async def echo(session, data):
        return data                      # becomes the reply's data

    @gateway.task
    async def ticker(session):           # one per connection, for its lifetime
        while True:
            await trio.sleep(1)
            session.send("tick", trio.current_time())
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .connection import Session

__all__ = ["Gateway", "Handler", "SessionHook"]

#: A handler receives the session and the ``data`` of a client ``msg``.
Handler = Callable[[Session, Any], Awaitable[Any]]
#: Hooks and per-connection tasks receive the session.
SessionHook = Callable[[Session], Awaitable[None]]

H = TypeVar("H", bound=Handler)
S = TypeVar("S", bound=SessionHook)


class Gateway:
    """The registry of an application's handlers, hooks and per-connection tasks.

    Handlers of one connection run one at a time, in the order the client's
    envelopes arrived, inside that connection's nursery.
    """

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}
        self.connect_hooks: list[SessionHook] = []
        self.disconnect_hooks: list[SessionHook] = []
        self.session_tasks: list[SessionHook] = []

    def on(self, event: str) -> Callable[[H], H]:
        """Register the handler of client ``msg`` envelopes with this ``event``.

        The handler's return value becomes the ``data`` of the ``reply``. Raising
        :class:`~trio_wsgate.HandlerError` answers with that error code; any other
        exception answers with the code ``"internal"`` and is logged.
        """

        def register(handler: H) -> H:
            if event in self.handlers:
                raise ValueError(f"a handler for {event!r} is already registered")
            self.handlers[event] = handler
            return handler

        return register

    def on_connect(self, hook: S) -> S:
        """Run ``hook(session)`` after ``welcome`` is queued, before any handler."""
        self.connect_hooks.append(hook)
        return hook

    def on_disconnect(self, hook: S) -> S:
        """Run ``hook(session)`` once the connection is released (bounded, shielded)."""
        self.disconnect_hooks.append(hook)
        return hook

    def task(self, task: S) -> S:
        """Run ``task(session)`` for each connection, in its nursery, until it ends."""
        self.session_tasks.append(task)
        return task
