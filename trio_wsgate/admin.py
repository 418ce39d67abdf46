"""The admin port's ASGI application: health, readiness, metrics and the server API.

Served by hypercorn in the node's own trio run (:meth:`AdminApp.serve`), so the metrics
(``wsgate_tasks`` above all) are read from the same task tree the gateway uses, and
the server API (docs/protocol.md, "The server API") calls the hub directly. Each admin
connection's failure stays in its own task: none reaches the node's nursery.

Everything under ``/api/`` needs ``Authorization: apikey <key>`` when the node has an
API key, checked before anything else (an unknown path without the key is 401, not
404); without a key configured it answers 403, unless the node was started with
``--open-api``. Answers are JSON; errors are ``{"error": code, "reason": text}`` with
the HTTP status that fits (400 for a malformed body, 401 for a wrong key, 403, 404,
405, 413, 500).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs

import trio
from prometheus_client import CONTENT_TYPE_LATEST

from .exceptions import BrokerUnavailable
from .protocol.closecodes import CloseCode

if TYPE_CHECKING:
    from .brokers import Publication
    from .config import Config
    from .hub import Hub
    from .metrics import Metrics

__all__ = ["BODY_MARGIN", "AdminApp", "Answer", "ApiError", "Counts", "HttpApp", "probe"]

logger = logging.getLogger("trio_wsgate.admin")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
# Largest request body read, in bytes: a publication must fit a WebSocket message
# anyway, so a body a little over max_message_size is never useful.
BODY_MARGIN = 4096


def probe(
    path: str, ready: bool, degraded: bool = False, shards: Sequence[str] = ()
) -> tuple[int, str] | None:
    """Answer the load balancers' probes, on either port: ``(status, body)``.

    ``/healthz`` is 200 while the process serves; ``/readyz`` is 200 while it
    accepts connections and 503 while it drains (docs/protocol.md §9). While the broker
    cannot be reached, ``/readyz`` stays 200 (a Redis blip must not empty the load
    balancer) and says ``degraded`` in its body, with the ``shards`` of a sharded
    broker that are down. Other paths: None.
    """
    if path == "/healthz":
        return 200, "ok\n"
    if path == "/readyz":
        if not ready:
            return 503, "draining\n"
        if not degraded:
            return 200, "ready\n"
        which = f" (shards {', '.join(shards)})" if shards else ""
        return 200, f"ready (degraded: the broker is unreachable{which})\n"
    return None


class AdminNode(Protocol):
    """What the admin port needs of its node (a :class:`~trio_wsgate.Server`)."""

    @property
    def config(self) -> Config:
        """The node's settings."""
        ...

    @property
    def metrics(self) -> Metrics:
        """The node's metrics (``/metrics``)."""
        ...

    @property
    def hub(self) -> Hub:
        """What the server API publishes through, kicks and asks presence of."""
        ...

    @property
    def ready(self) -> bool:
        """True while the node accepts connections (``/readyz``)."""
        ...

    @property
    def degraded(self) -> bool:
        """True while the broker cannot be reached."""
        ...

    @property
    def unreachable(self) -> list[str]:
        """The shards of a sharded broker that cannot be reached."""
        ...

    def stats(self) -> dict[str, Any]:
        """The node at a glance (``/api/stats``)."""
        ...


class ApiError(Exception):
    """An API request answered with an error status."""

    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = reason


Answer = tuple[int, bytes, str, list[tuple[bytes, bytes]]]


def _json(status: int, value: Any) -> Answer:
    body = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    return status, body + b"\n", JSON, []


def _rejects(scope: Scope) -> bool:
    """True if the ASGI server can answer a WebSocket upgrade with an HTTP response."""
    return "websocket.http.response" in (scope.get("extensions") or {})


# The admin port serves no WebSocket: 404, or where the ASGI server cannot answer with
# HTTP, a close before accept (which it answers with 403).
_NO_WEBSOCKET: list[Message] = [
    {
        "type": "websocket.http.response.start",
        "status": 404,
        "headers": [(b"content-type", TEXT.encode())],
    },
    {"type": "websocket.http.response.body", "body": b"Not Found\n"},
]
_NO_WEBSOCKET_CLOSE: list[Message] = [
    {"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION}
]

# method, handler name, by path
_API: dict[str, tuple[str, str]] = {
    "/api/publish": ("POST", "_publish"),
    "/api/send": ("POST", "_send"),
    "/api/kick": ("POST", "_kick"),
    "/api/stats": ("GET", "_stats"),
    "/api/presence": ("GET", "_presence"),
}


class Counts(Protocol):
    """Where an HTTP app counts its internal errors (``wsgate_internal_errors_total``)."""

    def inc(self, amount: float = 1) -> None:
        """Count ``amount`` more."""
        ...


class HttpApp:
    """An ASGI app that answers plain HTTP with :meth:`handle`, and refuses WebSockets.

    Args:
        internal_errors: counts the requests whose answer crashed (they get 500).
    """

    def __init__(self, internal_errors: Counts) -> None:
        self._internal_errors = internal_errors

    async def handle(self, scope: Scope, receive: Receive) -> Answer:
        """Answer one request: ``(status, body, content type, extra headers)``."""
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "http":
            messages = await self._answer(scope, receive)
        elif scope["type"] == "websocket" and (await receive())["type"] == "websocket.connect":
            messages = _NO_WEBSOCKET if _rejects(scope) else _NO_WEBSOCKET_CLOSE
        else:
            return
        try:
            for message in messages:
                await send(message)
        except Exception as exc:
            # What is sent here is well-formed; the ASGI server refuses it once the
            # connection cannot take it: hypercorn raises h11's LocalProtocolError after
            # it answered a peer's broken request itself. Nothing more to do.
            logger.debug("the admin port's answer could not be sent: %r", exc)

    async def _answer(self, scope: Scope, receive: Receive) -> list[Message]:
        """The messages answering an HTTP request; a crash is logged, counted, and 500."""
        try:
            status, body, content_type, extra = await self.handle(scope, receive)
        except Exception:  # the root of the request: log once, count, answer
            self._internal_errors.inc()
            logger.exception("internal error answering %s %s", scope["method"], scope["path"])
            status, body, content_type, extra = _json(
                500, {"error": "internal", "reason": "internal error"}
            )
        headers = [
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(body)).encode()),
            *extra,
        ]
        return [
            {"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body},
        ]

    async def serve(self, listeners: Sequence[trio.SocketListener]) -> None:
        """Serve the app on the admin port's listeners until cancelled.

        hypercorn serves each connection, but the accept loop is this one and not
        ``hypercorn.trio.serve``: that one runs every connection in one nursery, so
        that an error raised by hypercorn's own protocol code for one connection (an
        upgrade request with one byte more: pgjones/hypercorn#225) ends the admin
        server, and with it the node. Here a connection's failure ends that
        connection only: a peer that broke HTTP is logged at debug level
        (:func:`~trio_wsgate.transports.asgi.serve_hypercorn_stream`), anything else
        is logged once and counted in ``wsgate_internal_errors_total``, and the port
        keeps serving. The WebSocket port is never affected.

        Args:
            listeners: the admin port's listeners, already bound.
        """
        from hypercorn.app_wrappers import ASGIWrapper
        from hypercorn.config import Config as HypercornConfig

        from .transports.asgi import serve_hypercorn_stream

        framework: Any = self  # hypercorn types the ASGI messages more narrowly
        app, hconfig = ASGIWrapper(framework), HypercornConfig()
        hconfig.accesslog = None  # /api requests carry the API key
        hconfig.errorlog = logger
        internal_errors = self._internal_errors

        async def serve_connection(stream: trio.SocketStream) -> None:
            try:
                peer = stream.socket.getpeername()
            except OSError:  # the peer left before we looked
                await trio.aclose_forcefully(stream)
                return
            # A worker's admin socket (a Unix socket) has no peer address.
            remote = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "local"
            try:
                await serve_hypercorn_stream(app, hconfig, stream, remote)
            except Exception:  # the root of the connection's task: log once, count, go on
                internal_errors.inc()
                logger.exception("internal error serving %s on the admin port", remote)
            finally:
                await trio.aclose_forcefully(stream)

        await trio.serve_listeners(serve_connection, list(listeners))


class AdminApp(HttpApp):
    """ASGI app answering ``/healthz``, ``/readyz``, ``/metrics`` and ``/api/*``.

    Args:
        server: the node whose state it reports and whose hub it drives.
    """

    def __init__(self, server: AdminNode) -> None:
        super().__init__(server.metrics.internal_errors)
        self._server = server

    async def handle(self, scope: Scope, receive: Receive) -> Answer:
        """Answer one request: ``(status, body, content type, extra headers)``."""
        method, path = scope["method"], scope["path"]
        if path.startswith("/api/"):
            try:
                return await self._api(scope, receive)
            except ApiError as exc:
                answer = _json(exc.status, {"error": exc.code, "reason": exc.reason})
                if exc.status == 401:
                    answer[3].append((b"www-authenticate", b"apikey"))
                return answer
        if method not in ("GET", "HEAD"):
            return 405, b"Method Not Allowed\n", TEXT, [(b"allow", b"GET, HEAD")]
        probed = probe(path, self._server.ready, self._server.degraded, self._server.unreachable)
        if probed is not None:
            return probed[0], probed[1].encode(), TEXT, []
        if path == "/metrics":
            return 200, self._server.metrics.render(), CONTENT_TYPE_LATEST, []
        return 404, b"Not Found\n", TEXT, []

    # -- /api -------------------------------------------------------------------------

    def _check_key(self, scope: Scope) -> None:
        config = self._server.config
        if config.api_key is None:
            if config.open_api:
                return
            raise ApiError(403, "forbidden", "the server API is off: no API key is configured")
        given = b""
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"apikey":
                    given = credentials.strip()
        if not hmac.compare_digest(given, config.api_key.encode()):
            raise ApiError(401, "unauthorized", "Authorization: apikey <key> is missing or wrong")

    async def _api(self, scope: Scope, receive: Receive) -> Answer:
        # The key first: without it, nothing under /api/ says what exists there.
        self._check_key(scope)
        route = _API.get(scope["path"])
        if route is None:
            raise ApiError(404, "not_found", f"no endpoint {scope['path']}")
        method, name = route
        if scope["method"] != method:
            answer = _json(405, {"error": "method_not_allowed", "reason": f"use {method}"})
            answer[3].append((b"allow", method.encode()))
            return answer
        handler: Callable[[Scope, Receive], Awaitable[Any]] = getattr(self, name)
        try:
            return _json(200, await handler(scope, receive))
        except BrokerUnavailable as exc:
            answer = _json(503, {"error": "unavailable", "reason": str(exc)})
            answer[3].append((b"retry-after", b"1"))
            return answer

    async def _body(self, receive: Receive) -> dict[str, Any]:
        limit = self._server.config.max_message_size + BODY_MARGIN
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError(400, "bad_request", "the client left before sending its body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "too_large", f"the body is larger than {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        try:
            value = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ApiError(400, "bad_request", "the body must be a JSON object")
        return value

    @staticmethod
    def _string(body: dict[str, Any], key: str, *, required: bool = True) -> str | None:
        value = body.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise ApiError(400, "bad_request", f"{key!r} must be a non-empty string")
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:  # a lone surrogate: JSON's \ud800 decodes to one
                raise ApiError(400, "bad_request", f"{key!r} is not valid Unicode") from None
        return value

    async def _publish(self, scope: Scope, receive: Receive) -> dict[str, Any]:
        body = await self._body(receive)
        topic = self._string(body, "topic")
        assert topic is not None
        return await self._published(
            body, lambda data, event: self._server.hub.publish(topic, data, event)
        )

    async def _send(self, scope: Scope, receive: Receive) -> dict[str, Any]:
        body = await self._body(receive)
        user = self._string(body, "user")
        assert user is not None
        return await self._published(
            body, lambda data, event: self._server.hub.send_to_user(user, data, event)
        )

    async def _published(
        self, body: dict[str, Any], publish: Callable[[Any, str | None], Awaitable[Publication]]
    ) -> dict[str, Any]:
        """Publish the body's ``data`` (required) with its ``event`` (optional)."""
        if "data" not in body:
            raise ApiError(400, "bad_request", "'data' is required")
        event = self._string(body, "event", required=False)
        try:
            publication = await publish(body["data"], event)
        except ValueError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        return {"offset": publication.offset, "epoch": publication.epoch}

    async def _kick(self, scope: Scope, receive: Receive) -> dict[str, Any]:
        body = await self._body(receive)
        if ("user" in body) == ("session" in body):
            raise ApiError(400, "bad_request", "give either 'user' or 'session'")
        key = "user" if "user" in body else "session"
        target = self._string(body, key)
        kicked = await self._server.hub.kick(**{key: target})
        return {"kicked": kicked}

    async def _stats(self, scope: Scope, receive: Receive) -> dict[str, Any]:
        return self._server.stats()

    async def _presence(self, scope: Scope, receive: Receive) -> dict[str, Any]:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        topics = query.get("topic")
        if not topics or not topics[0]:
            raise ApiError(400, "bad_request", "give the topic: /api/presence?topic=T")
        topic = topics[0]
        present = await self._server.hub.presence(topic)
        return {
            "topic": topic,
            "users": sorted({user for user in present.values() if user is not None}),
            "sessions": [
                {"session": session, "user": user} for session, user in sorted(present.items())
            ],
        }
