"""A gateway node: listeners, the connections' nursery, the admin port and the drain.

``serve(gateway, config)`` runs a node until it is cancelled or drained. Library users
who run their own trio program start it with ``await nursery.start(serve, gateway,
config)`` and get the :class:`Server` back, to read its addresses or :meth:`drain` it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import Any

import trio

from . import readiness
from .admin import AdminApp, probe
from .auth import (
    Authenticator,
    Identity,
    authenticator_from_settings,
    identify,
    refusal_reason,
    token_from_request,
)
from .brokers import Broker
from .brokers.sharded import ShardedBroker, shard_name
from .config import Config, TransportKind
from .connection import Connection
from .exceptions import Unauthorized
from .files import CLIENT_PATH, StaticFile, client_file
from .gateway import Gateway
from .hub import Hub
from .limits import ConnectionCounts, TokenBucket
from .listeners import open_tcp_listeners, open_unix_listener
from .metrics import Metrics
from .protocol import JSON_SUBPROTOCOL, SUBPROTOCOLS, CloseCode, CloseReason, shared_codec
from .transports.base import Accept, Refusal, Transport, UpgradeRequest, remote_ip
from .transports.websockets import Handshake, accept_websocket

__all__ = ["Admission", "Server", "serve"]

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


@dataclass(slots=True)
class Admission(Accept):
    """An opening request the server accepted, counted against its limits."""

    identity: Identity | None = None
    ip: str = ""
    released: bool = False


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
        if broker is None and config.redis_urls:
            # coredis is imported only when used.
            from .brokers.cluster import ClusterBroker
            from .brokers.redis import RedisBroker

            shards = [
                (ClusterBroker if url.startswith("redis+cluster://") else RedisBroker)(
                    url,
                    history_size=config.history_size,
                    history_ttl=config.history_ttl,
                    prefix=config.redis_prefix,
                )
                for url in config.redis_urls
            ]
            if len(shards) == 1:
                broker = shards[0]
            else:
                names = [shard_name(url) for url in config.redis_urls]
                broker = ShardedBroker(shards, names)
        #: The node's sessions, users and topics.
        self.hub = Hub(gateway, config, self.metrics, broker, self.authenticator)
        gateway._hub = self.hub
        #: What ``GET`` answers on the WebSocket port besides the probes: the
        #: JavaScript client and the application's files.
        self.files: dict[str, StaticFile] = {CLIENT_PATH: client_file()}
        for path, file in gateway.files.items():
            if path in (config.path, CLIENT_PATH, "/healthz", "/readyz"):
                raise ValueError(f"{path} is the node's own: serve the file elsewhere")
            self.files[path] = file
        hub = self.hub
        self.metrics.detached_bytes.set_function(lambda: float(hub.detached_bytes))
        self.metrics.history_bytes.set_function(
            lambda: float(getattr(hub.broker, "nbytes", 0))  # the in-memory broker's
        )
        self.draining = False
        self.forced = False
        #: With ``handle_signals``: a second SIGTERM or SIGINT while draining stops at
        #: once. A worker of ``--workers`` sets it False: it gets its supervisor's signal
        #: and often one of its own at once (a service manager's, Ctrl-C's), and its
        #: supervisor stops it by force if need be.
        self.repeat_stops = True
        #: ``(host, port)`` of each WebSocket listener, once serving.
        self.listen_addresses: list[tuple[str, int]] = []
        #: ``(host, port)`` of the admin port, once serving (empty when off).
        self.admin_addresses: list[tuple[str, int]] = []
        self._listeners: list[trio.SocketListener] = []
        self._accepting = trio.CancelScope()
        self._drained = trio.Event()
        self._stopped = trio.Event()
        self._root: trio.Nursery | None = None
        self._counts = ConnectionCounts()
        #: The ASGI application and hypercorn settings of ``--transport asgi``, made
        #: on first use (asgi_app.serve_asgi_stream).
        self.asgi_app: Any = None
        # Every socket in its opening handshake (max_handshakes), by the cancel scope
        # that bounds it, with the address it counts against while its request head
        # has not all come ("" once it has, or for a stream with no ip:port).
        self._handshakes: dict[trio.CancelScope, str] = {}
        # Per address, its sockets whose request head has not all come, oldest first
        # (max_handshakes_per_ip); an address is forgotten when it has none.
        self._heads: dict[str, dict[trio.CancelScope, None]] = {}
        self._accept_bucket: TokenBucket | None = None
        if config.accept_rate is not None:
            self._accept_bucket = TokenBucket(config.accept_rate, config.accept_burst, 0.0)

    @property
    def ready(self) -> bool:
        """True while the node accepts connections (``/readyz``)."""
        return not self.draining

    @property
    def degraded(self) -> bool:
        """True while the broker (or a shard of it) cannot be reached (``/readyz`` says
        so, still 200)."""
        return not self.hub.broker.healthy

    @property
    def unreachable(self) -> list[str]:
        """The shards of a sharded broker that cannot be reached, by name."""
        return [name for name, up in self.hub.broker_health().items() if not up and name]

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

    def _over_limit(self, request: UpgradeRequest) -> Refusal | None:
        config, counts = self.config, self._counts
        if config.max_connections is not None and counts.total >= config.max_connections:
            return Refusal(503, "over the connection limit\n", {"Retry-After": RETRY_AFTER})
        limit = config.max_connections_per_ip
        if limit is not None and counts.of(request.ip) >= limit:
            return Refusal(
                503, "over the connection limit of this address\n", {"Retry-After": RETRY_AFTER}
            )
        return None

    async def admit(self, request: UpgradeRequest) -> Refusal | Admission:
        """Decide what an opening request gets (docs/protocol.md §8, "Before the handshake").

        In this order: the probes and the served files (``/wsgate.js``, the
        application's pages), 404 off the WebSocket path, 503 while draining,
        403 for an origin not allowed, 400 for foreign subprotocols, 503 over a
        connection limit or the accept rate, 401 for a bad token. An
        :class:`Admission` is counted against the limits until :meth:`release`.
        """
        config = self.config
        answer = probe(request.path, self.ready, self.degraded, self.unreachable)
        if answer is not None:
            status, body = answer
            return Refusal(status, body, {"Retry-After": RETRY_AFTER} if status == 503 else {})
        file = self.files.get(request.path)
        if file is not None:
            if request.method != "GET":
                return Refusal(405, "Method Not Allowed\n", {"Allow": "GET"})
            return file.answer(request.headers)
        if request.path != config.path:
            return Refusal(404, "Not Found\n")
        if self.draining:
            return Refusal(503, "draining\n", {"Retry-After": RETRY_AFTER})
        origin = request.headers.get("Origin")
        if config.allowed_origins and origin is not None and origin not in config.allowed_origins:
            return Refusal(403, "origin not allowed\n")
        subprotocol: str | None = None
        if request.subprotocols:
            # docs/protocol.md §1: no offer means JSON (browsers often offer none); an
            # offer with none of ours is refused. Among ours, the client's order wins.
            subprotocol = next(
                (name for name in request.subprotocols if name in SUBPROTOCOLS), None
            )
            if subprotocol is None:
                return Refusal(
                    400, "no supported subprotocol; offer one of " + ", ".join(SUBPROTOCOLS)
                )
        refusal = self._over_limit(request)
        if refusal is not None:
            return refusal
        if self._accept_bucket is not None:
            now = trio.current_time()
            if not self._accept_bucket.take(now):
                retry = self._accept_bucket.retry_after(now)
                return Refusal(503, "over the accept rate\n", {"Retry-After": retry})
        identity: Identity | None = None
        token = token_from_request(request.headers, request.target)
        if token is not None and self.authenticator is not None:
            # docs/protocol.md §3: a bad token at the handshake is refused with 401.
            try:
                identity = await identify(self.authenticator, token)
            except Unauthorized as exc:
                body = f"{refusal_reason(exc)}\n"
                return Refusal(401, body, {"WWW-Authenticate": 'Bearer error="invalid_token"'})
            except Exception:
                # The application's authenticator failed: this request only.
                self.metrics.internal_errors.inc()
                logger.exception("the authenticator failed for a request from %s", request.remote)
                return Refusal(500, "internal error\n")
            # Checked again: others may have come in while the token was checked.
            refusal = self._over_limit(request)
            if refusal is not None:
                return refusal
        self._counts.add(request.ip)
        return Admission(subprotocol, identity, request.ip)

    def release(self, admission: Admission) -> None:
        """The admitted connection is gone: it no longer counts against the limits."""
        if not admission.released:
            admission.released = True
            self._counts.remove(admission.ip)

    async def run_connection(
        self, transport: Transport, admission: Admission, remote_address: str = ""
    ) -> None:
        """Serve an upgraded WebSocket until it ends, whatever transport carries it.

        Releases ``admission`` when done.
        """
        try:
            codec = shared_codec(admission.subprotocol or JSON_SUBPROTOCOL)
            connection = Connection(
                transport,
                codec,
                self.gateway,
                self.config,
                self.metrics,
                self.hub,
                admission.identity,
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
            self.release(admission)

    def count_refusal(self, status: int) -> None:
        """Count an opening request answered with an HTTP error."""
        if status >= 400:
            self.metrics.handshakes_refused.labels(str(status)).inc()

    def handshake_started(self, remote_address: str, bound: trio.CancelScope) -> bool:
        """Count an accepted socket as in its opening handshake, before reading anything.

        Slowloris defence (issue 18, case 9): the node holds at most ``max_handshakes``
        sockets in their handshake, and one address at most ``max_handshakes_per_ip``
        of those that have not sent their whole request head. When the node is full,
        the address holding the most such sockets gives up its oldest to an address
        holding at least two fewer, so that idle sockets from a few addresses cannot
        lock every other client out.

        Args:
            remote_address: the peer's ``ip:port`` (anything else counts against the
                node only).
            bound: the cancel scope that bounds the handshake (``handshake_timeout``);
                cancelled if the socket has to give up its slot.

        Returns:
            False if the socket is over a limit: the caller closes it at once, without
            answering (counted as refused with 503, like every socket given up).
        """
        config = self.config
        ip = remote_ip(remote_address) if ":" in remote_address else ""
        heads = self._heads
        waiting = heads.get(ip) if ip else None
        held = 0 if waiting is None else len(waiting)
        if held >= config.max_handshakes_per_ip:
            self.count_refusal(503)  # counted, not answered: reading the request costs too
            return False
        if len(self._handshakes) >= config.max_handshakes:
            most = max(heads.values(), key=len, default=None)
            if most is None or len(most) < held + 2:
                self.count_refusal(503)
                return False
            oldest = next(iter(most))
            self.handshake_ended(oldest)
            oldest.cancel()
            self.count_refusal(503)
        self._handshakes[bound] = ip
        if ip:
            if waiting is None:
                waiting = heads[ip] = {}
            waiting[bound] = None
        return True

    def handshake_head_read(self, bound: trio.CancelScope) -> None:
        """The socket's request head has all come: its address no longer answers for it
        (``max_handshakes_per_ip``); the node still counts it until the handshake ends."""
        ip = self._handshakes.get(bound)
        if ip:
            self._handshakes[bound] = ""
            self._forget_head(ip, bound)

    def handshake_ended(self, bound: trio.CancelScope) -> None:
        """The socket's opening handshake is over, however it ended. Idempotent."""
        ip = self._handshakes.pop(bound, None)
        if ip:
            self._forget_head(ip, bound)

    def _forget_head(self, ip: str, bound: trio.CancelScope) -> None:
        waiting = self._heads[ip]
        del waiting[bound]
        if not waiting:
            del self._heads[ip]

    @contextlib.contextmanager
    def handshake_slot(self, remote_address: str, bound: trio.CancelScope) -> Iterator[bool]:
        """A socket's opening handshake, counted while it lasts; yields what
        :meth:`handshake_started` returned (False: close the socket at once)."""
        started = self.handshake_started(remote_address, bound)
        try:
            yield started
        finally:
            self.handshake_ended(bound)

    async def serve_stream(self, stream: trio.abc.Stream, remote_address: str = "") -> None:
        """Serve one accepted byte stream: the opening handshake, then the connection.

        The transport is the configured one (``websockets``, ``trio-websocket`` or
        ``asgi``); the handshake (or the plain HTTP answer) is bounded by
        ``handshake_timeout``, and counted from here by :meth:`handshake_started`
        (each transport takes its slot before it reads anything; a stream over the
        handshake limits is closed at once). Returns once everything the stream
        started is released; closing ``stream`` from outside ends the connection.
        """
        await self._serve_stream(stream, remote_address, own=False)

    async def _serve_stream(self, stream: trio.abc.Stream, remote_address: str, own: bool) -> None:
        # ``own``: a socket of the node's own listeners, closed only by its connection,
        # whose quiet reader may wait through the readiness watcher (readiness.py).
        kind = self.config.transport
        try:
            if kind is TransportKind.WEBSOCKETS:
                accepted = await self._accept_websocket(stream, remote_address, own)
                if accepted is not None:
                    # Awaited here, not inside the handshake's frame: an open connection
                    # keeps one frame fewer (docs/benchmarks.md, "Idle").
                    await self.run_connection(*accepted, remote_address)
            elif kind is TransportKind.TRIO_WEBSOCKET:
                from .transports.trio_websocket import serve_trio_websocket

                await serve_trio_websocket(self, stream, remote_address)
            else:
                from .asgi_app import serve_asgi_stream

                await serve_asgi_stream(self, stream, remote_address)
        except Exception as exc:  # the root of a connection's task: log once, count, go on
            if _peer_left(exc):
                # The peer left (a reset, say) while the node answered its handshake:
                # the end of that stream, not an error of the node's.
                logger.debug("%s left during its handshake", remote_address)
            else:
                self.metrics.internal_errors.inc()
                logger.exception("internal error serving %s", remote_address)
        finally:
            await trio.aclose_forcefully(stream)

    async def _accept_websocket(
        self, stream: trio.abc.Stream, remote_address: str, own: bool
    ) -> tuple[Transport, Admission] | None:
        """The opening handshake on the websockets transport: the upgraded transport and
        its admission, or None if it was refused (answered) or failed."""
        config = self.config
        admitted: list[Admission] = []
        bound = trio.move_on_after(config.handshake_timeout)

        async def decide(request: UpgradeRequest) -> Refusal | Accept:
            self.handshake_head_read(bound)
            answer = await self.admit(request)
            if isinstance(answer, Admission):
                admitted.append(answer)
            return answer

        result: Handshake | tuple[int, Any] = (0, None)
        try:
            with bound, self.handshake_slot(remote_address, bound) as started:
                if started:
                    result = await accept_websocket(
                        stream,
                        decide=decide,
                        max_message_size=config.max_message_size,
                        max_fragments=config.max_fragments,
                        max_request_head=config.max_request_head,
                        max_headers=config.max_headers,
                        compression=config.compression,
                        remote_address=remote_address,
                        watched=own,
                    )
        except BaseException:
            for admission in admitted:
                self.release(admission)
            raise
        if not isinstance(result, Handshake):
            for admission in admitted:
                self.release(admission)
            self.count_refusal(result[0])
            return None
        accepted = result.accept
        assert isinstance(accepted, Admission)
        # The request (its headers) is not kept for the connection's life.
        return result.transport, accepted

    def _handle_socket(self, stream: trio.SocketStream) -> Awaitable[None]:
        """serve_listeners' handler: what :meth:`serve_stream` runs for the socket.

        A plain function that returns the coroutine to await: the connection's task
        keeps one frame fewer for its whole life (docs/benchmarks.md, "Idle").
        """
        try:
            set_keepalive(stream, self.config)
            peer = stream.socket.getpeername()
        except OSError:  # the peer left before we looked
            return trio.aclose_forcefully(stream)  # noqa: ASYNC105 - awaited by the caller
        return self._serve_stream(stream, f"{peer[0]}:{peer[1]}", own=True)

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
        self._listeners = await open_tcp_listeners(
            config.port, config.host, reuse_port=config.reuse_port
        )
        self.listen_addresses = [
            (str(name[0]), int(name[1]))
            for name in (listener.socket.getsockname() for listener in self._listeners)
        ]
        readiness.start()  # the task that wakes the readers of every socket of the run
        async with trio.open_nursery() as root:
            self._root = root
            handler_nursery: trio.Nursery = await root.start(_open_connections_nursery)
            await root.start(self.hub.run)  # the broker is ready before the first client
            root.start_soon(self._accept, handler_nursery)
            if config.admin_port is not None or config.admin_socket is not None:
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
        # Not hypercorn.trio.serve: one admin connection's error would end the node
        # (pgjones/hypercorn#225). AdminApp.serve contains each connection's failure.
        config = self.config
        if config.admin_socket is not None:  # a worker, answering its supervisor
            listeners = [await open_unix_listener(config.admin_socket)]
        else:
            assert config.admin_port is not None  # started only with an admin port
            listeners = await trio.open_tcp_listeners(config.admin_port, host=config.admin_host)
            self.admin_addresses = [
                (str(name[0]), int(name[1]))
                for name in (listener.socket.getsockname() for listener in listeners)
            ]
        task_status.started()
        await AdminApp(self).serve(listeners)

    async def drain(self) -> None:
        """Drain the node (docs/architecture.md, "Drain"), then stop it.

        ``/readyz`` turns 503, the listeners close, every connection is closed with
        1001, and the node waits up to ``drain_timeout`` for them before cancelling
        what is left. Where the broker is shared with other nodes (Redis), the last
        part of that time (half, at most twice ``close_timeout``) is kept: the
        connections still closing then are cut, and the node parks its sessions
        there (:meth:`Hub.park`), for the nodes their clients resume on to take,
        and waits, within the same ``drain_timeout``, for the
        hand-overs already asked for and for any session it could not park: leaving
        sooner would drop those sessions with the process, and their clients would
        resume with ``resumed: false`` (docs/architecture.md, "Session migration").
        """
        if self.draining:
            return
        self.draining = True
        config = self.config
        deadline = trio.current_time() + config.drain_timeout
        # With a shared broker, the end of the budget is the parking's: taken up by
        # connections slow to close (a node short of CPU under a herd, peers that do
        # not answer the close), it left their sessions to end with the process.
        shared = self.hub.broker.shared
        parking = min(config.drain_timeout / 2, 2 * config.close_timeout) if shared else 0.0
        logger.warning("draining %d connections", len(self.connections))
        self._accepting.cancel()
        for listener in self._listeners:
            await trio.aclose_forcefully(listener)
        for connection in list(self.connections):
            connection.close(CloseCode.GOING_AWAY, "server draining", CloseReason.DRAIN)
        if self.connections:
            with trio.move_on_at(deadline - parking):
                await self._drained.wait()
        if self.connections and shared:
            logger.warning(
                "drain: cutting %d connections to park their sessions", len(self.connections)
            )
            for connection in list(self.connections):
                connection.cut()
            with trio.move_on_at(deadline):
                await self._drained.wait()
        left = len(self.connections)
        if left:
            logger.warning("drain timeout: cancelling %d connections", left)
        elif self.hub.broker.shared and self.hub.sessions:
            with trio.move_on_at(deadline):
                parked = await self.hub.park()
                logger.warning("%d sessions left in the broker for other nodes", parked)
                if self.hub.sessions:
                    logger.warning(
                        "waiting for %d sessions to move to other nodes", len(self.hub.sessions)
                    )
                await self.hub.wait_no_sessions()
            if self.hub.sessions:
                logger.warning("drain timeout: %d sessions did not move", len(self.hub.sessions))
        self._stopped.set()

    def stop(self) -> None:
        """Stop at once: every connection is cancelled, nothing is waited for."""
        self._stopped.set()

    async def _watch_signals(self) -> None:
        assert self._root is not None
        asked = False  # (not draining: two signals at once both came before the drain)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if not (asked or self.draining):
                    asked = True
                    logger.warning("%s: draining", signal.Signals(signum).name)
                    self._root.start_soon(self.drain)
                elif not self.repeat_stops:
                    # A worker: its supervisor's SIGTERM and, from a service manager
                    # that signals every process or Ctrl-C's to the process group, its
                    # own come together. The supervisor stops it by force if need be.
                    logger.warning("%s again: still draining", signal.Signals(signum).name)
                else:
                    logger.warning("%s again: stopping now", signal.Signals(signum).name)
                    self.forced = True
                    self.stop()


def _peer_left(exc: BaseException) -> bool:
    """True if ``exc`` says only that the peer's stream broke (alone, or as every
    exception of a group: trio-websocket raises from a nursery of its own)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_peer_left(inner) for inner in exc.exceptions)
    return isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError)


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
