"""``trio-wsgate serve`` runs a gateway node; ``trio-wsgate client`` talks to one;
``trio-wsgate token USER`` signs a development token.

Every ``serve`` flag can also come from the environment as ``WSGATE_<FLAG>``
(``--heartbeat-interval`` is ``WSGATE_HEARTBEAT_INTERVAL``); a flag on the command line
wins. ``--secret`` is best given as ``WSGATE_SECRET``, out of the process list.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from .config import Config, SlowConsumerPolicy, TransportKind, UserLimitPolicy
from .gateway import Gateway
from .logs import install_redaction
from .server import Server
from .workers import WORKER_ENV, Supervisor

__all__ = ["build_parser", "config_from_args", "load_app", "main"]

logger = logging.getLogger("trio_wsgate")


def load_app(spec: str) -> Gateway:
    """Load ``MODULE:ATTR`` or ``path/to/file.py:ATTR`` and return the Gateway there."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"--app must look like MODULE:ATTR or path/file.py:ATTR, not {spec!r}")
    if module_name.endswith(".py") or "/" in module_name:
        path = Path(module_name).resolve()
        if not path.is_file():
            raise SystemExit(f"--app: no file {module_name}")
        loader_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert loader_spec is not None
        assert loader_spec.loader is not None
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[path.stem] = module
        loader_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    app = getattr(module, attr, None)
    if not isinstance(app, Gateway):
        raise SystemExit(f"--app: {spec} is not a trio_wsgate.Gateway")
    return app


def _default_app() -> Gateway:
    gateway = Gateway()

    @gateway.on("echo")
    async def echo(session: Any, data: Any) -> Any:
        return data

    return gateway


def _seconds_or_none(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "0") else float(text)


def _count_or_none(text: str) -> int | None:
    return None if text.lower() in ("none", "off", "0") else int(text)


# (flag, Config field or None, type, help)
_FLAGS: list[tuple[str, str, Callable[[str], Any], str]] = [
    ("host", "host", str, "address to listen on"),
    ("port", "port", int, "WebSocket port (0 picks a free one)"),
    ("path", "path", str, "WebSocket path"),
    ("heartbeat-interval", "heartbeat_interval", _seconds_or_none, "seconds between pings"),
    ("heartbeat-timeout", "heartbeat_timeout", float, "grace after a missed interval"),
    ("heartbeat-slack", "heartbeat_slack", float, "grid of pings and liveness checks, seconds"),
    ("hello-timeout", "hello_timeout", _seconds_or_none, "seconds to wait for hello"),
    ("close-timeout", "close_timeout", float, "bound on every close, seconds"),
    ("drain-timeout", "drain_timeout", float, "seconds to wait for connections to go on drain"),
    ("window", "window", int, "unacknowledged envelopes in flight per direction"),
    ("queue-size", "queue_size", int, "outgoing envelopes queued per connection"),
    ("slow-consumer", "slow_consumer", SlowConsumerPolicy, "close (4004) or drop-oldest"),
    ("max-message-size", "max_message_size", int, "largest message accepted, bytes"),
    ("admin-host", "admin_host", str, "address of the admin port"),
    ("admin-port", "admin_port", int, "admin port (0 turns it off)"),
    ("admin-socket", "admin_socket", str, "serve the admin endpoints on this Unix socket instead"),
    ("keepalive-idle", "keepalive_idle", int, "TCP keepalive idle, seconds"),
    ("keepalive-interval", "keepalive_interval", int, "TCP keepalive interval, seconds"),
    ("keepalive-count", "keepalive_count", int, "TCP keepalive probes"),
    ("resume-ttl", "resume_ttl", _seconds_or_none, "seconds a dropped session waits for a resume"),
    ("max-buffered", "max_buffered", int, "envelopes a dropped session buffers at most"),
    ("max-buffered-bytes", "max_buffered_bytes", int, "unacknowledged bytes per session"),
    ("max-detached-bytes", "max_detached_bytes", int, "bytes all dropped sessions hold"),
    ("max-live-bytes", "max_live_bytes", int, "unacknowledged bytes all live sessions hold"),
    ("secret", "secret", str, "HMAC key of resume tokens, shared by the nodes of a cluster"),
    ("jwt-secret", "jwt_secret", str, "HS256 key of client tokens (no key: anonymous)"),
    ("jwt-public-key", "jwt_public_key", str, "PEM file: RS256 or ES256 key of client tokens"),
    ("jwt-audience", "jwt_audience", str, "tokens must carry this aud"),
    ("jwt-issuer", "jwt_issuer", str, "tokens must carry this iss"),
    ("max-subscriptions", "max_subscriptions", int, "topics a client subscribes a session to"),
    ("history-size", "history_size", int, "publications each topic keeps for recovery"),
    ("history-ttl", "history_ttl", _seconds_or_none, "seconds a publication stays in history"),
    ("history-topic-bytes", "history_topic_bytes", int, "bytes of history per topic"),
    ("history-bytes", "history_bytes", int, "bytes of history of all topics (in memory)"),
    ("api-key", "api_key", str, "key of the server API (Authorization: apikey KEY)"),
    ("node-id", "node_id", str, "this node's name in /api/stats (default host-pid-random)"),
    ("redis-prefix", "redis_prefix", str, "prefix of the gateway's Redis keys and channels"),
    ("transport", "transport", TransportKind, "websockets, trio-websocket or asgi"),
    ("handshake-timeout", "handshake_timeout", float, "bound on the opening handshake, seconds"),
    ("max-request-head", "max_request_head", int, "largest request head, bytes (431 above)"),
    ("max-headers", "max_headers", int, "most request headers (431 above)"),
    ("max-connections", "max_connections", _count_or_none, "connections on this node (503)"),
    ("max-connections-per-ip", "max_connections_per_ip", _count_or_none, "per address (503)"),
    (
        "max-connections-per-user",
        "max_connections_per_user",
        _count_or_none,
        "live connections of one user (close 1008)",
    ),
    ("user-limit-policy", "user_limit_policy", UserLimitPolicy, "reject-newest or close-oldest"),
    ("max-handshakes", "max_handshakes", int, "sockets in their handshake at once"),
    ("max-handshakes-per-ip", "max_handshakes_per_ip", int, "of those, from one address"),
    ("accept-rate", "accept_rate", _seconds_or_none, "new connections per second (503 above)"),
    ("accept-burst", "accept_burst", int, "new connections at once after a quiet spell"),
    ("rate-limit", "rate_limit", _seconds_or_none, "envelopes per second per connection (4009)"),
    ("rate-burst", "rate_burst", _count_or_none, "envelopes at once; unset: twice the rate"),
    ("max-fragments", "max_fragments", int, "frames one message may come in (1009 above)"),
]
# Flags whose value is never shown (not even as a default in --help).
_SECRET_FLAGS = frozenset({"secret", "jwt-secret", "api-key", "redis"})
# Repeatable flags; from the environment, a comma-separated list.
_LIST_FLAGS: list[tuple[str, str, str]] = [
    (
        "redis",
        "redis_url",
        "redis://host:port/db (or unix:///path): the nodes sharing it act as one gateway;"
        " given several times, topics and sessions are sharded across them",
    ),
    ("allow-subscribe", "allow_subscribe", "topic glob any client may subscribe to (repeatable)"),
    ("allow-publish", "allow_publish", "topic glob any client may publish to (repeatable)"),
    ("allowed-origin", "allowed_origins", "an Origin allowed to connect, exact (repeatable)"),
]


def _env(flag: str) -> str | None:
    return os.environ.get("WSGATE_" + flag.upper().replace("-", "_"))


_LOG_LEVELS = ["debug", "info", "warning", "error"]


def _truthy(value: str | None) -> bool:
    """A switch from the environment: 1, true, yes or on, in any case."""
    return value is not None and value.strip().lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser, defaults taken from the environment."""
    parser = argparse.ArgumentParser(prog="trio-wsgate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run a gateway node")
    defaults = Config()
    for flag, field, kind, text in _FLAGS:
        default = getattr(defaults, field)
        env = _env(flag)
        if env is not None:
            # As a string: argparse converts it as it would the flag's value, and a
            # bad one is a usage error of ``serve`` alone, not a traceback of every
            # subcommand while the parser is built.
            default = env
        shown = "set" if default is not None else "unset"
        if flag == "secret" and default is None:
            shown = "random per process"
        if flag not in _SECRET_FLAGS:
            shown = str(default)
        serve.add_argument(
            f"--{flag}", dest=field, type=kind, default=default, help=f"{text} (default {shown})"
        )
    for flag, field, text in _LIST_FLAGS:
        env = _env(flag)
        serve.add_argument(
            f"--{flag}",
            dest=field,
            action="append",
            default=None,
            metavar="URL" if flag == "redis" else "PATTERN",
            help=f"{text}; WSGATE_{flag.upper().replace('-', '_')} takes a comma-separated list"
            + (f" (default {env})" if env and flag not in _SECRET_FLAGS else ""),
        )
    serve.add_argument(
        "--workers",
        type=int,
        default=_env("workers") or 1,
        help="node processes on one port, sharing a Redis (a private one without --redis)"
        " (default %(default)s)",
    )
    serve.add_argument(
        "--reuse-port",
        action="store_true",
        default=_truthy(_env("reuse-port")),
        help="listen with SO_REUSEPORT, beside other processes on the same port",
    )
    serve.add_argument(
        "--open-api",
        action="store_true",
        default=_truthy(_env("open-api")),
        help="serve the server API without a key: for local use only",
    )
    serve.add_argument(
        "--compression",
        action="store_true",
        default=_truthy(_env("compression")),
        help="offer permessage-deflate (websockets transport; off by default)",
    )
    serve.add_argument(
        "--app",
        default=_env("app"),
        help="the application: MODULE:ATTR or path/file.py:ATTR (default: a bare echo gateway)",
    )
    serve.add_argument(
        "--log-level",
        type=str.lower,
        default=_env("log-level") or "info",
        choices=_LOG_LEVELS,
    )
    echo = commands.add_parser(
        "raw-echo",
        help="the raw-echo profile: echo WebSocket messages, for conformance tests only",
        description="Echo every WebSocket message on 127.0.0.1, through the node's accept "
        "loop, handshake and transport, without the wsgate protocol: what the Autobahn "
        "suite (scripts/conformance) drives. Loopback only; not a server to expose.",
    )
    echo.add_argument("--transport", default="websockets", type=TransportKind)
    echo.add_argument("--port", type=int, default=9001, help="0 picks a free one (logged)")
    echo.add_argument("--host", default="127.0.0.1", help="a loopback address")
    client = commands.add_parser(
        "client",
        help="talk to a gateway: one request, or an interactive session",
        description=(
            "With EVENT, send one request and print the reply's data as JSON. Without, "
            "read lines from stdin: 'EVENT [JSON]' (a request), '!send EVENT [JSON]' "
            "(fire and forget), '!sub TOPIC', '!unsub TOPIC' or '!pub TOPIC JSON'; "
            "replies and server messages are printed as they come."
        ),
    )
    client.add_argument("url", help="ws://host:port/ws")
    client.add_argument("event", nargs="?", help="the event of a single request")
    client.add_argument("data", nargs="?", help="its data, as JSON (default null)")
    client.add_argument("--token", default=_env("token"), help="a token for hello")
    client.add_argument("--encoding", choices=["json", "msgpack"], default="json")
    client.add_argument(
        "--max-attempts", type=int, default=5, help="connection attempts in a row (default 5)"
    )
    client.add_argument("--log-level", default="warning", choices=["debug", "info", "warning"])
    token = commands.add_parser(
        "token",
        help="print an HS256 token for a user (development and tests)",
        description="Sign a JWT with the --jwt-secret of a node (default: $WSGATE_JWT_SECRET).",
    )
    token.add_argument("user", help="the sub claim")
    token.add_argument(
        "--topic", action="append", default=[], help="a topics claim pattern (repeatable)"
    )
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds until exp (0: no exp)")
    token.add_argument("--audience", default=_env("jwt-audience"), help="the aud claim")
    token.add_argument("--issuer", default=_env("jwt-issuer"), help="the iss claim")
    return parser


def _print_token(args: argparse.Namespace) -> None:
    import time

    import jwt

    secret = _env("jwt-secret")
    if not secret:
        raise SystemExit("trio-wsgate token: set WSGATE_JWT_SECRET to the node's --jwt-secret")
    claims: dict[str, Any] = {"sub": args.user, "iat": int(time.time())}
    if args.ttl:
        claims["exp"] = int(time.time() + args.ttl)
    if args.topic:
        claims["topics"] = args.topic
    if args.audience:
        claims["aud"] = args.audience
    if args.issuer:
        claims["iss"] = args.issuer
    print(jwt.encode(claims, secret, algorithm="HS256"))


def _raw_echo(args: argparse.Namespace) -> None:
    from .testing.raw_echo import RawEchoServer, raw_echo_config

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server = RawEchoServer(raw_echo_config(args.transport, args.port, args.host))
    except ValueError as exc:
        raise SystemExit(f"trio-wsgate raw-echo: {exc}") from None

    def announce() -> None:
        for host, port in server.listen_addresses:
            logger.info("raw echo (%s) on ws://%s:%d/", args.transport, host, port)

    _run_node(server, announce)


#: The cyclic garbage collector's thresholds for a node process (CPython's are 700, 10,
#: 10). A node holds many long-lived objects (sessions, their queues, the tasks of every
#: connection) and allocates a few short-lived ones per message; at the default a
#: full collection walks all of them often, which halved fan-out throughput in
#: bench/ (docs/benchmarks.md). Cycles are still collected, in larger batches.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Collect garbage in larger batches, and never scan what start-up left behind."""
    gc.collect()
    gc.freeze()  # modules, the app, the config: alive for the life of the process
    gc.set_threshold(*GC_THRESHOLDS)


def _run_node(server: Server, announce: Callable[[], None]) -> None:
    """Serve until drained by a signal; ``announce`` once listening."""

    listening = False

    async def run() -> None:
        nonlocal listening
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: server.serve(handle_signals=True, task_status=task_status)
            )
            listening = True
            announce()
            tune_gc()

    try:
        trio.run(run)
    except* OSError as group:
        if listening:
            raise
        # A port in use, or not ours to take: a line, not a traceback.
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise SystemExit(f"trio-wsgate: cannot listen: {first}") from None


def config_from_args(args: argparse.Namespace) -> Config:
    """The node's settings from parsed ``serve`` arguments (and the environment).

    Raises:
        ValueError: a setting is out of range.
    """
    settings = {field: getattr(args, field) for _, field, _, _ in _FLAGS}
    settings["admin_port"] = settings["admin_port"] or None  # 0 turns it off
    for flag, field, _ in _LIST_FLAGS:
        given = getattr(args, field)
        if given is None:
            given = [p.strip() for p in (_env(flag) or "").split(",") if p.strip()]
        settings[field] = tuple(given)
    settings["redis_url"] = ",".join(settings["redis_url"]) or None
    settings["open_api"] = args.open_api
    settings["reuse_port"] = args.reuse_port
    settings["compression"] = args.compression
    return Config(**settings)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``trio-wsgate`` and ``python -m trio_wsgate``."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "client" and extra and not any(word.startswith("-") for word in extra):
        # argparse takes a subcommand's positionals in one go: after an option
        # (``client URL --token T echo DATA``), the event and its data come here.
        missing = [name for name in ("event", "data") if getattr(args, name) is None]
        if len(extra) > len(missing):
            parser.error(f"unrecognized arguments: {' '.join(extra[len(missing) :])}")
        for name, value in zip(missing, extra, strict=False):
            setattr(args, name, value)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "client":
        from ._client_cli import run_client

        sys.exit(run_client(args))
    if args.command == "token":
        _print_token(args)
        return
    if args.command == "raw-echo":
        _raw_echo(args)
        return
    if args.log_level not in _LOG_LEVELS:  # (argparse checks a flag's, not a default's)
        parser.error(f"--log-level (WSGATE_LOG_LEVEL) is one of {', '.join(_LOG_LEVELS)}")
    worker = os.environ.get(WORKER_ENV)  # set by the supervisor of --workers
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s "
        + (f"[worker {worker}] " if worker else "")
        + "%(name)s: %(message)s",
    )
    try:
        config = config_from_args(args)
    except ValueError as exc:
        raise SystemExit(f"trio-wsgate: {exc}") from None
    if worker and config.node_id is not None:
        # Each worker is a node of its own: with one name, a resume on another worker
        # took the session's holder for itself and never asked for a hand-over.
        config = dataclasses.replace(config, node_id=f"{config.node_id}-w{worker}")
    install_redaction(
        s for s in (config.secret, config.jwt_secret, config.api_key, *config.redis_urls) if s
    )
    if args.workers != 1:
        try:
            supervisor = Supervisor(sys.argv[1:] if argv is None else argv, config, args.workers)
        except ValueError as exc:
            raise SystemExit(f"trio-wsgate: {exc}") from None
        sys.exit(supervisor.serve())
    if args.app:
        sys.path.insert(0, os.getcwd())
        gateway = load_app(args.app)
    else:
        gateway = _default_app()
    try:
        server = Server(gateway, config)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"trio-wsgate: {exc}") from None
    server.repeat_stops = not worker

    def announce() -> None:
        for host, port in server.listen_addresses:
            logger.info("listening on ws://%s:%d%s", host, port, config.path)
            if config.transport is not TransportKind.TRIO_WEBSOCKET:
                pages = " ".join(sorted(server.files))
                logger.info("serving http://%s:%d (%s)", host, port, pages)
        for host, port in server.admin_addresses:
            logger.info("admin on http://%s:%d (/healthz /readyz /metrics /api)", host, port)
        if server.authenticator is None:
            logger.warning(
                "ANONYMOUS MODE: no --jwt-secret or --jwt-public-key is configured, "
                "so every client is accepted without a token"
            )
        if config.admin_port is not None and config.api_key is None:
            if config.open_api:
                logger.warning("the server API is OPEN (--open-api): anyone may use it")
            else:
                logger.info("the server API answers 403: no --api-key is configured")

    _run_node(server, announce)
    if server.forced:
        sys.exit(1)
