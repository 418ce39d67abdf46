"""Settings of a gateway node, with the defaults of docs/protocol.md and docs/architecture.md."""

from __future__ import annotations

import enum
import urllib.parse
from dataclasses import dataclass, field

__all__ = ["Config", "SlowConsumerPolicy", "TransportKind", "UserLimitPolicy"]


class SlowConsumerPolicy(enum.StrEnum):
    """What a full outgoing queue does (docs/architecture.md, "One writer")."""

    #: Close the connection with 4004; the session is kept for a resume.
    CLOSE = "close"
    #: Drop the oldest queued control envelope (ping, pong, ack); sequenced
    #: envelopes are never dropped, so with none to drop the connection closes
    #: with 4004 all the same.
    DROP_OLDEST = "drop-oldest"


class UserLimitPolicy(enum.StrEnum):
    """Which connection a user over ``max_connections_per_user`` loses (close 1008)."""

    #: The new connection is refused: a stolen token cannot push the owner out.
    REJECT_NEWEST = "reject-newest"
    #: The user's oldest connection is closed to make room (the last tab opened wins).
    CLOSE_OLDEST = "close-oldest"


class TransportKind(enum.StrEnum):
    """What carries the WebSocket in the standalone server (``--transport``)."""

    #: websockets' sans-I/O protocol driven by the connection's own tasks (fastest).
    WEBSOCKETS = "websockets"
    #: trio-websocket (wsproto underneath).
    TRIO_WEBSOCKET = "trio-websocket"
    #: The gateway as an ASGI application under hypercorn's trio worker.
    ASGI = "asgi"


@dataclass(slots=True)
class Config:
    """Everything a node is told at start-up. Times are seconds; ``None`` disables.

    Every field is also a ``trio-wsgate serve`` flag (``--heartbeat-interval``) and an
    environment variable (``WSGATE_HEARTBEAT_INTERVAL``).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    #: Listen with ``SO_REUSEPORT``, beside other processes listening on the same port
    #: (the workers of ``--workers``): the kernel spreads connections across them.
    reuse_port: bool = False
    path: str = "/ws"
    heartbeat_interval: float | None = 25.0
    heartbeat_timeout: float = 10.0
    #: Pings go out up to this much early, and a silent connection is closed up to this
    #: much late (at most a tenth of the interval), so that the node sends its pings and
    #: checks liveness in batches on a grid of this step, not one wake-up per
    #: connection (docs/benchmarks.md, "Idle"). 0: every time exact.
    heartbeat_slack: float = 0.25
    hello_timeout: float | None = 10.0
    close_timeout: float = 2.0
    drain_timeout: float = 10.0
    window: int = 256
    queue_size: int = 1000
    slow_consumer: SlowConsumerPolicy = SlowConsumerPolicy.CLOSE
    max_message_size: int = 65536
    admin_host: str = "127.0.0.1"
    #: ``None`` turns the admin port off; 0 picks a free port.
    admin_port: int | None = 8001
    #: Serve the admin endpoints on this Unix socket instead of the admin port (how a
    #: worker of ``--workers`` answers its supervisor).
    admin_socket: str | None = None
    keepalive_idle: int = 60
    keepalive_interval: int = 5
    keepalive_count: int = 3
    #: How long an ack may wait after processing (docs/protocol.md §4: at most 100 ms).
    ack_delay: float = 0.1
    #: How long a detached session waits for its client to resume (docs/protocol.md §5);
    #: ``None`` or 0 ends every session with its connection.
    resume_ttl: float | None = 120.0
    #: Most envelopes a session holds unacknowledged while it has no live connection;
    #: past this it is dropped and a later resume gets ``resumed: false``.
    max_buffered: int = 1000
    #: Most bytes of unacknowledged envelopes a session holds (encoded, as sent). Past
    #: it a live connection closes with 4004 and the session ends as it lets go; a
    #: detached session ends at once. Its client recovers by offset (docs/protocol.md,
    #: "Topics").
    max_buffered_bytes: int = 1 << 20
    #: Most bytes of unacknowledged envelopes all live sessions of the node hold
    #: together, looked at every second while they hold any; past it the owner holding
    #: the most (a user, or an anonymous client's address) loses its largest sessions
    #: (4004, and they end).
    max_live_bytes: int = 256 << 20
    #: Most bytes all detached sessions of the node hold together; past it the owner
    #: holding the most (a user, or an anonymous client's address) loses its oldest.
    max_detached_bytes: int = 64 << 20
    #: The key of the resume tokens' HMAC. Nodes that share it accept each other's
    #: tokens; ``None`` draws a random one at start-up (resume then works on this node
    #: only, until it restarts). Never printed: it is left out of ``repr``.
    secret: str | None = field(default=None, repr=False)
    #: The HS256 key of client tokens (docs/protocol.md §3). Never printed.
    jwt_secret: str | None = field(default=None, repr=False)
    #: A PEM file with the RS256 (RSA) or ES256 (EC P-256) public key of client tokens.
    jwt_public_key: str | None = None
    #: If set, tokens must carry this ``aud``.
    jwt_audience: str | None = None
    #: If set, tokens must carry this ``iss``.
    jwt_issuer: str | None = None
    #: Glob patterns of topics every client may subscribe to, beside its token's claim.
    allow_subscribe: tuple[str, ...] = ()
    #: Glob patterns of topics clients may publish to (``pub``). None by default.
    allow_publish: tuple[str, ...] = ()
    #: Most topics a client may subscribe one session to (``sub`` past it: error
    #: ``limit_exceeded``); the user topic counts, the application's own don't.
    max_subscriptions: int = 128
    #: Publications each topic keeps for recovery (docs/protocol.md §6); 0 keeps none.
    history_size: int = 100
    #: Seconds a publication stays in its topic's history; None keeps it until pushed out.
    history_ttl: float | None = 300.0
    #: Bytes of history one topic keeps at most, oldest out first (in-memory broker).
    history_topic_bytes: int = 4 << 20
    #: Bytes of history all topics of the node keep together; past it the oldest
    #: publications go first, whatever their topic (in-memory broker; with Redis the
    #: history lives in Redis, ``history_size`` per topic).
    history_bytes: int = 64 << 20
    #: The key of the server API (``Authorization: apikey <key>``). Never printed.
    api_key: str | None = field(default=None, repr=False)
    #: Serve the server API without a key (local use only).
    open_api: bool = False
    #: This node's name in ``/api/stats`` and logs; None picks ``host-pid-random``.
    node_id: str | None = None
    #: ``redis://host:port/db`` (or ``unix:///path``): the nodes sharing it act as one
    #: gateway. Several, separated by commas, shard the topics and sessions across
    #: them (brokers/sharded.py; every node lists them in the same order). None keeps
    #: everything in this process (the in-memory broker). Never printed (it may hold a
    #: password).
    redis_url: str | None = field(default=None, repr=False)

    @property
    def redis_urls(self) -> list[str]:
        """The Redis instances of :attr:`redis_url`, in order (none: in memory)."""
        urls: list[str] = []
        for part in (self.redis_url or "").split(","):
            part = part.strip()
            if urls and part and "://" not in part:
                urls[-1] += "," + part  # a Sentinel URL's next host:port
            elif part:
                urls.append(part)
        return urls

    #: The prefix of every Redis key and channel, so that several gateways can share one
    #: Redis.
    redis_prefix: str = "wsgate"
    #: What carries the WebSocket (docs/architecture.md, "Layers").
    transport: TransportKind = TransportKind.WEBSOCKETS
    #: The whole opening handshake (request and answer) must finish within this.
    handshake_timeout: float = 10.0
    #: Largest request head (request line and headers), bytes; more is answered 431.
    max_request_head: int = 16384
    #: Most request headers; more are answered 431.
    max_headers: int = 64
    #: Origins allowed to connect (exact match, e.g. ``https://app.example.com``);
    #: others get 403. Empty allows every origin. Requests without ``Origin`` (not
    #: from a browser) are allowed: only browsers send it, and only they need it.
    allowed_origins: tuple[str, ...] = ()
    #: Most WebSocket connections on this node; more get 503 with ``Retry-After``.
    max_connections: int | None = None
    #: Most connections from one IP address; more get 503 with ``Retry-After``.
    max_connections_per_ip: int | None = None
    #: Most live connections of one user; see ``user_limit_policy`` (close 1008).
    max_connections_per_user: int | None = None
    user_limit_policy: UserLimitPolicy = UserLimitPolicy.REJECT_NEWEST
    #: Sockets still in their opening handshake; more are closed at once (slowloris).
    max_handshakes: int = 1000
    #: Of those, most from one IP address still waiting for their whole request head
    #: (counted from accept); more are closed at once, so that one address cannot hold
    #: every slot (docs/operations.md, "Limits against abuse").
    max_handshakes_per_ip: int = 32
    #: New WebSocket connections per second this node accepts (a token bucket of
    #: ``accept_burst``); more get 503 with ``Retry-After``. None: no cap.
    accept_rate: float | None = None
    accept_burst: int = 100
    #: Envelopes (and WebSocket pings) per second one connection may send, a token
    #: bucket of ``rate_burst``; more: close 4009. None: no limit.
    rate_limit: float | None = None
    rate_burst: int | None = None
    #: Most frames one fragmented message may arrive in; more: close 1009.
    max_fragments: int = 1024
    #: Offer permessage-deflate (websockets transport). Decompressed messages are
    #: held to ``max_message_size`` like any other.
    compression: bool = False

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError("window must be at least 1")
        if self.queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        if self.max_message_size < 256:
            raise ValueError("max_message_size must be at least 256 bytes")
        if self.close_timeout <= 0:
            raise ValueError("close_timeout must be positive")
        if self.heartbeat_slack < 0:
            raise ValueError("heartbeat_slack must not be negative")
        if self.max_buffered < 0:
            raise ValueError("max_buffered must not be negative")
        if min(self.max_buffered_bytes, self.max_detached_bytes, self.max_live_bytes) < 1:
            raise ValueError(
                "max_buffered_bytes, max_detached_bytes and max_live_bytes must be positive"
            )
        if self.secret is not None and len(self.secret) < 16:
            raise ValueError("secret must be at least 16 characters")
        if self.jwt_secret is not None and self.jwt_public_key is not None:
            raise ValueError("give jwt_secret or jwt_public_key, not both")
        if self.jwt_secret is not None and len(self.jwt_secret.encode()) < 32:
            # RFC 7518 §3.2: an HS256 key has at least 256 bits.
            raise ValueError("jwt_secret must be at least 32 bytes (RFC 7518 §3.2)")
        if self.api_key == "":
            raise ValueError("api_key must not be empty")
        if self.history_topic_bytes < 1 or self.history_bytes < 1:
            raise ValueError("history_topic_bytes and history_bytes must be positive")
        if self.max_subscriptions < 1:
            raise ValueError("max_subscriptions must be at least 1")
        if self.history_size < 0:
            raise ValueError("history_size must not be negative")
        self.allow_subscribe = tuple(self.allow_subscribe)
        self.allow_publish = tuple(self.allow_publish)
        if not self.path.startswith("/"):
            raise ValueError("path must start with '/'")
        self.slow_consumer = SlowConsumerPolicy(self.slow_consumer)
        self.transport = TransportKind(self.transport)
        self.user_limit_policy = UserLimitPolicy(self.user_limit_policy)
        self.allowed_origins = tuple(self.allowed_origins)
        for name in ("max_connections", "max_connections_per_ip", "max_connections_per_user"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or unset)")
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ValueError("rate_limit must be positive (or unset)")
        if self.accept_rate is not None and self.accept_rate <= 0:
            raise ValueError("accept_rate must be positive (or unset)")
        if self.rate_burst is not None and self.rate_burst < 1:
            raise ValueError("rate_burst must be at least 1")
        if min(self.accept_burst, self.max_fragments, self.max_handshakes) < 1:
            raise ValueError("accept_burst, max_fragments and max_handshakes must be at least 1")
        if self.max_handshakes_per_ip < 1:
            raise ValueError("max_handshakes_per_ip must be at least 1")
        if self.handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be positive")
        if self.compression and self.transport is not TransportKind.WEBSOCKETS:
            raise ValueError("compression is offered by the websockets transport only")
        # Refused here, with why, rather than breaking every connection at run time.
        for name, low in (("port", 0), ("admin_port", 0)):
            value = getattr(self, name)
            if value is not None and not low <= value <= 65535:
                raise ValueError(f"{name} must be a TCP port (0-65535; 0 picks a free one)")
        for name in ("heartbeat_interval", "hello_timeout", "history_ttl"):
            value = getattr(self, name)
            if value is not None and not value > 0:  # (NaN is refused too)
                raise ValueError(f"{name} must be positive (or unset)")
        for name in ("heartbeat_timeout", "drain_timeout", "ack_delay", "resume_ttl"):
            value = getattr(self, name)
            if value is not None and not value >= 0:  # (resume_ttl 0: no resume)
                raise ValueError(f"{name} must not be negative")
        # Linux's bounds (tcp(7)): outside them every accepted socket fails to be set.
        for name, high in (
            ("keepalive_idle", 32767),
            ("keepalive_interval", 32767),
            ("keepalive_count", 127),
        ):
            if not 1 <= getattr(self, name) <= high:
                raise ValueError(f"{name} must be between 1 and {high}")
        for url in self.redis_urls:
            _check_redis_url(url)
        if self.max_request_head < 1024 or self.max_headers < 8:
            # Below these no browser's upgrade request fits: every one would be 431.
            raise ValueError("max_request_head must be at least 1024 and max_headers at least 8")


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")


def _check_redis_url(url: str) -> None:
    """Refuse a Redis URL coredis would read as something else (an unknown scheme was
    taken for ``redis://localhost:6379``); never showing the URL (it may hold a
    password)."""
    if not url.startswith(_REDIS_SCHEMES):
        raise ValueError(f"a Redis URL starts with one of {', '.join(_REDIS_SCHEMES)}")
    if url.startswith(("redis://", "rediss://")):
        try:
            urllib.parse.urlsplit(url).port  # noqa: B018 - raises on a port that is not one
        except ValueError:
            raise ValueError("a Redis URL's port is a number from 0 to 65535") from None
