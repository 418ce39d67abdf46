"""A small chat on one node: every connected session hears what anyone says.

    scripts/serve            # runs this file: --app examples/chat.py:gateway

Client side, after ``hello``:

    -> {"type": "msg", "seq": 1, "event": "nick", "data": "ada"}
    -> {"type": "msg", "seq": 2, "event": "say", "data": "hello"}
    <- {"type": "msg", "seq": 3, "event": "said", "data": {"from": "ada", "text": "hello"}}

Everything here runs inside the nursery of the connection it serves: the
``heartbeat_stats`` task below is cancelled the moment its connection ends, whatever
ended it. Membership follows the *session*, not the connection: a member whose
connection drops stays in the room, its messages buffered, and gets them all when its
client resumes; it leaves when its session ends (``bye``, or no resume in time).
"""

import contextlib
from typing import Any

import trio

from trio_wsgate import Gateway, HandlerError, Session, SessionClosed

gateway = Gateway()
room: set[Session] = set()


def broadcast(event: str, data: Any) -> None:
    for member in list(room):
        # A member that is gone or cannot keep up (closed with 4004) is that member's
        # problem: it must not fail the sender's handler.
        with contextlib.suppress(SessionClosed):
            member.send(event, data)


@gateway.on_connect
async def joined(session: Session) -> None:
    if session.resumed:
        return  # back after a drop: still a member, nothing was missed
    session.state["nick"] = f"guest-{session.id[:6]}"
    room.add(session)
    broadcast("joined", session.state["nick"])


@gateway.on_session_end
async def left(session: Session) -> None:
    room.discard(session)
    broadcast("left", session.state["nick"])


@gateway.on("nick")
async def nick(session: Session, data: Any) -> str:
    if not isinstance(data, str) or not 0 < len(data) <= 32:
        raise HandlerError("bad_nick", "a nick is a string of 1 to 32 characters")
    session.state["nick"] = data
    return data


@gateway.on("say")
async def say(session: Session, data: Any) -> None:
    if not isinstance(data, str):
        raise HandlerError("bad_text", "say takes a string")
    broadcast("said", {"from": session.state["nick"], "text": data})


@gateway.on("echo")
async def echo(session: Session, data: Any) -> Any:
    return data


@gateway.on("who")
async def who(session: Session, data: Any) -> list[str]:
    return sorted(member.state["nick"] for member in room)


@gateway.task
async def heartbeat_stats(session: Session) -> None:
    # A per-connection task: tell the client every minute how many are here.
    while True:
        await trio.sleep(60)
        session.send("room", {"members": len(room)})
