"""One writer at a time (docs/architecture.md): what is queued once a connection is
closing is never framed, and the write loop ends all the same.

On in-memory streams with a MockClock, over every transport.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from trio.testing import MockClock

from trio_wsgate import Server
from trio_wsgate.testing import open_memory_connection

from .conftest import ALL_TRANSPORTS
from .test_resume import detached, resume_of, running

pytestmark = pytest.mark.transports(*ALL_TRANSPORTS)


async def test_a_resume_whose_welcome_fills_the_queue_closes_4004_in_bounded_time(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """The welcome itself finds the queue full (what the session kept and the window
    holds back count against ``queue_size``): closed 4004 at once, the kept envelopes
    left to the session. The write loop used to spin on them, never framed since the
    connection was closing, and the node stood still."""
    server = make_server(window=2, queue_size=5, close_timeout=2)
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as client:
            first = await client.hello()
        await detached(server)
        (session,) = server.hub.sessions.values()
        for i in range(10):
            session.send("kept", i)
        async with open_memory_connection(server, nursery) as client:
            await client.send({"type": "hello", "resume": resume_of(first, 0)})
            code, _ = await client.wait_closed()
            assert code == 4004
        await detached(server)
        assert not session.ended  # kept for a resume that reads
        assert len(list(session.outbox.unacknowledged())) == 10
