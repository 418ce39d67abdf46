"""A gateway node: listeners, the connections' nursery, the admin port and the drain.

``serve(gateway, config)`` runs a node until it is cancelled or drained. Library users
who run their own trio program start it with ``await nursery.start(serve, gateway,
config)`` and get the :class:`Server` back, to read its addresses or :meth:`drain` it.
"""

from __future__ import annotations

import logging
import signal
import socket
from typing import Any

import trio
from websockets.http11 import Request

from .admin import AdminApp, probe
from .auth import Authenticator, Identity, authenticator_from_settings, identify, token_from_request
from .brokers import Broker
from .config import Config
from .connection import Connection
from .exceptions import Unauthorized
from .gateway import Gateway
from .hub import Hub, checked_identity
from .metrics import Metrics
from .protocol import CODECS, JSON_SUBPROTOCOL, CloseCode, CloseReason
from .transports.websockets import Handshake, accept_websocket

__all__ = ["Server", "serve"]

logger = logging.getLogger("trio_wsgate.server")

RETRY_AFTER = "5"


def set_keepalive(stream: trio.SocketStream, config: Config) -> None:
    """Turn on TCP keepalive: the network-level backstop for vanished peers."""
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # The fine-grained options are Linux (and most BSDs); skip where absent.
    for name, value in (
        ("TCP_KEEPIDLE", config.keepalive_idle),
        ("TCP_KEEPINTVL", config.keepalive_interval),
        ("TCP_KEEPCNT", config.keepalive_count),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            stream.setsockopt(socket.IPPROTO_TCP, option, value)


class Server:
    """One gateway node.

    Args:
        gateway: the application's handlers and hooks.
        config: the node's settings; defaults when omitted.
        broker: what carries publications; the in-memory broker when omitted.

    Raises:
        ValueError: the settings cannot work (an unreadable JWT key, say).
        OSError: the JWT public key file cannot be read.
    """

    def __init__(
        self, gateway: Gateway, config: Config | None = None, broker: Broker | None = None
    ) -> None:
        self.gateway = gateway
        self.config = config = config or Config()
        self.connections: set[Connection] = set()
        self.metrics = Metrics(queue_depth=self._queue_depth)
        #: Who clients are: the application's authenticator, else JWTs if a key is
        #: configured, else None (anonymous).
        self.authenticator: Authenticator | None = gateway.authenticator or (
            authenticator_from_settings(
                jwt_secret=config.jwt_secret,
                jwt_public_key=config.jwt_public_key,
                jwt_audience=config.jwt_audience,
                jwt_issuer=config.jwt_issuer,
            )
        )
        if broker is None and config.redis_url is not None:
            from .brokers.redis import RedisBroker  # coredis is imported only when used

            broker = RedisBroker(
                config.redis_url,
                history_size=config.history_size,
                history_ttl=config.history_ttl,
                prefix=config.redis_prefix,
            )
        #: The node's sessions, users and topics.
        self.hub = Hub(gateway, config, self.metrics, broker, self.authenticator)
        gateway._hub = self.hub
        self.draining = False
        self.forced = False
        #: ``(host, port)`` of each WebSocket listener, once serving.
        self.listen_addresses: list[tuple[str, int]] = []
        #: ``(host, port)`` of the admin port, once serving (empty when off).
        self.admin_addresses: list[tuple[str, int]] = []
        self._listeners: list[trio.SocketListener] = []
        self._accepting = trio.CancelScope()
        self._drained = trio.Event()
        self._stopped = trio.Event()
        self._root: trio.Nursery | None = None

    @property
    def ready(self) -> bool:
        """True while the node accepts connections (``/readyz``)."""
        return not self.draining

    @property
    def degraded(self) -> bool:
        """True while the broker cannot be reached (``/readyz`` says so, still 200)."""
        return not self.hub.broker.healthy

    def _queue_depth(self) -> int:
        return sum(connection.queue_depth for connection in self.connections)

    # -- one stream -----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The node at a glance (``GET /api/stats``)."""
        hub = self.hub
        return {
            "node": hub.node_id,
            "connections": len(self.connections),
            "sessions": len(hub.sessions),
            "sessions_detached": hub.detached_count(),
            "users": len(hub.users),
            "topics": len(hub.topics),
            "broker": hub.broker.statistics(),
            "draining": self.draining,
        }

    async def _http_route(
        self, request: Request, identified: list[Identity]
    ) -> tuple[int, str, dict[str, str]] | None:
        path = request.path.split("?", 1)[0]
        answer = probe(path, self.ready, self.degraded)
        if answer is not None:
            status, body = answer
            return status, body, {"Retry-After": RETRY_AFTER} if status == 503 else {}
        if path != self.config.path:
            return None
        if self.draining:
            return 503, "draining\n", {"Retry-After": RETRY_AFTER}
        token = token_from_request(request.headers, request.path)
        if token is not None and self.authenticator is not None:
            # PROTOCOL.md §3: a bad token at the handshake is refused with 401.
            try:
                identified.append(checked_identity(await identify(self.authenticator, token)))
            except Unauthorized as exc:
                body = f"unauthorized: {exc}\n"
                return 401, body, {"WWW-Authenticate": 'Bearer error="invalid_token"'}
        return None

    async def serve_stream(self, stream: trio.abc.Stream, remote_address: str = "") -> None:
        """Serve one accepted byte stream: the opening handshake, then the connection.

        The handshake (or the plain HTTP answer) is bounded by ``hello_timeout``.
        Returns once everything the stream started is released.
        """
        config = self.config
        identified: list[Identity] = []

        async def route(request: Request) -> tuple[int, str, dict[str, str]] | None:
            return await self._http_route(request, identified)

        try:
            result: Any = (0, None)
            with trio.move_on_after(config.hello_timeout or 10.0):
                result = await accept_websocket(
                    stream,
                    path=config.path,
                    subprotocols=list(CODECS),
                    max_message_size=config.max_message_size,
                    http_route=route,
                    remote_address=remote_address,
                )
            if not isinstance(result, Handshake):
                status = result[0]
                if status >= 400:
                    self.metrics.handshakes_refused.labels(str(status)).inc()
                return
            codec = CODECS[result.subprotocol or JSON_SUBPROTOCOL]()
            connection = Connection(
                result.transport,
                codec,
                self.gateway,
                config,
                self.metrics,
                self.hub,
                identified[0] if identified else None,
            )
            self.connections.add(connection)
            self.hub.connections[connection.id] = connection
            if self.draining:
                connection.close(CloseCode.GOING_AWAY, "server draining", CloseReason.DRAIN)
            try:
                await connection.run()
            finally:
                self.connections.discard(connection)
                self.hub.connections.pop(connection.id, None)
                if self.draining and not self.connections:
                    self._drained.set()
        finally:
            await trio.aclose_forcefully(stream)

    async def _handle_socket(self, stream: trio.SocketStream) -> None:
        try:
            set_keepalive(stream, self.config)
            peer = stream.socket.getpeername()
            remote = f"{peer[0]}:{peer[1]}"
        except OSError:  # the peer left before we looked
            await trio.aclose_forcefully(stream)
            return
        try:
            await self.serve_stream(stream, remote)
        except Exception:  # the root of a connection's task: log once, keep serving
            logger.exception("internal error serving %s", remote)

    # -- the node -------------------------------------------------------------------

    async def serve(
        self,
        *,
        handle_signals: bool = False,
        task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen and serve until cancelled or drained.

        Args:
            handle_signals: drain on SIGTERM/SIGINT; a second signal stops at once.
        """
        config = self.config
        self._listeners = await trio.open_tcp_listeners(config.port, host=config.host)
        self.listen_addresses = [
            (str(name[0]), int(name[1]))
            for name in (listener.socket.getsockname() for listener in self._listeners)
        ]
        async with trio.open_nursery() as root:
            self._root = root
            handler_nursery: trio.Nursery = await root.start(_open_connections_nursery)
            await root.start(self.hub.run)  # the broker is ready before the first client
            root.start_soon(self._accept, handler_nursery)
            if config.admin_port is not None:
                await root.start(self._serve_admin)
            if handle_signals:
                root.start_soon(self._watch_signals)
            task_status.started(self)
            await self._stopped.wait()
            root.cancel_scope.cancel()

    async def _accept(self, handler_nursery: trio.Nursery) -> None:
        with self._accepting:
            await trio.serve_listeners(
                self._handle_socket, self._listeners, handler_nursery=handler_nursery
            )

    async def _serve_admin(self, task_status: trio.TaskStatus[None]) -> None:
        from hypercorn.config import Config as HypercornConfig
        from hypercorn.trio import serve as hypercorn_serve

        hconfig = HypercornConfig()
        hconfig.bind = [f"{self.config.admin_host}:{self.config.admin_port}"]
        hconfig.accesslog = None
        hconfig.errorlog = logging.getLogger("trio_wsgate.admin")
        hconfig.graceful_timeout = 1.0
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(hypercorn_serve, AdminApp(self), hconfig)
            for bind in binds:
                host, _, port = bind.rpartition("//")[2].rpartition(":")
                self.admin_addresses.append((host.strip("[]"), int(port)))
            task_status.started()

    async def drain(self) -> None:
        """Drain the node (DESIGN.md, "Drain"), then stop it.

        ``/readyz`` turns 503, the listeners close, every connection is closed with
        1001, and the node waits up to ``drain_timeout`` for them before cancelling
        what is left.
        """
        if self.draining:
            return
        self.draining = True
        logger.warning("draining %d connections", len(self.connections))
        self._accepting.cancel()
        for listener in self._listeners:
            await trio.aclose_forcefully(listener)
        for connection in list(self.connections):
            connection.close(CloseCode.GOING_AWAY, "server draining", CloseReason.DRAIN)
        if self.connections:
            with trio.move_on_after(self.config.drain_timeout):
                await self._drained.wait()
        left = len(self.connections)
        if left:
            logger.warning("drain timeout: cancelling %d connections", left)
        self._stopped.set()

    def stop(self) -> None:
        """Stop at once: every connection is cancelled, nothing is waited for."""
        self._stopped.set()

    async def _watch_signals(self) -> None:
        assert self._root is not None
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if not self.draining:
                    logger.warning("%s: draining", signal.Signals(signum).name)
                    self._root.start_soon(self.drain)
                else:
                    logger.warning("%s again: stopping now", signal.Signals(signum).name)
                    self.forced = True
                    self.stop()


async def _open_connections_nursery(task_status: trio.TaskStatus[trio.Nursery]) -> None:
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()


async def serve(
    gateway: Gateway,
    config: Config | None = None,
    *,
    handle_signals: bool = False,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a gateway node until cancelled or drained.

    Use as ``server = await nursery.start(serve, gateway, config)``.
    """
    await Server(gateway, config).serve(handle_signals=handle_signals, task_status=task_status)
