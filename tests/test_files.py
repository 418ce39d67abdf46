"""Files on the WebSocket port: ``/wsgate.js`` on every node, and the application's pages."""

from __future__ import annotations

from pathlib import Path

import hypercorn.trio
import pytest
import trio

from trio_wsgate import Config, Gateway, Server
from trio_wsgate.asgi_app import GatewayApp, hypercorn_config

from .helpers import http_request

ROOT = Path(__file__).resolve().parent.parent
CLIENT = (ROOT / "clients" / "js" / "wsgate.js").read_bytes()


def node(tmp_path: Path, **settings: object) -> Server:
    page = tmp_path / "index.html"
    page.write_text("<!doctype html><title>chat é</title>\n", encoding="utf-8")
    gateway = Gateway()
    gateway.serve_file("/", page)
    gateway.serve_file("/notes", tmp_path / "index.html", "text/plain")
    return Server(gateway, Config(host="127.0.0.1", port=0, admin_port=None, **settings))  # type: ignore[arg-type]


async def check_files(port: int) -> None:
    status, headers, body = await http_request(port, "GET", "/wsgate.js")
    assert status == 200
    assert body == CLIENT  # the package's copy is the npm package's file
    assert headers["content-type"] == "text/javascript; charset=utf-8"
    assert headers["access-control-allow-origin"] == "*"
    assert headers["cache-control"] == "no-cache"
    assert headers["x-content-type-options"] == "nosniff"
    etag = headers["etag"]
    # A browser that has it asks again and gets 304, without the body.
    status, again, body = await http_request(
        port, "GET", "/wsgate.js", headers={"If-None-Match": etag}
    )
    assert (status, again["etag"], body) == (304, etag, b"")
    # A name sent twice is read by its first value (websockets' Headers raised on it:
    # the request was dropped, or answered 500, as a bug of the node's).
    status, _, body = await http_request(
        port, "GET", "/wsgate.js", headers=[("If-None-Match", etag), ("If-None-Match", '"x"')]
    )
    assert (status, body) == (304, b"")
    status, _, body = await http_request(
        port, "GET", "/wsgate.js?v=2", headers={"If-None-Match": '"other"'}
    )
    assert (status, body) == (200, CLIENT)
    status, headers, body = await http_request(port, "GET", "/")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert body.decode() == "<!doctype html><title>chat é</title>\n"
    assert (await http_request(port, "GET", "/notes"))[1]["content-type"] == (
        "text/plain; charset=utf-8"
    )
    assert (await http_request(port, "GET", "/wsgate.jsx"))[0] == 404


async def test_the_websockets_transport_serves_the_client_and_the_pages(tmp_path: Path) -> None:
    server = node(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        await check_files(server.listen_addresses[0][1])
        # Files answer GET only.
        port = server.listen_addresses[0][1]
        status, headers, _ = await http_request(port, "POST", "/wsgate.js", "")
        assert (status, headers["allow"]) == (405, "GET")
        nursery.cancel_scope.cancel()


async def test_the_asgi_app_serves_the_client_and_the_pages(tmp_path: Path) -> None:
    server = node(tmp_path)
    config = hypercorn_config(server)
    config.bind = ["127.0.0.1:0"]
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(hypercorn.trio.serve, GatewayApp(server), config)
        port = int(binds[0].rpartition(":")[2])
        await check_files(port)
        status, headers, body = await http_request(port, "HEAD", "/wsgate.js")
        assert (status, body) == (200, b"")
        status, headers, _ = await http_request(port, "POST", "/wsgate.js", "")
        assert (status, headers["allow"]) == (405, "GET, HEAD")
        nursery.cancel_scope.cancel()


def test_a_file_cannot_take_the_nodes_own_paths(tmp_path: Path) -> None:
    page = tmp_path / "page.html"
    page.write_text("x")
    gateway = Gateway()
    with pytest.raises(ValueError, match="starts with /"):
        gateway.serve_file("page.html", page)
    with pytest.raises(ValueError, match="no known suffix"):
        gateway.serve_file("/data", tmp_path)
    gateway.serve_file("/ws", page)
    with pytest.raises(ValueError, match="already served"):
        gateway.serve_file("/ws", page)
    with pytest.raises(ValueError, match="the node's own"):
        Server(gateway, Config(admin_port=None))
    big = tmp_path / "big.html"
    big.write_text("x" * (4 * 1024 * 1024 + 1))
    with pytest.raises(ValueError, match="at most"):
        Gateway().serve_file("/big", big)
