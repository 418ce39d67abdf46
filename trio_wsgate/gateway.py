"""The application's side: a :class:`Gateway` holds handlers, hooks and tasks.

Everything registered here runs inside the nursery of the connection it serves
(docs/architecture.md, "The shape"), so it is cancelled when that connection ends::

    gateway = Gateway()

    @gateway.on("echo")
    async def echo(session, data):
        return data                      # becomes the reply's data

    @gateway.task
    async def ticker(session):           # one per connection, for its lifetime
        while True:
            await trio.sleep(1)
            session.send("tick", trio.current_time())

Once a node serves it, the gateway also reaches beyond one session:
``await gateway.publish("room:lobby", data)``, ``await gateway.send_to_user("ada", data)``,
``await gateway.kick(user="ada")`` and ``await gateway.presence("room:lobby")``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .auth import Authenticator
from .files import StaticFile
from .session import Session

if TYPE_CHECKING:
    from .brokers import Publication
    from .hub import Hub

__all__ = ["Authenticator", "Authorizer", "Gateway", "Handler", "SessionHook"]

#: A handler receives the session and the ``data`` of a client ``msg``.
Handler = Callable[[Session, Any], Awaitable[Any]]
#: Hooks and per-connection tasks receive the session.
SessionHook = Callable[[Session], Awaitable[None]]
#: An authoriser receives the session and a topic; True allows (docs/protocol.md §6).
Authorizer = Callable[[Session, str], Awaitable[bool]]

H = TypeVar("H", bound=Handler)
S = TypeVar("S", bound=SessionHook)
A = TypeVar("A", bound=Authenticator)
Z = TypeVar("Z", bound=Authorizer)


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
        self.subscribe_authorizer: Authorizer | None = None
        self.publish_authorizer: Authorizer | None = None
        #: Text files served on the WebSocket port, by path (:meth:`serve_file`).
        self.files: dict[str, StaticFile] = {}
        self._hub: Hub | None = None  # set by the Server that serves this gateway

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
        """Register the function that turns a token into a user, instead of JWTs.

        It receives the token (from the handshake or ``hello.token``; None if the
        client sent none) and returns a user id, an :class:`~trio_wsgate.Identity`, or
        None for an anonymous client; it raises :class:`~trio_wsgate.Unauthorized` to
        refuse (HTTP 401 at the handshake, close 4001 after it). It replaces the
        node's ``--jwt-secret``/``--jwt-public-key`` verification. A session is bound
        to its user: only the same user can resume it (docs/protocol.md §5).
        """
        self.authenticator = authenticator
        return authenticator

    def authorize_subscribe(self, authorizer: Z) -> Z:
        """Register ``authorizer(session, topic) -> bool`` for client ``sub`` envelopes.

        It is asked when neither the token's ``topics`` claim nor ``--allow-subscribe``
        allows the topic; True allows, False answers ``forbidden``.
        """
        self.subscribe_authorizer = authorizer
        return authorizer

    def authorize_publish(self, authorizer: Z) -> Z:
        """Register ``authorizer(session, topic) -> bool`` for client ``pub`` envelopes.

        It is asked when ``--allow-publish`` does not allow the topic; it alone can let
        clients publish to ``user:`` topics.
        """
        self.publish_authorizer = authorizer
        return authorizer

    def serve_file(self, path: str, file: str | Path, content_type: str | None = None) -> None:
        """Answer ``GET path`` on the WebSocket port with a text file (a page, a script).

        For a page that talks to the node from the same origin: it loads
        ``/wsgate.js`` (which every node serves) and opens the socket. The file is read
        now, as UTF-8, and kept in memory (at most 4 MiB); its type comes from its
        suffix unless ``content_type`` says. Served by the ``websockets`` transport and
        the ASGI app, not by ``trio-websocket`` (docs/transports.md).

        Raises:
            ValueError: ``path`` does not start with ``/``, is taken, or the file is too
                large or of no known type.
        """
        if not path.startswith("/") or "?" in path or "#" in path:
            raise ValueError(f"a served path starts with / and has no query: {path!r}")
        if path in self.files:
            raise ValueError(f"a file is already served at {path!r}")
        self.files[path] = StaticFile.read(file, content_type)

    # -- beyond one session (needs a node serving this gateway) ------------------------

    @property
    def hub(self) -> Hub:
        """The hub of the node serving this gateway."""
        if self._hub is None:
            raise RuntimeError("no node serves this gateway yet: create a Server with it")
        return self._hub

    async def publish(self, topic: str, data: Any, event: str | None = None) -> Publication:
        """Publish to every subscriber of ``topic``; returns its offset and epoch.

        Raises:
            ValueError: a bad topic name, or data that JSON or msgpack cannot encode.
        """
        return await self.hub.publish(topic, data, event)

    async def send_to_user(self, user: str, data: Any, event: str | None = None) -> Publication:
        """Send to every session of ``user`` (the topic ``user:<user>``), recoverably."""
        return await self.hub.send_to_user(user, data, event)

    async def kick(self, *, user: str | None = None, session: str | None = None) -> int:
        """Close a user's sessions, or one session, with 4005; returns how many.

        Asynchronous because a cluster will reach the sessions on other nodes too.
        """
        return await self.hub.kick(user=user, session=session)

    async def presence(self, topic: str) -> dict[str, str | None]:
        """The sessions subscribed to ``topic``, each with its user."""
        return await self.hub.presence(topic)

    def task(self, task: S) -> S:
        """Run ``task(session)`` for each connection, in its nursery, until it ends."""
        self.session_tasks.append(task)
        return task
