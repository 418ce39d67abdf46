"""The client's reconnect backoff: a ``welcome`` is a success and restarts the count.

Issue 18: the count used to restart only after a connection that lived 10 s, so a link
cut every 0.3 s pushed the waits up to the cap (30 s) although every attempt connected.
The first tests run on MockClock over in-memory streams and assert exact virtual times;
the last one runs the real server behind the fault proxy on the real clock.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from trio_wsgate import (
    Backoff,
    ClientState,
    Config,
    Gateway,
    Server,
    Session,
    open_client,
    serve,
)
from trio_wsgate.protocol import CloseCode, JsonCodec, Welcome
from trio_wsgate.testing import FaultProxy
from trio_wsgate.transports.websockets import Handshake, accept_websocket

from .test_client import URL, Wire, accept_json


def waits(backoff: Backoff, seed: int, attempts: list[int]) -> list[float]:
    """The waits the client seeded with ``seed`` draws before these attempt numbers."""
    rng = random.Random(seed)
    return [backoff.delay(attempt, rng) for attempt in attempts]


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def test_reset_after_is_still_accepted_and_ignored() -> None:
    assert Backoff(base=1, reset_after=1.0) == Backoff(base=1)
    assert "reset_after" not in repr(Backoff(reset_after=1.0))


async def test_a_welcome_restarts_the_attempt_count(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    backoff = Backoff(base=1, factor=2, cap=8, max_attempts=3)
    server = make_server()
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        wire.refuse = 3  # attempts 0, 1 and 2 fail; the fourth try is welcomed
        start = trio.current_time()
        async with open_client(URL, connect=wire.connect, backoff=backoff, seed=11) as client:
            assert await client.wait_connected() is ClientState.CONNECTED
            await trio.sleep(5)  # far less than the old reset_after (10 s)
            cut_at = trio.current_time()
            # The drop, then two refused attempts: three failures in a row, not six.
            wire.refuse = 2
            await wire.cut()
            resumed = await client.wait_state(ClientState.RESUMED, ClientState.CLOSED)
            assert resumed is ClientState.RESUMED, client.close_reason
            assert await client.request("echo", 1) == 1
    # Before the cut the ceilings grow 1, 2, 4; after it they start again at 1 (not at
    # 8, and the client does not give up: the count is of failures since a welcome).
    before, after = wire.attempts[:4], wire.attempts[4:]
    assert before[0] == start
    expected = waits(backoff, 11, [0, 1, 2, 0, 1, 2])
    assert [*gaps(before), after[0] - cut_at, *gaps(after)] == pytest.approx(expected, abs=1e-9)
    assert client.statistics().connects == 2


async def test_a_server_that_welcomes_then_closes_gets_the_base_delay_jittered(
    autojump_clock: MockClock,
) -> None:
    """A welcome-then-1011 loop: every attempt is welcomed, so the count restarts each
    time, but each reconnection still waits a full-jitter draw over ``[0, base]``."""
    backoff = Backoff(base=1, factor=2, cap=8)
    welcomes = 0

    async def failing_server(stream: trio.abc.Stream) -> None:
        nonlocal welcomes
        result = await accept_websocket(stream, decide=accept_json, max_message_size=65536)
        assert isinstance(result, Handshake)
        transport = result.transport
        await transport.receive()  # hello
        welcomes += 1
        welcome = Welcome(f"s{welcomes}", "t", False, 0, 25.0, 10.0, 16, 65536)
        transport.send_message(JsonCodec().encode(welcome), False)
        transport.send_close(CloseCode.INTERNAL_ERROR, "broken")
        await transport.flush()
        await transport.aclose()

    async with trio.open_nursery() as nursery:
        wire = Wire(None, nursery)
        wire.serve = failing_server
        start = trio.current_time()
        async with open_client(URL, connect=wire.connect, backoff=backoff, seed=5) as client:
            await trio.sleep(15)  # ten waits of at most base (1 s) each, and more
            assert client.statistics().connects >= 10
            nursery.cancel_scope.cancel()
    assert welcomes >= 10
    # Each wait is delay(0): drawn over [0, base], never skipped and never growing.
    assert wire.attempts[0] == start
    assert gaps(wire.attempts[:11]) == pytest.approx(waits(backoff, 5, [0] * 10), abs=1e-9)
    assert all(0 < gap <= backoff.base for gap in gaps(wire.attempts[:11]))


async def test_requests_finish_through_a_link_cut_every_300_ms() -> None:
    """Issue 18's "Done when": 300 requests, 20 in flight, a cut every 0.3 s."""
    count = 0
    gateway = Gateway()

    @gateway.on("incr")
    async def incr(session: Session, data: Any) -> int:
        nonlocal count
        # A little work (a session's envelopes are handled one after the other), so
        # that the 300 requests span about ten cuts instead of ending before the first.
        # A cut may cancel it here: then it runs again, and counts once.
        await trio.sleep(0.01)
        count += 1
        return count

    config = Config(port=0, admin_port=None, host="127.0.0.1")
    replies: list[int] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, gateway, config)
            host, port = server.listen_addresses[0]
            proxy = FaultProxy(host, port)
            await nursery.start(proxy.serve)

            async def cutter() -> None:
                while True:
                    await trio.sleep(0.3)
                    proxy.cut()

            url = f"ws://127.0.0.1:{proxy.port}/ws"
            async with open_client(url, seed=18) as client:
                await client.wait_connected()
                nursery.start_soon(cutter)
                todo = iter(range(300))
                start = trio.current_time()

                async def worker() -> None:
                    for _ in todo:
                        replies.append(await client.request("incr"))

                with trio.fail_after(30):
                    async with trio.open_nursery() as workers:
                        for _ in range(20):
                            workers.start_soon(worker)
                elapsed = trio.current_time() - start
                print(
                    f"300 requests in {elapsed:.1f} s through {proxy.stats.faults} "
                    f"({client.statistics()})"
                )
                assert elapsed < 30
                nursery.cancel_scope.cancel()
    assert count == 300
    assert sorted(replies) == list(range(1, 301))
