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

__all__ = ["Authenticator", "Gateway", "Handler", "SessionHook"]

#: A handler receives the session and the ``data`` of a client ``msg``.
Handler = Callable[[Session, Any], Awaitable[Any]]
#: Hooks and per-connection tasks receive the session.
SessionHook = Callable[[Session], Awaitable[None]]
#: An authenticator receives ``hello.token`` and returns the user id (None: anonymous).
Authenticator = Callable[[str | None], Awaitable[str | None]]

H = TypeVar("H", bound=Handler)
S = TypeVar("S", bound=SessionHook)
A = TypeVar("A", bound=Authenticator)


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
        self.session_end_hooks: list[SessionHook] = []
        self.authenticator: Authenticator | None = None

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
        """Run ``hook(session)`` once the connection is released (bounded, shielded).

        The session may live on, detached, for a resume: see :meth:`on_session_end`.
        """
        self.disconnect_hooks.append(hook)
        return hook

    def on_session_end(self, hook: S) -> S:
        """Run ``hook(session)`` once the session has ended for good.

        That is after ``bye``, a kick, a protocol error, or when a detached session
        expires or overflows ``max_buffered``. The hook runs in the node's hub task
        (bounded by ``close_timeout``), not in a connection's nursery.
        """
        self.session_end_hooks.append(hook)
        return hook

    def authenticate(self, authenticator: A) -> A:
        """Register the function that turns ``hello.token`` into a user id.

        It raises :class:`~trio_wsgate.Unauthorized` to refuse (close 4001). A session
        is bound to its user: only the same user can resume it (PROTOCOL.md §5).
        """
        self.authenticator = authenticator
        return authenticator

    def task(self, task: S) -> S:
        """Run ``task(session)`` for each connection, in its nursery, until it ends."""
        self.session_tasks.append(task)
        return task
