"""Shared fixtures: a server for in-memory connections, and a task counter."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio

from trio_wsgate import Config, Gateway, HandlerError, Server, Session
from trio_wsgate.gateway import Handler
from trio_wsgate.metrics import count_tasks

from .redis_server import RedisServer, redis_binary


def make_gateway() -> Gateway:
    """The application used by most tests."""
    gateway = Gateway()

    @gateway.on("echo")
    async def echo(session: Session, data: Any) -> Any:
        return data

    @gateway.on("sleep")
    async def sleep(session: Session, data: Any) -> Any:
        await trio.sleep(data)
        return data

    @gateway.on("fail")
    async def fail(session: Session, data: Any) -> Any:
        raise RuntimeError("the handler broke")

    @gateway.on("refuse")
    async def refuse(session: Session, data: Any) -> Any:
        raise HandlerError("not_allowed", "no, thanks")

    @gateway.on("push")
    async def push(session: Session, data: Any) -> int:
        for i in range(data):
            session.send("pushed", i)
        return int(data)

    # Each of the above but "sleep" has no await: it runs in the reader's step
    # (dispatch.never_waits). Its "-waiting" twin awaits first, so it runs in the
    # dispatcher's task: tests of what a handler does take both ways.
    for event, handler in list(gateway.handlers.items()):
        if event != "sleep":
            gateway.on(f"{event}-waiting")(_waiting(handler))
    return gateway


def _waiting(handler: Handler) -> Handler:
    async def waiting(session: Session, data: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return await handler(session, data)

    return waiting


#: The two ways a handler runs: in the reader's step (it never waits), or in the
#: dispatcher's task (it does): the suffix of make_gateway's handler names. Over the
#: transports that cannot tell a read held one message (trio-websocket, ASGI), both
#: run in the dispatcher's task.
HANDLER_WAYS = pytest.mark.parametrize(
    "way", ["", "-waiting"], ids=["in-the-reader", "in-the-dispatcher"]
)


#: Every transport (docs/architecture.md, "Layers"); the behaviour suite runs over each.
ALL_TRANSPORTS = ("websockets", "trio-websocket", "asgi")
#: The transports with wsproto underneath (trio-websocket, and hypercorn's ASGI).
WSPROTO_TRANSPORTS = ("trio-websocket", "asgi")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Tests that make a server run over the transports their module or their own
    # ``transports`` marker names (the closest marker wins); by default, the default.
    if "transport" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("transports")
        metafunc.parametrize("transport", marker.args if marker else ("websockets",))


@pytest.fixture
def make_server(transport: str) -> Callable[..., Server]:
    def factory(gateway: Gateway | None = None, **settings: Any) -> Server:
        settings.setdefault("admin_port", None)
        settings.setdefault("transport", transport)
        return Server(gateway or make_gateway(), Config(**settings))

    return factory


@pytest.fixture
def tasks() -> Callable[[], int]:
    """Count the live trio tasks (what ``wsgate_tasks`` reports)."""
    return count_tasks


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server on a free port for one test (skips if none is installed)."""
    server = RedisServer(redis_binary())
    server.start()
    try:
        yield server
    finally:
        server.kill()
