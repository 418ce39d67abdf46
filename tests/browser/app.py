"""The application of the browser tests: echo, a recorder, an error, and the test page.

``received`` keeps, per user, every ``record`` the node's handlers processed, in
order: the browser's side of "exactly once, in order" is checked against it.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from trio_wsgate import Gateway, HandlerError, Session


def make_app() -> tuple[Gateway, dict[str, list[Any]]]:
    gateway = Gateway()
    received: dict[str, list[Any]] = defaultdict(list)
    gateway.serve_file("/test.html", Path(__file__).with_name("page.html"))

    @gateway.on("echo")
    async def echo(session: Session, data: Any) -> Any:
        return data

    @gateway.on("record")
    async def record(session: Session, data: Any) -> None:
        received[session.user or session.id].append(data)

    @gateway.on("refuse")
    async def refuse(session: Session, data: Any) -> None:
        raise HandlerError("not_allowed", "no, thanks")

    @gateway.authorize_subscribe
    async def rooms(session: Session, topic: str) -> bool:
        return topic.startswith("room:")

    return gateway, received
