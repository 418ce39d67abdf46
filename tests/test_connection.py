"""The connection nursery over in-memory streams, on a MockClock.

Every time asserted here is exact virtual time: ``autojump_clock`` jumps to the next
deadline whenever all tasks are blocked, so a 35 s heartbeat runs in milliseconds.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from trio_wsgate import Gateway, Server, Session, SessionClosed, SlowConsumer
from trio_wsgate.protocol import MSGPACK_SUBPROTOCOL
from trio_wsgate.testing import Closed, RawClient, open_memory_connection

from .conftest import ALL_TRANSPORTS, HANDLER_WAYS, make_gateway
from .helpers import scheduled
from .test_resume import detached, resume_of, running

pytestmark = pytest.mark.transports(*ALL_TRANSPORTS)

#: Heartbeats and acks run on the node's timers (its hub runs), or on a connection's own
#: (``serve_stream`` on a server that is not serving): the same times either way.
TIMERS = pytest.mark.parametrize("node_timers", [True, False], ids=["node-timers", "own-timers"])


@asynccontextmanager
async def timed_connection(server: Server, node_timers: bool) -> AsyncIterator[RawClient]:
    """A client of ``server``, whose timers are the node's (its hub runs) or its own."""
    async with trio.open_nursery() as nursery:
        if node_timers:
            await nursery.start(server.hub.run)
        async with open_memory_connection(server, nursery) as client:
            yield client
        nursery.cancel_scope.cancel()


async def call(client: RawClient, seq: int, event: str, data: Any = None) -> dict[str, Any]:
    await client.send({"type": "msg", "seq": seq, "event": event, "data": data})
    return await client.recv_type("reply")


@pytest.mark.parametrize("subprotocols", [None, ["wsgate.v1.json"], [MSGPACK_SUBPROTOCOL]])
async def test_hello_welcome_call_reply_and_ack(
    autojump_clock: MockClock, make_server: Callable[..., Server], subprotocols: list[str] | None
) -> None:
    server = make_server()
    async with (
        trio.open_nursery() as nursery,
        open_memory_connection(server, nursery, subprotocols=subprotocols) as client,
    ):
        welcome = await client.hello()
        assert welcome["resumed"] is False
        assert welcome["ack"] == 0
        assert welcome["heartbeat"] == {"interval": 25.0, "timeout": 10.0}
        assert welcome["window"] == 256
        assert welcome["max_message_size"] == 65536
        assert isinstance(welcome["session"], str)
        assert len(welcome["resume_token"]) >= 16
        reply = await call(client, 1, "echo", {"n": [1, 2]})
        # The reply is the server's seq 1, answers client seq 1 and acks it.
        assert reply == {"type": "reply", "seq": 1, "re": 1, "data": {"n": [1, 2]}, "ack": 1}
        await client.close()
        assert await client.wait_closed() == (1000, "")
    assert not server.connections


async def test_a_batch_is_handled_in_array_order(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server()
    async with trio.open_nursery() as nursery, open_memory_connection(server, nursery) as client:
        await client.send(
            {"type": "hello"},
            {"type": "msg", "seq": 1, "event": "echo", "data": "a"},
            {"type": "msg", "seq": 2, "event": "echo", "data": "b"},
            {"type": "ping", "ts": 7},
        )
        assert (await client.recv())["type"] == "welcome"
        seen = [await client.recv() for _ in range(3)]
        assert {"type": "pong", "ts": 7} in seen
        replies = [e for e in seen if e["type"] == "reply"]
        assert [(r["re"], r["data"]) for r in replies] == [(1, "a"), (2, "b")]
        await client.close()


async def test_traffic_and_handler_times_are_counted(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server()
    sample = server.metrics.registry.get_sample_value
    async with trio.open_nursery() as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        await call(client, 1, "sleep", 0.003)  # on the MockClock: exactly 3 ms
        await call(client, 2, "fail")
        await client.close()
        assert await client.wait_closed() == (1000, "")
    assert sample("wsgate_messages_in_total") == 3  # hello and the two msgs
    assert sample("wsgate_messages_out_total") == 3  # welcome, two replies
    assert sample("wsgate_bytes_in_total") > 60  # the two msgs' JSON alone
    assert sample("wsgate_bytes_out_total") > 100  # welcome alone
    ok = {"outcome": "ok"}
    assert sample("wsgate_handler_seconds_count", ok) == 1
    assert sample("wsgate_handler_seconds_sum", ok) == pytest.approx(0.003)
    assert sample("wsgate_handler_seconds_bucket", {**ok, "le": "0.001"}) == 0
    assert sample("wsgate_handler_seconds_bucket", {**ok, "le": "0.005"}) == 1
    assert sample("wsgate_handler_seconds_bucket", {**ok, "le": "+Inf"}) == 1
    assert sample("wsgate_handler_seconds_count", {"outcome": "exception"}) == 1


@HANDLER_WAYS
async def test_handler_errors_become_error_replies(
    autojump_clock: MockClock, make_server: Callable[..., Server], way: str
) -> None:
    server = make_server()
    async with trio.open_nursery() as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        failed = await call(client, 1, "fail" + way)
        assert failed["error"] == {"code": "internal", "reason": "internal error"}
        refused = await call(client, 2, "refuse" + way)
        assert refused["error"] == {"code": "not_allowed", "reason": "no, thanks"}
        unknown = await call(client, 3, "nope")
        assert unknown["error"]["code"] == "unknown_event"
        no_event = await call(client, 4, "")
        assert no_event["error"]["code"] == "unknown_event"
        await client.send({"type": "sub", "seq": 5, "topic": "news"})
        sub = await client.recv_type("reply")
        assert sub["re"] == 5
        assert sub["error"]["code"] == "forbidden"  # anonymous, and no --allow-subscribe
        # The connection survived every one of them.
        assert (await call(client, 6, "echo", 1))["data"] == 1
        await client.close()


async def test_handlers_run_one_at_a_time_in_arrival_order(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
) -> None:
    server = make_server()
    async with trio.open_nursery() as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        start = trio.current_time()
        await client.send(
            {"type": "msg", "seq": 1, "event": "sleep", "data": 3},
            {"type": "msg", "seq": 2, "event": "sleep", "data": 1},
        )
        first = await client.recv_type("reply")
        assert first["re"] == 1
        assert trio.current_time() - start == 3
        second = await client.recv_type("reply")
        # Serial: the second handler started only when the first returned.
        assert second["re"] == 2
        assert trio.current_time() - start == 4
        await client.close()


@TIMERS
async def test_server_pings_every_interval_and_the_rtt_is_measured(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    node_timers: bool,
) -> None:
    server = make_server(heartbeat_interval=25, heartbeat_timeout=10)
    async with timed_connection(server, node_timers) as client:
        await client.hello()
        start = trio.current_time()
        for n in (1, 2, 3):
            ping = await client.recv()
            assert ping["type"] == "ping"
            assert trio.current_time() - start == 25 * n
            await client.send({"type": "pong", "ts": ping["ts"]})
        await trio.testing.wait_all_tasks_blocked()
        # Answering pings keeps the connection alive well past interval + timeout.
        assert not client.close_code
        rtt = server.metrics.registry.get_sample_value("wsgate_heartbeat_rtt_seconds_count")
        assert rtt == 3
        await client.close()


@TIMERS
async def test_silence_closes_4002_at_interval_plus_timeout(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    node_timers: bool,
) -> None:
    server = make_server(heartbeat_interval=25, heartbeat_timeout=10, close_timeout=2)
    async with timed_connection(server, node_timers) as client:
        await client.hello()
        start = trio.current_time()
        (connection,) = server.connections
        # The client reads but never sends: no pong, no frame at all.
        code, reason = await client.wait_closed()
        assert (code, reason) == (4002, "heartbeat timeout")
        await trio.testing.wait_all_tasks_blocked()
        assert connection.close_decided_at == start + 35
        # The client answered the close handshake, so release came at once.
        assert connection.released_at == start + 35
        assert connection.close_reason == "heartbeat_timeout"


@TIMERS
@pytest.mark.parametrize("slack", [0.0, 0.5])
async def test_pings_and_liveness_checks_keep_to_the_slack_grid(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    node_timers: bool,
    slack: float,
) -> None:
    """Connections opened apart ping in the same step of the grid, never late, and a
    silent one is closed on the grid, never early; with no slack, at the exact times."""
    server = make_server(
        heartbeat_interval=25, heartbeat_timeout=10, close_timeout=2, heartbeat_slack=slack
    )
    pings: list[float] = []
    async with contextlib.AsyncExitStack() as stack, trio.open_nursery() as nursery:
        if node_timers:
            await nursery.start(server.hub.run)
        await trio.sleep(0.1 - trio.current_time())
        async with open_memory_connection(server, nursery) as first:
            await first.hello()
            await trio.sleep(0.3)
            second = await stack.enter_async_context(open_memory_connection(server, nursery))
            await second.hello()
            connections = list(server.connections)
            for client in (first, second):
                ping = await client.recv()
                assert ping["type"] == "ping"
                pings.append(trio.current_time())
            if slack:  # both in the step of the first: early, by less than the slack
                assert pings == [25.0, 25.0]
            else:
                assert pings == [25.1, 25.4]
            # Neither answers: closed at its last frame + 35 s, on the grid.
            closes = [await client.wait_closed() for client in (first, second)]
            assert closes == [(4002, "heartbeat timeout")] * 2
            decided = sorted(c.close_decided_at or 0 for c in connections)
            assert decided == ([35.5, 35.5] if slack else [35.1, 35.4])
        nursery.cancel_scope.cancel()


@TIMERS
async def test_a_half_open_peer_is_released_within_close_timeout(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    node_timers: bool,
) -> None:
    """The peer vanished without a FIN: it neither answers pings nor the close."""
    server = make_server(heartbeat_interval=25, heartbeat_timeout=10, close_timeout=2)
    async with timed_connection(server, node_timers) as client:
        await client.hello()
        start = trio.current_time()
        (connection,) = server.connections
        await connection.wait_released()  # the client never reads again
        assert connection.close_code == 4002
        assert connection.close_decided_at == start + 35
        assert connection.released_at == start + 37


async def test_no_hello_closes_4003_at_hello_timeout(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server(hello_timeout=10)
    async with trio.open_nursery() as nursery, open_memory_connection(server, nursery) as client:
        start = trio.current_time()
        assert await client.wait_closed() == (4003, "no hello in time")
        assert trio.current_time() - start == 10


async def test_a_stalled_handshake_is_dropped_at_hello_timeout(
    autojump_clock: MockClock, make_server: Callable[..., Server], tasks: Callable[[], int]
) -> None:
    server = make_server(hello_timeout=10)
    before = tasks()
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_stream)
        await client_stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # never finished
        start = trio.current_time()
        assert await client_stream.receive_some() == b""
        assert trio.current_time() - start == 10
    assert tasks() == before


async def test_close_is_bounded_when_the_peer_stops_reading(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
) -> None:
    """Lockstep streams: the server's writes block until the client reads, and it
    never does. Closing still releases the transport at exactly close_timeout."""
    server = make_server(close_timeout=2, heartbeat_interval=None)
    async with (
        trio.open_nursery() as nursery,
        open_memory_connection(server, nursery, lockstep=True) as client,
    ):
        await client.send({"type": "hello"})
        await client.recv_type("welcome")
        (connection,) = server.connections
        assert connection.session is not None
        session = connection.session
        for i in range(50):  # the write loop blocks on the first of these
            session.send("bulk", "x" * 1000 + str(i))
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        session.close(1000, "bye now")  # returns at once
        assert trio.current_time() == start
        await connection.wait_released()
        assert connection.released_at == start + 2
        # 1000 keeps the session for a resume (docs/protocol.md §8): it buffers.
        assert session.connection is None
        assert not session.closed
        session.send("late", 1)
        session.close(4005, "kicked")  # a kick ends a detached session
        assert session.closed
        with pytest.raises(SessionClosed):
            session.send("later", 1)


async def test_close_returns_at_once_and_a_cooperating_peer_is_released_at_once(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
) -> None:
    server = make_server(close_timeout=2)
    async with trio.open_nursery() as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        (connection,) = server.connections
        start = trio.current_time()
        nursery.start_soon(connection.aclose, 4005, "kicked")
        assert await client.wait_closed() == (4005, "kicked")
        await trio.testing.wait_all_tasks_blocked()
        assert connection.released_at == start
        assert connection.close_reason == "kick"


async def test_the_window_holds_back_and_acks_release(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server(window=4)
    async with trio.open_nursery() as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        await client.send({"type": "msg", "seq": 1, "event": "push", "data": 10})
        got = [await client.recv() for _ in range(4)]
        assert [e["seq"] for e in got] == [1, 2, 3, 4]  # the window is full
        await trio.testing.wait_all_tasks_blocked()
        assert not client.received
        (connection,) = server.connections
        assert connection.queue_depth == 7  # 6 msgs + the reply wait for acks
        await client.send({"type": "ack", "ack": 2})
        got = [await client.recv() for _ in range(2)]
        assert [e["seq"] for e in got] == [5, 6]
        await client.send({"type": "ack", "ack": 6})
        sequenced = []
        while len(sequenced) < 4:
            envelope = await client.recv()
            if "seq" in envelope:
                sequenced.append(envelope["seq"])
        assert sequenced == [7, 8, 9, 10]  # the reply (seq 11) still waits
        await client.send({"type": "ack", "ack": 10})
        reply = await client.recv_type("reply")
        assert (reply["seq"], reply["re"], reply["data"]) == (11, 1, 10)
        await client.close()


async def test_the_acks_of_one_read_release_as_their_last_does(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Acks are cumulative: those of one read are checked one by one and applied once,
    as the highest of them (connection.py, ``_apply_ack``)."""
    server = make_server(window=4)
    async with trio.open_nursery() as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        await client.send({"type": "msg", "seq": 1, "event": "push", "data": 10})
        assert [(await client.recv())["seq"] for _ in range(4)] == [1, 2, 3, 4]
        # One message of three acks, and a msg acking in between, out of order.
        await client.send(
            {"type": "ack", "ack": 1},
            {"type": "msg", "seq": 2, "event": "echo", "data": "x", "ack": 3},
            {"type": "ack", "ack": 2},
        )
        sequenced = []
        while len(sequenced) < 3:
            envelope = await client.recv()
            if "seq" in envelope:
                sequenced.append(envelope["seq"])
        assert sequenced == [5, 6, 7]  # ack 3 let three more out, not ack 2 after it
        await trio.testing.wait_all_tasks_blocked()
        assert not [e for e in client.received if "seq" in e]
        (connection,) = server.connections
        assert connection.session is not None
        assert connection.session.outbox.acked == 3
        await client.close()


async def test_an_ack_above_what_was_sent_stops_its_read_there(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """An ack is refused where it comes, though acks are applied at the end of a read:
    what came before it in the message is handed to the dispatcher, nothing after it."""
    gateway = make_gateway()
    seen: list[int] = []

    @gateway.on("note")
    async def note(session: Session, data: Any) -> Any:
        seen.append(data)

    server = make_server(gateway)
    async with trio.open_nursery() as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        await client.send(
            {"type": "msg", "seq": 1, "event": "note", "data": 1},
            {"type": "msg", "seq": 2, "event": "note", "data": 2, "ack": 5},
            {"type": "msg", "seq": 3, "event": "note", "data": 3},
        )
        assert (await client.wait_closed())[0] == 1002
    assert seen == [1]


async def test_an_ack_of_what_the_same_read_let_out_is_above_what_was_sent(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """The acks of one read are checked against what was written before the read: an
    ack of what an earlier ack of the same read lets out (not yet written, so never
    seen by the client) is 1002."""
    server = make_server(window=4)
    async with trio.open_nursery() as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        await client.send({"type": "msg", "seq": 1, "event": "push", "data": 10})
        assert [(await client.recv())["seq"] for _ in range(4)] == [1, 2, 3, 4]
        await client.send({"type": "ack", "ack": 4}, {"type": "ack", "ack": 6})
        assert (await client.wait_closed())[0] == 1002


@TIMERS
async def test_an_ack_held_by_the_window_goes_alone_within_100ms(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    node_timers: bool,
) -> None:
    server = make_server(window=4)
    async with timed_connection(server, node_timers) as client:
        await client.hello()
        await client.send({"type": "msg", "seq": 1, "event": "push", "data": 4})
        assert [(await client.recv())["seq"] for _ in range(4)] == [1, 2, 3, 4]
        # The reply (seq 5) waits for the window; the ack of client seq 1 does not.
        start = trio.current_time()
        ack = await client.recv()
        assert ack == {"type": "ack", "ack": 1}
        assert trio.current_time() - start == pytest.approx(0.1)
        await client.close()


async def test_duplicates_are_acked_again_not_processed_again(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
) -> None:
    calls: list[Any] = []
    gateway = Gateway()

    @gateway.on("count")
    async def count(session: Session, data: Any) -> int:
        calls.append(data)
        return len(calls)

    server = make_server(gateway)
    async with trio.open_nursery() as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        assert (await call(client, 1, "count", "a"))["data"] == 1
        await client.send({"type": "msg", "seq": 1, "event": "count", "data": "a"})
        assert await client.recv() == {"type": "ack", "ack": 1}
        assert calls == ["a"]
        await client.close()


@pytest.mark.parametrize("policy", ["close", "drop-oldest"])
async def test_slow_consumer_policy(
    autojump_clock: MockClock, make_server: Callable[..., Server], policy: str
) -> None:
    """The client stops reading and keeps pinging: pongs pile up in the queue."""
    server = make_server(queue_size=3, slow_consumer=policy, heartbeat_interval=None)
    async with (
        trio.open_nursery() as nursery,
        open_memory_connection(server, nursery, lockstep=True) as client,
    ):
        await client.send({"type": "hello"})
        await client.recv_type("welcome")
        (connection,) = server.connections
        await client.send(*[{"type": "ping", "ts": n} for n in range(10)])
        await trio.testing.wait_all_tasks_blocked()
        if policy == "close":
            assert connection.close_code == 4004
            assert connection.close_reason == "slow_consumer"
        else:
            assert not connection.closing
            assert connection.queue_depth <= 3
            await client.close()


@pytest.mark.parametrize("code", [999, 1004, 1005, 1006, 1015, 2999, 5000])
async def test_a_close_code_no_close_frame_may_carry_is_refused_before_anything(
    autojump_clock: MockClock, make_server: Callable[..., Server], code: int
) -> None:
    """Found by a hostile review: Session.close decided to close, then websockets
    refused the code: no close frame went out, the error reached the application,
    and the peer saw 1006 after close_timeout. ValueError now, and nothing decided."""
    server = make_server()
    async with trio.open_nursery() as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        (session,) = server.hub.sessions.values()
        (connection,) = server.connections
        with pytest.raises(ValueError, match="close code"):
            session.close(code)
        assert not connection.closing
        session.close(4000, "the application's own")
        assert (await client.wait_closed())[0] == 4000


async def test_drop_oldest_keeps_its_byte_count_of_what_it_dropped(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Found by a review of the pong bound: pongs dropped by drop-oldest stayed in the
    bytes counted against max_buffered_bytes, and a peer the policy kept by dropping
    got 4004 after enough small pings."""
    server = make_server(
        queue_size=3, slow_consumer="drop-oldest", max_buffered_bytes=2000, heartbeat_interval=None
    )
    async with (
        trio.open_nursery() as nursery,
        open_memory_connection(server, nursery, lockstep=True) as client,
    ):
        await client.send({"type": "hello"})
        await client.recv_type("welcome")
        (connection,) = server.connections
        for n in range(40):  # 40 pongs of about 130 bytes: 5 KB in all, 3 queued at most
            await client.send({"type": "ping", "ts": "t" * 100 + str(n)})
        await trio.testing.wait_all_tasks_blocked()
        assert not connection.closing
        assert connection.queue_depth <= 3
        await client.close()


async def test_drop_oldest_never_drops_the_welcome(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Found by a hostile review: the welcome was queued as a control envelope the
    slow-consumer policy may drop, and a resume whose resend filled the queue lost
    it to a connect hook's send: the client got msgs with no welcome before them."""
    gateway = make_gateway()

    @gateway.on_connect
    async def greet(session: Session) -> None:
        session.send("greeting", "hi")

    server = make_server(gateway, window=2, queue_size=5, slow_consumer="drop-oldest")
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as client:
            first = await client.hello()
        await detached(server)
        (session,) = server.hub.sessions.values()
        for i in range(3):
            session.send("while away", i)
        async with open_memory_connection(server, nursery) as client:
            await client.send({"type": "hello", "resume": resume_of(first, 0)})
            got = []
            with contextlib.suppress(Closed):
                for _ in range(10):
                    got.append((await client.recv())["type"])
            assert got[:1] in (["welcome"], [])  # a welcome first, or a close (4004)
            if not got:
                assert client.close_code == 4004


async def test_a_full_queue_closes_4004_and_the_session_buffers_up_to_max_buffered(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
) -> None:
    server = make_server(window=2, queue_size=5, max_buffered=8)
    async with trio.open_nursery() as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        (connection,) = server.connections
        assert connection.session is not None
        session = connection.session
        for i in range(6):  # 2 in flight, 3 held back: the sixth overflows the queue
            session.send("x", i)
        assert connection.close_code == 4004
        assert await client.wait_closed() == (4004, "slow consumer")
        await connection.wait_released()
        assert session.connection is None
        assert not session.closed  # docs/protocol.md §8: kept, within max_buffered
        session.send("x", 6)
        session.send("x", 7)
        with pytest.raises(SlowConsumer):
            session.send("x", 8)  # the ninth unacknowledged envelope
        assert session.closed
        assert server.hub.sessions == {}


async def test_hooks_and_tasks_live_in_the_connection_nursery(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    tasks: Callable[[], int],
    transport: str,
) -> None:
    events: list[str] = []
    gateway = make_gateway()

    @gateway.on_connect
    async def connected(session: Session) -> None:
        events.append("connect")
        session.send("hi", None)

    @gateway.on_disconnect
    async def disconnected(session: Session) -> None:
        events.append(f"disconnect {session.close_code}")

    @gateway.task
    async def ticker(session: Session) -> None:
        try:
            while True:
                await trio.sleep(1)
                session.send("tick", trio.current_time())
        finally:
            events.append("ticker cancelled")

    server = make_server(gateway, heartbeat_interval=None)
    before = tasks()
    async with trio.open_nursery() as nursery:
        async with open_memory_connection(server, nursery) as client:
            await client.hello()
            assert (await client.recv())["event"] == "hi"
            ticks = [await client.recv_type("msg") for _ in range(3)]
            assert [t["event"] for t in ticks] == ["tick"] * 3
            await client.close()
            await client.wait_closed()
        await trio.testing.wait_all_tasks_blocked()
    # hypercorn tells an ASGI app no close code of the peer's (docs/transports.md).
    code = 1006 if transport == "asgi" else 1000
    assert events == ["connect", "ticker cancelled", f"disconnect {code}"]
    assert tasks() == before


async def test_bye_ends_the_session_with_1000(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server()
    async with trio.open_nursery() as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        (connection,) = server.connections
        await client.send({"type": "bye"})
        assert await client.wait_closed() == (1000, "bye")
        assert connection.close_reason == "bye"


async def test_client_ping_gets_pong_with_ts_echoed(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server()
    async with trio.open_nursery() as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        await client.send({"type": "ping", "ts": {"any": ["thing"]}})
        assert await client.recv() == {"type": "pong", "ts": {"any": ["thing"]}}
        await client.close()


async def test_a_closed_client_is_refused_as_closed(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server()
    async with trio.open_nursery() as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        await client.close(1000)
        await client.wait_closed()
        with pytest.raises(Closed):
            await client.recv()


@HANDLER_WAYS
async def test_a_handler_whose_session_overflows_is_not_answered_nor_logged_as_a_crash(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    caplog: pytest.LogCaptureFixture,
    way: str,
) -> None:
    # The queue overflows at 6 envelopes (4004), the session's buffer at 20: it ends.
    server = make_server(window=2, queue_size=5, max_buffered=20)
    async with trio.open_nursery() as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        await client.send({"type": "msg", "seq": 1, "event": "push" + way, "data": 100})
        assert await client.wait_closed() == (4004, "slow consumer")
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert (
        server.metrics.registry.get_sample_value(
            "wsgate_handler_seconds_count", {"outcome": "closed"}
        )
        == 1
    )


async def test_one_slow_member_does_not_fail_a_chat_broadcast(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    from examples.chat import gateway

    server = make_server(gateway, queue_size=3, heartbeat_interval=None)
    async with (
        trio.open_nursery() as nursery,
        open_memory_connection(server, nursery, lockstep=True) as slow,
    ):
        await slow.send({"type": "hello"})
        await slow.recv_type("welcome")  # and then never reads again
        (slow_connection,) = server.connections
        async with open_memory_connection(server, nursery) as talker:
            await talker.hello()
            for seq in range(1, 8):
                await talker.send({"type": "msg", "seq": seq, "event": "say", "data": "x"})
                reply = await talker.recv_type("reply")
                assert "error" not in reply
            await talker.close()
        assert slow_connection.close_code == 4004


async def test_the_last_reply_of_a_batch_is_written_without_waking_the_timers(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """The dispatcher writes the replies of its batch right after the last one: that
    one asks nothing of the node's timers' task, so a request that arrives alone is
    answered in two task steps (the reader's, the dispatcher's), not three. An earlier
    reply of a batch does ask the timers, since the handler after it may wait."""
    server = make_server()
    async with timed_connection(server, node_timers=True) as client:
        await client.hello()
        assert (await call(client, 1, "echo-waiting", 1))["data"] == 1
        async with scheduled("Timers.run") as timers:
            assert (await call(client, 2, "echo-waiting", 2))["data"] == 2
        assert timers.count == 0
        async with scheduled("Timers.run") as timers:
            await client.send(
                {"type": "msg", "seq": 3, "event": "echo-waiting", "data": 3},
                {"type": "msg", "seq": 4, "event": "echo-waiting", "data": 4},
            )
            replies = [await client.recv_type("reply") for _ in range(2)]
        assert [reply["data"] for reply in replies] == [3, 4]
        assert timers.count == 1


@pytest.mark.transports("websockets")  # the others cannot tell a read held one message
async def test_a_handler_that_never_waits_runs_in_the_readers_step(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """A request alone in its read, whose handler has no await, is run by the reader,
    and its reply written with the read's other answers: neither the dispatcher's
    task nor the timers' is woken for it. One whose handler awaits wakes the
    dispatcher, and so does a message of several envelopes (a sign of load)."""
    server = make_server()
    async with timed_connection(server, node_timers=True) as client:
        await client.hello()
        assert (await call(client, 1, "echo-waiting", 1))["data"] == 1
        async with (
            scheduled("Connection._application") as dispatcher,
            scheduled("Timers.run") as timers,
        ):
            assert (await call(client, 2, "echo", 2))["data"] == 2
            assert (await call(client, 3, "echo", 3))["data"] == 3
        assert (dispatcher.count, timers.count) == (0, 0)
        async with scheduled("Connection._application") as dispatcher:
            assert (await call(client, 4, "echo-waiting", 4))["data"] == 4
        assert dispatcher.count >= 1
        async with scheduled("Connection._application") as dispatcher:
            await client.send(
                {"type": "msg", "seq": 5, "event": "echo", "data": 5},
                {"type": "msg", "seq": 6, "event": "echo", "data": 6},
            )
            replies = [await client.recv_type("reply") for _ in range(2)]
        assert [(reply["re"], reply["data"]) for reply in replies] == [(5, 5), (6, 6)]
        assert dispatcher.count >= 1


@HANDLER_WAYS
async def test_the_ack_a_request_carries_is_applied_before_its_handler_runs(
    autojump_clock: MockClock, make_server: Callable[..., Server], way: str
) -> None:
    """What the request acknowledges no longer counts against ``max_buffered_bytes``
    when its handler queues more: 50 pushes answered by 50 more, each batch under the
    bound, the two together over it."""
    server = make_server(max_buffered_bytes=4000)
    async with trio.open_nursery() as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        await client.send({"type": "msg", "seq": 1, "event": "push" + way, "data": 50})
        last = (await client.recv_type("reply"))["seq"]
        await client.send({"type": "msg", "seq": 2, "event": "push" + way, "data": 50, "ack": last})
        reply = await client.recv_type("reply")
        assert (reply["re"], reply["data"]) == (2, 50)
        assert client.close_code is None
        await client.close()


_SEEN: contextvars.ContextVar[Any] = contextvars.ContextVar("_SEEN", default=None)


@HANDLER_WAYS
async def test_what_a_handler_sets_in_its_context_stays_there(
    autojump_clock: MockClock, make_server: Callable[..., Server], way: str
) -> None:
    """A context variable a handler sets is not seen by the connection's other tasks,
    whichever task ran it: not by the dispatcher restarted after it retired."""
    gateway = make_gateway()

    @gateway.on("set")
    async def set_it(session: Session, data: Any) -> Any:
        _SEEN.set(data)

    gateway.on("set-waiting")(_awaiting(set_it))

    @gateway.on("get")
    async def get(session: Session, data: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return _SEEN.get()

    server = make_server(gateway, heartbeat_interval=10, heartbeat_timeout=100)
    async with timed_connection(server, node_timers=True) as client:
        await client.hello()
        await call(client, 1, "set" + way, "set")
        # Idle for heartbeat intervals: a dispatcher that ran it retires, and "get"
        # starts one from the reader's context, which "set" must not have changed.
        await trio.sleep(35)
        got = await call(client, 2, "get")
        assert "error" not in got
        assert got.get("data") is None  # (a reply with data None leaves it out)
        await client.close()


def _awaiting(handler: Any) -> Any:
    async def awaiting(session: Session, data: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return await handler(session, data)

    return awaiting


async def test_a_handler_that_never_waits_waits_its_turn(
    autojump_clock: MockClock, make_server: Callable[..., Server], transport: str
) -> None:
    """Run by the reader only when nothing is ahead of it: behind a handler that is
    waiting, in the same message or a later one, it runs after it, in order."""
    server = make_server()
    async with trio.open_nursery() as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        start = trio.current_time()
        await client.send(
            {"type": "msg", "seq": 1, "event": "sleep", "data": 3},
            {"type": "msg", "seq": 2, "event": "echo", "data": "b"},
        )
        await client.send({"type": "msg", "seq": 3, "event": "echo", "data": "c"})
        replies = [await client.recv_type("reply") for _ in range(3)]
        assert [(reply["re"], reply["data"]) for reply in replies] == [(1, 3), (2, "b"), (3, "c")]
        assert trio.current_time() - start == 3
        # Once the dispatcher is idle again, the reader runs it at once (with the
        # transport that can tell a read held one message).
        await trio.testing.wait_all_tasks_blocked()
        async with scheduled("Connection._application") as dispatcher:
            assert (await call(client, 4, "echo", "d"))["data"] == "d"
        assert (dispatcher.count == 0) is (transport == "websockets")
        await client.close()


async def test_connect_hooks_run_before_a_handler_that_never_waits(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """A request read while the connect hooks still run waits for them, even if its
    handler could run in the reader's step."""
    gateway = make_gateway()
    ran: list[str] = []

    @gateway.on_connect
    async def slow_hook(session: Session) -> None:
        await trio.sleep(2)
        ran.append("hook")

    @gateway.on("note")
    async def note(session: Session, data: Any) -> Any:
        ran.append("handler")
        return trio.current_time()

    server = make_server(gateway)
    async with trio.open_nursery() as nursery, open_memory_connection(server, nursery) as client:
        start = trio.current_time()
        await client.hello()
        reply = await call(client, 1, "note")
        assert ran == ["hook", "handler"]
        assert reply["data"] - start == 2
        await client.close()


@pytest.mark.transports("websockets")  # the one whose reader runs requests itself
async def test_a_bug_in_what_the_reader_runs_closes_1011_and_the_close_completes(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not a handler's exception (that is an error reply) but the node's own, where
    the reader runs a request: 1011, logged, as in the dispatcher's task, and the
    reader reads on to the end of the close handshake."""
    from trio_wsgate.dispatch import Dispatcher

    def broken(*args: Any) -> bool:
        raise RuntimeError("a bug")

    server = make_server(close_timeout=30)
    async with trio.open_nursery() as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        monkeypatch.setattr(Dispatcher, "run_now", broken)
        start = trio.current_time()
        await client.send({"type": "msg", "seq": 1, "event": "echo", "data": 1})
        assert await client.wait_closed() == (1011, "internal error")
        (connection,) = server.connections
        await connection.wait_released()
        assert trio.current_time() == start  # answered, not timed out after 30 s
    assert any("a bug" in str(r.exc_info) for r in caplog.records if r.exc_info)
