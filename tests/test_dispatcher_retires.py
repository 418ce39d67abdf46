"""An idle connection keeps no dispatcher task (trio_wsgate/dispatch.py, ``serve``): it
retires right after ``hello`` if nothing waits, and after a heartbeat interval with
nothing to dispatch; the next envelope starts it again. Order, hooks, close and the
session's hand-over are as with a dispatcher that never goes.

On in-memory streams with a MockClock, over every transport.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from trio_wsgate import Gateway, Server, Session
from trio_wsgate.testing import open_memory_connection

from .conftest import ALL_TRANSPORTS, make_gateway
from .test_hardening import msg
from .test_resume import detached, resume_of, running

pytestmark = pytest.mark.transports(*ALL_TRANSPORTS)


def dispatchers() -> int:
    """The dispatcher tasks of the run (one per connection that has one)."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    count, stack = 0, [root]
    while stack:
        task = stack.pop()
        count += task.name.endswith("Connection._application")
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


async def test_the_dispatcher_goes_while_idle_and_comes_back_for_the_next_envelope(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server(heartbeat_interval=10, heartbeat_timeout=100)
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        await trio.testing.wait_all_tasks_blocked()
        assert dispatchers() == 0  # nothing came after hello
        await trio.sleep(1)
        await client.send(msg(1, "sleep", 2))  # a handler that waits
        await client.send(msg(2, "echo", "after"))
        await trio.sleep(0.5)
        assert dispatchers() == 1
        replies = [await client.recv_type("reply") for _ in range(2)]
        assert [(r["re"], r["data"]) for r in replies] == [(1, 2), (2, "after")]
        # The ping at 10 finds it has worked since hello: it stays; the one at 20 finds
        # it idle since 10: it goes.
        await trio.sleep_until(19.9)
        assert dispatchers() == 1
        await trio.sleep_until(20.1)
        assert dispatchers() == 0
        await client.send(msg(3, "echo-waiting", "again"))  # (a handler that waits)
        reply = await client.recv_type("reply")
        assert (reply["re"], reply["data"], reply["ack"]) == (3, "again", 3)
        assert dispatchers() == 1  # it came back, and stays until a ping finds it idle
        await client.close()


@pytest.mark.transports("websockets")  # the one that tells a read held one message
async def test_requests_the_reader_runs_itself_start_no_dispatcher(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """A request whose handler never waits, alone in its read, is run by the reader
    (dispatch.py, ``run_now``): a connection served only such requests stays one
    task. One whose handler waits starts the dispatcher again."""
    server = make_server(heartbeat_interval=10, heartbeat_timeout=100)
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        await trio.testing.wait_all_tasks_blocked()
        assert dispatchers() == 0
        for seq in range(1, 4):
            await client.send(msg(seq, "echo", seq))
            assert (await client.recv_type("reply"))["data"] == seq
            await trio.testing.wait_all_tasks_blocked()
            assert dispatchers() == 0
        await client.send(msg(4, "echo-waiting", 4))
        assert (await client.recv_type("reply"))["data"] == 4
        assert dispatchers() == 1
        await client.close()


async def test_a_connection_closed_while_its_dispatcher_is_gone_lets_go_of_its_session(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server(heartbeat_interval=None)
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as client:
            first = await client.hello()
            await trio.testing.wait_all_tasks_blocked()
            assert dispatchers() == 0
            (connection,) = server.connections
            start = trio.current_time()
            connection.close(1001, "going away")
            with trio.fail_after(1):
                await connection.wait_detached()
            assert trio.current_time() == start  # at the timers' next pass
        await detached(server)
        (session,) = server.hub.sessions.values()
        assert session.connection is None
        assert not session.ended
        async with open_memory_connection(server, nursery) as client:
            assert (await client.hello(resume=resume_of(first, 0)))["resumed"] is True
            await client.send(msg(1, "echo", "back"))
            assert (await client.recv_type("reply"))["data"] == "back"
            await client.close()


async def test_an_application_with_per_connection_tasks_keeps_its_dispatcher(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    gateway: Gateway = make_gateway()
    ticks: list[Any] = []

    @gateway.task
    async def ticker(session: Session) -> None:
        while True:
            await trio.sleep(5)
            ticks.append(trio.current_time())

    server = make_server(gateway, heartbeat_interval=10, heartbeat_timeout=100)
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        await trio.sleep(44)
        assert dispatchers() == 1  # its nursery holds the ticker: it stays
        assert ticks == [5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0]
        await client.close()


async def test_a_connection_cancelled_from_outside_while_its_dispatcher_is_gone_lets_go(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Cancelled from outside (its server's nursery), no close was decided: the
    connection lets go of its session and stops its timers all the same, so that a
    resume takes the session and nothing pings a dead connection."""
    server = make_server(heartbeat_interval=10, heartbeat_timeout=100, resume_ttl=60)
    async with running(server) as nursery:
        async with (
            trio.open_nursery() as serving,
            open_memory_connection(server, serving) as client,
        ):
            first = await client.hello()
            await trio.testing.wait_all_tasks_blocked()
            assert dispatchers() == 0
            serving.cancel_scope.cancel()
        await detached(server)
        (session,) = server.hub.sessions.values()
        assert session.connection is None
        # No ping, no liveness check left (cancelled entries wait to be swept out).
        assert [e for e in server.hub.timers._heap if e[2].callback is not None] == []
        async with open_memory_connection(server, nursery) as client:
            with trio.fail_after(1):
                welcome = await client.hello(resume=resume_of(first, 0))
            assert welcome["resumed"] is True
            await client.close()


async def test_an_idle_connection_keeps_one_entry_in_the_node_timers(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Its pings and its liveness checks share one entry of the timers' heap, and the
    session's start leaves no cancelled one behind (docs/benchmarks.md, "Idle")."""
    server = make_server(heartbeat_interval=10.0, heartbeat_timeout=5.0)
    timers = server.hub.timers
    async with running(server) as nursery:
        await trio.testing.wait_all_tasks_blocked()
        before = len(timers)
        async with open_memory_connection(server, nursery) as client:
            await client.hello()
            await trio.testing.wait_all_tasks_blocked()
            assert len(timers) == before + 1
            for _ in range(3):  # a ping answered, each interval
                ping = await client.recv_type("ping")
                await client.send({"type": "pong", "ts": ping["ts"]})
                await trio.testing.wait_all_tasks_blocked()
                assert len(timers) == before + 1
            await client.close()
