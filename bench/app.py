"""The gateway application the benchmark runs: an echo, and a publisher for the fan-out.

trio-wsgate serve --app bench/app.py:gateway
"""

from typing import Any

from trio_wsgate import Gateway, Session

gateway = Gateway()


@gateway.on("echo")
async def echo(session: Session, data: Any) -> Any:
    """Request/reply: the answer is what was sent."""
    return data


@gateway.on("publish")
async def publish(session: Session, data: Any) -> Any:
    """Fan-out: one publication to every subscriber of ``bench``, encoded once per encoding."""
    publication = await gateway.publish("bench", data)
    return publication.offset
