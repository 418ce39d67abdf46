"""The gateway mounted as an ASGI application under hypercorn's own server (its
``serve``, its listeners, its lifespan), as docs/transports.md shows."""

from __future__ import annotations

import json
from collections.abc import Callable

import hypercorn.trio
import pytest
import trio
from websockets.trio.client import connect

from trio_wsgate import Server
from trio_wsgate.asgi_app import GatewayApp, hypercorn_config

from .helpers import http_request


async def test_one_port_serves_websocket_probes_metrics_and_the_api(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(api_key="an-asgi-key")
    config = hypercorn_config(server)
    config.bind = ["127.0.0.1:0"]
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(hypercorn.trio.serve, GatewayApp(server), config)
        port = int(binds[0].rpartition(":")[2])
        async with connect(f"ws://127.0.0.1:{port}/ws", ping_interval=None) as ws:
            await ws.send(json.dumps({"type": "hello"}))
            assert json.loads(await ws.recv())["type"] == "welcome"
            await ws.send(json.dumps({"type": "msg", "seq": 1, "event": "echo", "data": 7}))
            assert json.loads(await ws.recv())["data"] == 7
        for path, status in (("/healthz", 200), ("/readyz", 200), ("/metrics", 200)):
            assert (await http_request(port, "GET", path))[0] == status
        key = {"Authorization": "apikey an-asgi-key"}
        status, _, body = await http_request(port, "GET", "/api/stats", headers=key)
        assert status == 200
        assert json.loads(body)["node"] == server.hub.node_id
        assert (await http_request(port, "GET", "/api/stats"))[0] == 401
        status, _, _ = await http_request(
            port, "POST", "/api/publish", json.dumps({"topic": "news", "data": 1}), headers=key
        )
        assert status == 200
        assert (await http_request(port, "GET", "/ws"))[0] == 400  # not an upgrade
        assert (await http_request(port, "GET", "/elsewhere"))[0] == 404
        nursery.cancel_scope.cancel()


async def test_an_asgi_server_refusing_a_send_ends_the_connection_not_the_node() -> None:
    """Each ASGI server has its own exception for "the WebSocket is gone"."""
    from trio_wsgate.transports import TransportBroken
    from trio_wsgate.transports.asgi import ASGITransport

    class Gone(Exception):
        pass

    async def receive() -> dict[str, object]:
        raise Gone("disconnected")

    async def send(message: object) -> None:
        raise Gone("disconnected")

    transport = ASGITransport(receive, send, "10.0.0.1:1")
    transport.send_message(b'{"type": "pong"}', False)
    with pytest.raises(TransportBroken, match="disconnected"):
        await transport.flush()
    transport = ASGITransport(receive, send, "10.0.0.1:1")
    with pytest.raises(TransportBroken, match="disconnected"):
        await transport.receive()
