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
    """Fan-out: one publication to every subscriber of ``bench`` (or of the topic ``bench.N``
    that the data names), encoded once per encoding."""
    topic = data.get("topic", "bench") if isinstance(data, dict) else "bench"
    if not isinstance(topic, str) or (topic != "bench" and not topic.startswith("bench.")):
        raise ValueError("bench topics only")
    publication = await gateway.publish(topic, data)
    return publication.offset
