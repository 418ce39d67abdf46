"""``trio-wsgate serve`` runs a gateway node; ``trio-wsgate client`` talks to one.

Every ``serve`` flag can also come from the environment as ``WSGATE_<FLAG>``
(``--heartbeat-interval`` is ``WSGATE_HEARTBEAT_INTERVAL``); a flag on the command line
wins. ``--secret`` is best given as ``WSGATE_SECRET``, out of the process list.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from .config import Config, SlowConsumerPolicy
from .gateway import Gateway
from .server import Server

__all__ = ["load_app", "main"]

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


# (flag, Config field or None, type, help)
_FLAGS: list[tuple[str, str, Callable[[str], Any], str]] = [
    ("host", "host", str, "address to listen on"),
    ("port", "port", int, "WebSocket port (0 picks a free one)"),
    ("path", "path", str, "WebSocket path"),
    ("heartbeat-interval", "heartbeat_interval", _seconds_or_none, "seconds between pings"),
    ("heartbeat-timeout", "heartbeat_timeout", float, "grace after a missed interval"),
    ("hello-timeout", "hello_timeout", _seconds_or_none, "seconds to wait for hello"),
    ("close-timeout", "close_timeout", float, "bound on every close, seconds"),
    ("drain-timeout", "drain_timeout", float, "seconds to wait for connections to go on drain"),
    ("window", "window", int, "unacknowledged envelopes in flight per direction"),
    ("queue-size", "queue_size", int, "outgoing envelopes queued per connection"),
    ("slow-consumer", "slow_consumer", SlowConsumerPolicy, "close (4004) or drop-oldest"),
    ("max-message-size", "max_message_size", int, "largest message accepted, bytes"),
    ("admin-host", "admin_host", str, "address of the admin port"),
    ("admin-port", "admin_port", int, "admin port (0 turns it off)"),
    ("keepalive-idle", "keepalive_idle", int, "TCP keepalive idle, seconds"),
    ("keepalive-interval", "keepalive_interval", int, "TCP keepalive interval, seconds"),
    ("keepalive-count", "keepalive_count", int, "TCP keepalive probes"),
    ("resume-ttl", "resume_ttl", _seconds_or_none, "seconds a dropped session waits for a resume"),
    ("max-buffered", "max_buffered", int, "envelopes a dropped session buffers at most"),
    ("secret", "secret", str, "HMAC key of resume tokens, shared by the nodes of a cluster"),
]
# Flags whose value is never shown (not even as a default in --help).
_SECRET_FLAGS = frozenset({"secret"})


def _env(flag: str) -> str | None:
    return os.environ.get("WSGATE_" + flag.upper().replace("-", "_"))


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
            default = kind(env)
        shown = "set" if default is not None else "random per process"
        if flag not in _SECRET_FLAGS:
            shown = str(default)
        serve.add_argument(
            f"--{flag}", dest=field, type=kind, default=default, help=f"{text} (default {shown})"
        )
    serve.add_argument(
        "--app",
        default=_env("app"),
        help="the application: MODULE:ATTR or path/file.py:ATTR (default: a bare echo gateway)",
    )
    serve.add_argument(
        "--log-level",
        default=_env("log-level") or "info",
        choices=["debug", "info", "warning", "error"],
    )
    client = commands.add_parser(
        "client",
        help="talk to a gateway: one request, or an interactive session",
        description=(
            "With EVENT, send one request and print the reply's data as JSON. Without, "
            "read lines 'EVENT [JSON]' (a request) or '!send EVENT [JSON]' (fire and "
            "forget) from stdin and print replies and server messages as they come."
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
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``trio-wsgate`` and ``python -m trio_wsgate``."""
    args = build_parser().parse_args(argv)
    if args.command == "client":
        from ._client_cli import run_client

        sys.exit(run_client(args))
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = {field: getattr(args, field) for _, field, _, _ in _FLAGS}
        settings["admin_port"] = settings["admin_port"] or None  # 0 turns it off
        config = Config(**settings)
    except ValueError as exc:
        raise SystemExit(f"trio-wsgate: {exc}") from None
    if args.app:
        sys.path.insert(0, os.getcwd())
        gateway = load_app(args.app)
    else:
        gateway = _default_app()
    server = Server(gateway, config)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: server.serve(handle_signals=True, task_status=task_status)
            )
            for host, port in server.listen_addresses:
                logger.info("listening on ws://%s:%d%s", host, port, config.path)
            for host, port in server.admin_addresses:
                logger.info("admin on http://%s:%d (/healthz /readyz /metrics)", host, port)
            logger.warning(
                "no token key is configured: running anonymous, every client is accepted"
            )

    trio.run(run)
    if server.forced:
        sys.exit(1)
