"""A chat: users from tokens, rooms as topics, presence, and messages from the HTTP API.

    export WSGATE_JWT_SECRET=$(openssl rand -hex 32) WSGATE_API_KEY=$(openssl rand -hex 16)
    scripts/serve                                   # runs --app examples/chat.py:gateway
    .venv/bin/trio-wsgate client ws://127.0.0.1:8000/ws --token "$(.venv/bin/trio-wsgate token ada)"

In a browser, open http://127.0.0.1:8000/#token=<a token> (or just
http://127.0.0.1:8000/ on an anonymous node): the page ``chat.html`` is served by the
node and built on ``/wsgate.js``.

Every session starts in ``room:lobby``. Client side, after ``hello`` (the interactive
``trio-wsgate client`` takes the lines after ``>``)::

    > say "hello"           -> msg "said" in room:lobby, data {"from": "ada", "text": "hello"}
    > join "rust"           -> reply {"room": "room:rust", "members": ["ada"], "offset": 0, ...}
    > say {"room": "rust", "text": "anyone?"}
    > who "lobby"           -> reply ["ada", "bob"]      (presence of room:lobby)
    > leave "rust"

and from the server's own side, through the HTTP API of the admin port::

    curl -H "Authorization: apikey $WSGATE_API_KEY" -d '{"topic": "room:lobby",
         "event": "said", "data": {"from": "ops", "text": "restart at 5"}}' \\
         http://127.0.0.1:8001/api/publish
    curl -H "Authorization: apikey $WSGATE_API_KEY" \\
         -d '{"user": "ada", "event": "dm", "data": "hi"}' http://127.0.0.1:8001/api/send

Rooms are topics, so they have what topics have: each message carries an offset, and a
client that lost its session subscribes again from the last offset it saw and gets
what it missed (the Python client does this by itself). Who said what comes from the
token (``sub``), never from the client's data. Without a ``--jwt-secret`` the node runs
anonymous and everyone is a guest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from trio_wsgate import Gateway, HandlerError, Session, SessionClosed

gateway = Gateway()
# The chat's page at http://127.0.0.1:8000/ (it loads /wsgate.js from the node).
gateway.serve_file("/", Path(__file__).with_name("chat.html"))

LOBBY = "room:lobby"


def name_of(session: Session) -> str:
    """The user from the token, or a guest name on an anonymous node."""
    return session.user or f"guest-{session.id[:6]}"


def room_topic(data: Any) -> str:
    """``"rust"`` or ``"room:rust"`` names the topic ``room:rust``."""
    if not isinstance(data, str) or not 0 < len(data) <= 64:
        raise HandlerError("bad_room", "a room is a name of 1 to 64 characters")
    return data if data.startswith("room:") else f"room:{data}"


async def members(topic: str) -> list[str]:
    """Presence: the names of the sessions in a room."""
    present = await gateway.presence(topic)
    return sorted({user or f"guest-{session[:6]}" for session, user in present.items()})


@gateway.authorize_subscribe
async def public_rooms(session: Session, topic: str) -> bool:
    # Rooms are open to everyone; a token's topics claim can open more.
    return topic.startswith("room:")


async def enter(session: Session, topic: str) -> dict[str, Any]:
    position = await session.subscribe(topic)
    await gateway.publish(topic, {"from": name_of(session)}, event="joined")
    return {"room": topic, "members": await members(topic), **position.to_data()}


@gateway.on_connect
async def arrived(session: Session) -> None:
    if not session.resumed:  # a resumed session is still in its rooms
        await enter(session, LOBBY)


@gateway.on_session_end
async def departed(session: Session) -> None:
    for topic in session.topics:
        if topic.startswith("room:"):
            await gateway.publish(topic, {"from": name_of(session)}, event="left")


@gateway.on("join")
async def join(session: Session, data: Any) -> dict[str, Any]:
    topic = room_topic(data)
    if not await gateway.hub.may_subscribe(session, topic):
        raise HandlerError("forbidden", f"you may not join {topic}")
    return await enter(session, topic)


@gateway.on("leave")
async def leave(session: Session, data: Any) -> None:
    topic = room_topic(data)
    if session.unsubscribe(topic):
        await gateway.publish(topic, {"from": name_of(session)}, event="left")


@gateway.on("say")
async def say(session: Session, data: Any) -> dict[str, Any]:
    """``say "text"`` speaks in the lobby; ``say {"room": r, "text": t}`` in room r."""
    room, text = (LOBBY, data) if isinstance(data, str) else (None, None)
    if isinstance(data, dict):
        room, text = room_topic(data.get("room")), data.get("text")
    if not isinstance(text, str) or not text or room is None:
        raise HandlerError("bad_text", 'say takes "text" or {"room": ..., "text": ...}')
    if room not in session.subscriptions:
        raise HandlerError("not_joined", f"join {room} first")
    said = await gateway.publish(room, {"from": name_of(session), "text": text}, event="said")
    return {"offset": said.offset}


@gateway.on("who")
async def who(session: Session, data: Any) -> list[str]:
    return await members(LOBBY if data is None else room_topic(data))


@gateway.on("echo")
async def echo(session: Session, data: Any) -> Any:
    return data


@gateway.task
async def lobby_count(session: Session) -> None:
    # A per-connection task: tell the client every minute how many are in the lobby.
    # It runs in the connection's nursery and is cancelled the moment it ends.
    while True:
        await trio.sleep(60)
        try:
            session.send("lobby", {"members": len(await members(LOBBY))})
        except SessionClosed:
            return
