"""The peers: minimal echo and broadcast servers on the libraries a user would otherwise pick.

    python -m bench.peers NAME --port PORT

Each answers on ``ws://127.0.0.1:PORT/`` (any path). A message that starts with the
byte ``P`` is a publication: the server sends it to every connection that has said
``S`` (subscribed) first; every other message is echoed as it came. That is all a
peer does: no sessions, no sequencing, no acks, which is what the gateway's ratio to
them prices.

Names: ``websockets-trio`` (websockets' trio implementation), ``trio-websocket``,
``hypercorn-trio`` (an ASGI app under hypercorn's trio worker), ``websockets-asyncio``
(websockets' asyncio implementation, with its ``broadcast()``) and ``raw`` (the node's
own accept loop, handshake and transport with an echo in place of the protocol:
``trio-wsgate raw-echo``, the floor of what the protocol work costs).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import trio

PEERS = ["websockets-trio", "trio-websocket", "hypercorn-trio", "websockets-asyncio", "raw"]
PUBLISH, SUBSCRIBE = ord("P"), ord("S")


def _is(message: str | bytes, marker: int) -> bool:
    return bool(message) and (
        message[0] == marker if isinstance(message, bytes) else ord(message[0]) == marker
    )


async def websockets_trio(port: int) -> None:
    from websockets.trio.server import ServerConnection, broadcast, serve

    subscribers: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        try:
            async for message in ws:
                if _is(message, PUBLISH):
                    await broadcast(subscribers, message)
                elif _is(message, SUBSCRIBE):
                    subscribers.add(ws)
                else:
                    await ws.send(message)
        finally:
            subscribers.discard(ws)

    await serve(handler, port, host="127.0.0.1", compression=None, max_size=2**20)


async def trio_websocket(port: int) -> None:
    from trio_websocket import ConnectionClosed, WebSocketConnection, serve_websocket

    subscribers: set[WebSocketConnection] = set()

    async def handler(request: Any) -> None:
        ws = await request.accept()
        try:
            while True:
                message = await ws.get_message()
                if _is(message, PUBLISH):
                    for subscriber in list(subscribers):
                        try:
                            await subscriber.send_message(message)
                        except ConnectionClosed:
                            subscribers.discard(subscriber)
                elif _is(message, SUBSCRIBE):
                    subscribers.add(ws)
                else:
                    await ws.send_message(message)
        except ConnectionClosed:
            pass
        finally:
            subscribers.discard(ws)

    await serve_websocket(handler, "127.0.0.1", port, ssl_context=None, max_message_size=2**20)


async def hypercorn_trio(port: int) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "websocket":
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while True:
            event = await receive()
            if event["type"] != "websocket.receive":
                return
            if event.get("bytes") is not None:
                await send({"type": "websocket.send", "bytes": event["bytes"]})
            else:
                await send({"type": "websocket.send", "text": event["text"]})

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.websocket_ping_interval = None
    await serve(app, config)  # type: ignore[arg-type]


async def websockets_asyncio(port: int) -> None:
    from websockets.asyncio.server import ServerConnection, broadcast, serve

    subscribers: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        try:
            async for message in ws:
                if _is(message, PUBLISH):
                    broadcast(subscribers, message)
                elif _is(message, SUBSCRIBE):
                    subscribers.add(ws)
                else:
                    await ws.send(message)
        finally:
            subscribers.discard(ws)

    async with serve(handler, "127.0.0.1", port, compression=None, max_size=2**20) as server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=PEERS)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if args.name == "websockets-asyncio":
        asyncio.run(websockets_asyncio(args.port))
    elif args.name == "raw":
        from trio_wsgate.cli import main as cli

        sys.argv = [
            "trio-wsgate",
            "raw-echo",
            "--transport",
            "websockets",
            "--port",
            str(args.port),
        ]
        cli()
    else:
        runner = {
            "websockets-trio": websockets_trio,
            "trio-websocket": trio_websocket,
            "hypercorn-trio": hypercorn_trio,
        }[args.name]
        trio.run(runner, args.port)


if __name__ == "__main__":
    main()
