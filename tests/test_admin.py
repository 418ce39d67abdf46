"""The admin port (hypercorn) over real sockets: its failures stay its own, and /api/ keys."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
from websockets.exceptions import InvalidStatus
from websockets.trio.client import connect

from trio_wsgate import Server

from .conftest import ALL_TRANSPORTS
from .helpers import http_get
from .test_api import AUTH, api_node, call

# A well-formed WebSocket upgrade request; issue 18, case 1 sends it with one byte more.
UPGRADE = (
    b"GET /ws HTTP/1.1\r\n"
    b"Host: 127.0.0.1\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"\r\n"
)


@pytest.fixture
async def node(make_server: Callable[..., Server]) -> AsyncIterator[Server]:
    server = make_server(port=0, admin_port=0, close_timeout=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


def internal_errors(server: Server) -> float | None:
    return server.metrics.registry.get_sample_value("wsgate_internal_errors_total")


async def send_raw(port: int, data: bytes) -> bytes:
    """Send ``data`` on a plain socket; the first bytes of the answer (b"" on a reset)."""
    sock = trio.socket.socket()
    with sock:
        await sock.connect(("127.0.0.1", port))
        await sock.send(data)
        with trio.fail_after(10):
            try:
                return await sock.recv(4096)
            except ConnectionResetError:
                return b""


async def says_hello(server: Server) -> bool:
    host, port = server.listen_addresses[0]
    async with connect(f"ws://{host}:{port}/ws", ping_interval=None) as ws:
        await ws.send(json.dumps({"type": "hello"}))
        return bool(json.loads(await ws.recv())["type"] == "welcome")


@pytest.mark.transports(*ALL_TRANSPORTS)
@pytest.mark.parametrize("extra", [b"x", b"\0"], ids=["byte", "nul"])
@pytest.mark.parametrize("where", ["admin", "websocket"])
async def test_a_malformed_upgrade_leaves_both_ports_serving(
    node: Server, where: str, extra: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 18, case 1: hypercorn's own code raised into the node's nursery (exit 1)."""
    caplog.set_level(logging.DEBUG, "trio_wsgate")
    admin_port = node.admin_addresses[0][1]
    port = admin_port if where == "admin" else node.listen_addresses[0][1]
    for _ in range(3):
        await send_raw(port, UPGRADE + extra)
        # The node still answers on both ports.
        assert (await http_get(admin_port, "/healthz"))[0] == 200
        assert await says_hello(node)
    # The peer broke HTTP: that is no internal error, and it is not logged as one.
    assert internal_errors(node) == 0
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


async def test_any_failure_of_an_admin_connection_stays_in_its_task(
    node: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever hypercorn raises for one connection: logged once, counted, port kept."""
    from hypercorn.trio.tcp_server import TCPServer

    run = TCPServer.run
    failures = [RuntimeError("hypercorn broke")]

    async def failing_run(self: TCPServer) -> None:
        if failures:
            raise failures.pop()
        await run(self)

    monkeypatch.setattr(TCPServer, "run", failing_run)
    admin_port = node.admin_addresses[0][1]
    assert await send_raw(admin_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") == b""
    assert (await http_get(admin_port, "/healthz"))[0] == 200
    assert await says_hello(node)
    assert internal_errors(node) == 1
    (logged,) = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert logged.getMessage().startswith("internal error serving 127.0.0.1:")
    assert logged.exc_info is not None


async def test_a_websocket_upgrade_on_the_admin_port_is_404(node: Server) -> None:
    host, port = node.admin_addresses[0]
    with pytest.raises(InvalidStatus) as info:
        async with connect(f"ws://{host}:{port}/ws"):
            pass
    assert info.value.response.status_code == 404
    assert (await http_get(port, "/healthz"))[0] == 200


async def test_an_api_handler_crash_is_500_logged_once_and_counted(
    make_server: Callable[..., Server],
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with api_node(make_server) as (server, _):

        def broken() -> dict[str, Any]:
            raise RuntimeError("stats broke")

        server.stats = broken  # type: ignore[method-assign]
        assert await call(server, "GET", "/api/stats") == (
            500,
            {"error": "internal", "reason": "internal error"},
        )
        assert internal_errors(server) == 1
        logged = [record for record in caplog.records if record.levelno >= logging.ERROR]
        assert len(logged) == 1
        assert logged[0].exc_info is not None
        # The port keeps serving.
        assert (await http_get(server.admin_addresses[0][1], "/healthz"))[0] == 200


@pytest.mark.parametrize("path", ["/api/nope", "/api/", "/api/stats/../publish"])
async def test_the_api_key_is_checked_before_the_path(
    make_server: Callable[..., Server], path: str
) -> None:
    """Issue 18, case 12: an unknown /api/ path answered 404 without a key."""
    async with api_node(make_server) as (server, _):
        for headers in ({}, {"Authorization": "apikey wrong"}, {"Authorization": "Bearer x"}):
            status, answer = await call(server, "GET", path, headers=headers)
            assert (status, answer["error"]) == (401, "unauthorized"), headers
        status, answer = await call(server, "GET", path, headers=AUTH)
        assert (status, answer["error"]) == (404, "not_found")
    async with api_node(make_server, api_key=None) as (server, _):
        status, answer = await call(server, "GET", path, headers=AUTH)
        assert (status, answer["error"]) == (403, "forbidden")
    async with api_node(make_server, api_key=None, open_api=True) as (server, _):
        status, answer = await call(server, "GET", path, headers={})
        assert (status, answer["error"]) == (404, "not_found")
