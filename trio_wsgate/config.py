"""Settings of a gateway node, with the defaults of PROTOCOL.md and DESIGN.md."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["Config", "SlowConsumerPolicy"]


class SlowConsumerPolicy(enum.StrEnum):
    """What a full outgoing queue does (DESIGN.md, "One writer")."""

    #: Close the connection with 4004; the session is kept for a resume.
    CLOSE = "close"
    #: Drop the oldest queued control envelope (ping, pong, ack); sequenced
    #: envelopes are never dropped, so with none to drop the connection closes
    #: with 4004 all the same.
    DROP_OLDEST = "drop-oldest"


@dataclass(slots=True)
class Config:
    """Everything a node is told at start-up. Times are seconds; ``None`` disables.

    Every field is also a ``trio-wsgate serve`` flag (``--heartbeat-interval``) and an
    environment variable (``WSGATE_HEARTBEAT_INTERVAL``).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    path: str = "/ws"
    heartbeat_interval: float | None = 25.0
    heartbeat_timeout: float = 10.0
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
    keepalive_idle: int = 60
    keepalive_interval: int = 5
    keepalive_count: int = 3
    #: How long an ack may wait after processing (PROTOCOL.md §4: at most 100 ms).
    ack_delay: float = 0.1
    #: How long a detached session waits for its client to resume (PROTOCOL.md §5);
    #: ``None`` or 0 ends every session with its connection.
    resume_ttl: float | None = 120.0
    #: Most envelopes a session holds unacknowledged while it has no live connection;
    #: past this it is dropped and a later resume gets ``resumed: false``.
    max_buffered: int = 1000
    #: The key of the resume tokens' HMAC. Nodes that share it accept each other's
    #: tokens; ``None`` draws a random one at start-up (resume then works on this node
    #: only, until it restarts). Never printed: it is left out of ``repr``.
    secret: str | None = field(default=None, repr=False)
    #: The HS256 key of client tokens (PROTOCOL.md §3). Never printed.
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
    #: Publications each topic keeps for recovery (PROTOCOL.md §6); 0 keeps none.
    history_size: int = 100
    #: Seconds a publication stays in its topic's history; None keeps it until pushed out.
    history_ttl: float | None = 300.0
    #: The key of the server API (``Authorization: apikey <key>``). Never printed.
    api_key: str | None = field(default=None, repr=False)
    #: Serve the server API without a key (local use only).
    open_api: bool = False
    #: This node's name in ``/api/stats`` and logs; None picks ``host-pid-random``.
    node_id: str | None = None
    #: ``redis://host:port/db``: the nodes sharing it act as one gateway. None keeps
    #: everything in this process (the in-memory broker). Never printed (it may hold a
    #: password).
    redis_url: str | None = field(default=None, repr=False)
    #: The prefix of every Redis key and channel, so that several gateways can share one
    #: Redis.
    redis_prefix: str = "wsgate"

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError("window must be at least 1")
        if self.queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        if self.max_message_size < 256:
            raise ValueError("max_message_size must be at least 256 bytes")
        if self.close_timeout <= 0:
            raise ValueError("close_timeout must be positive")
        if self.max_buffered < 0:
            raise ValueError("max_buffered must not be negative")
        if self.secret is not None and len(self.secret) < 16:
            raise ValueError("secret must be at least 16 characters")
        if self.jwt_secret is not None and self.jwt_public_key is not None:
            raise ValueError("give jwt_secret or jwt_public_key, not both")
        if self.jwt_secret is not None and len(self.jwt_secret.encode()) < 32:
            # RFC 7518 §3.2: an HS256 key has at least 256 bits.
            raise ValueError("jwt_secret must be at least 32 bytes (RFC 7518 §3.2)")
        if self.api_key == "":
            raise ValueError("api_key must not be empty")
        if self.history_size < 0:
            raise ValueError("history_size must not be negative")
        self.allow_subscribe = tuple(self.allow_subscribe)
        self.allow_publish = tuple(self.allow_publish)
        if not self.path.startswith("/"):
            raise ValueError("path must start with '/'")
        self.slow_consumer = SlowConsumerPolicy(self.slow_consumer)
