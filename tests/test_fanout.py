"""Fan-out to thousands of subscribers, one of which stops reading.

docs/architecture.md, "One writer".
"""

from __future__ import annotations

from collections.abc import Callable

import trio
import trio.testing
from trio.testing import MockClock

from trio_wsgate import Server
from trio_wsgate.testing import RawClient, open_memory_connection

from .test_resume import running
from .test_topics import Seq, request

SUBSCRIBERS = 2000
PUBLICATIONS = 20
WINDOW = 4


async def _reader(
    server: Server,
    nursery: trio.Nursery,
    received: dict[int, list[int]],
    finished: dict[int, float],
    all_finished: trio.Event,
    index: int,
    task_status: trio.TaskStatus[None],
) -> None:
    """A subscriber that reads everything and acks each batch at once."""
    async with open_memory_connection(server, nursery) as client:
        await client.hello()
        await request(client, Seq(), "sub", topic="news")
        task_status.started()
        got = received[index] = []
        while len(got) < PUBLICATIONS:
            await client.receive_some()
            last = None
            while client.received:
                envelope = client.received.popleft()
                if envelope["type"] == "msg":
                    got.append(envelope["offset"])
                    last = envelope["seq"]
                elif envelope["type"] == "ping":
                    await client.send({"type": "pong", "ts": envelope.get("ts")})
            if last is not None:
                await client.send({"type": "ack", "ack": last})
        finished[index] = trio.current_time()
        if len(finished) == SUBSCRIBERS:
            all_finished.set()
        await trio.sleep_forever()


async def _stuck(
    server: Server, nursery: trio.Nursery, task_status: trio.TaskStatus[RawClient]
) -> None:
    """A subscriber over a stream whose writes block until it reads: it never reads again."""
    async with open_memory_connection(server, nursery, lockstep=True) as client:
        await client.hello()
        await request(client, Seq(), "sub", topic="news")
        task_status.started(client)
        await trio.sleep_forever()


async def test_one_stuck_subscriber_never_delays_thousands_of_others(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server(
        allow_subscribe=("news",), window=WINDOW, queue_size=2 * WINDOW, close_timeout=2
    )
    received: dict[int, list[int]] = {}
    finished: dict[int, float] = {}
    all_finished = trio.Event()
    async with running(server) as nursery:
        await nursery.start(_stuck, server, nursery)
        (stuck,) = [s for s in server.hub.sessions.values()]
        connection = stuck.connection
        assert connection is not None
        for index in range(SUBSCRIBERS):
            await nursery.start(_reader, server, nursery, received, finished, all_finished, index)
        start = trio.current_time()
        for value in range(PUBLICATIONS):
            await server.gateway.publish("news", value)
            if value % WINDOW == WINDOW - 1:  # a burst of a window's worth, then let it go
                await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(60):
            await all_finished.wait()
        # Every other subscriber got every publication, in order, at once: not one
        # of them waited for the stuck one (whose release takes close_timeout, 2 s).
        assert all(got == list(range(1, PUBLICATIONS + 1)) for got in received.values())
        assert max(finished.values()) - start < server.config.close_timeout
        # The stuck one was closed with 4004 and released within close_timeout; its
        # session is kept for a resume (docs/protocol.md §8).
        with trio.fail_after(10):
            await connection.wait_released()
        assert stuck.close_code == 4004
        assert not stuck.ended
        closes = server.metrics.registry.get_sample_value(
            "wsgate_closes_total", {"code": "4004", "reason": "slow_consumer"}
        )
        assert closes == 1
        assert len(server.connections) == SUBSCRIBERS
        nursery.cancel_scope.cancel()
