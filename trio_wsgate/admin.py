"""The admin port's ASGI application: health, readiness and metrics.

Served by hypercorn's trio worker in the node's own trio run, so the metrics
(``wsgate_tasks`` above all) are read from the same task tree the gateway uses.
The server API of PROTOCOL.md §9 (``/api/*``) joins it with the hub.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from .server import Server

__all__ = ["AdminApp", "probe"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def probe(path: str, ready: bool) -> tuple[int, str] | None:
    """Answer the load balancers' probes, on either port: ``(status, body)``.

    ``/healthz`` is 200 while the process serves; ``/readyz`` is 200 while it
    accepts connections and 503 while it drains (PROTOCOL.md §9). Other paths: None.
    """
    if path == "/healthz":
        return 200, "ok\n"
    if path == "/readyz":
        return (200, "ready\n") if ready else (503, "draining\n")
    return None


class AdminApp:
    """ASGI app answering ``/healthz``, ``/readyz`` and ``/metrics``.

    Args:
        server: the node whose state it reports.
    """

    def __init__(self, server: Server) -> None:
        self._server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        status, body, content_type = self.route(scope["method"], scope["path"])
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def route(self, method: str, path: str) -> tuple[int, bytes, str]:
        """Answer one request: ``(status, body, content type)``."""
        text = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return 405, b"Method Not Allowed\n", text
        answer = probe(path, self._server.ready)
        if answer is not None:
            return answer[0], answer[1].encode(), text
        if path == "/metrics":
            return 200, self._server.metrics.render(), CONTENT_TYPE_LATEST
        return 404, b"Not Found\n", text
