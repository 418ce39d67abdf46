"""The reliable client (trio_wsgate.client) against the real server, in memory, on MockClock."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from trio_wsgate import (
    Backoff,
    Client,
    ClientClosed,
    ClientState,
    Gateway,
    HandlerError,
    Server,
    Session,
    SessionLost,
    open_client,
)
from trio_wsgate.client import reconnects_after
from trio_wsgate.protocol import JsonCodec, Welcome
from trio_wsgate.transports import Accept, UpgradeRequest
from trio_wsgate.transports.websockets import Handshake, accept_websocket

from .conftest import make_gateway


async def accept_json(request: UpgradeRequest) -> Accept:
    return Accept("wsgate.v1.json")


URL = "ws://gateway.test/ws"


class Wire:
    """A connector of in-memory streams to ``server`` that a test can cut or refuse."""

    def __init__(self, server: Server | None, nursery: trio.Nursery) -> None:
        self.server = server
        self.nursery = nursery
        self.attempts: list[float] = []
        self.refuse = 0  # refuse this many attempts (connection refused)
        self.latency = 0.0  # each attempt takes this long to connect
        self.streams: list[tuple[trio.abc.Stream, trio.abc.Stream]] = []
        self.serve: Callable[[trio.abc.Stream], Any] | None = None

    async def connect(self) -> trio.abc.Stream:
        self.attempts.append(trio.current_time())
        await trio.sleep(self.latency)
        if self.refuse:
            self.refuse -= 1
            raise ConnectionRefusedError("refused")
        client_stream, server_stream = trio.testing.memory_stream_pair()
        self.streams.append((client_stream, server_stream))
        if self.serve is not None:
            self.nursery.start_soon(self.serve, server_stream)
        else:
            assert self.server is not None
            self.nursery.start_soon(self.server.serve_stream, server_stream, "memory")
        return client_stream

    async def cut(self) -> None:
        """Drop the live connection without a close frame: both ends see it at once."""
        for stream in self.streams[-1]:
            await trio.aclose_forcefully(stream)


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_request_send_and_messages(
    autojump_clock: MockClock, make_server: Callable[..., Server], encoding: str
) -> None:
    server = make_server()
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect, encoding=encoding) as client:
            assert await client.wait_connected() is ClientState.CONNECTED
            assert await client.request("echo", {"a": [1, 2]}) == {"a": [1, 2]}
            with pytest.raises(HandlerError) as info:
                await client.request("refuse")
            assert (info.value.code, info.value.reason) == ("not_allowed", "no, thanks")
            assert await client.request("push", 3) == 3
            got = []
            async for message in client.messages():
                got.append((message.event, message.data))
                if len(got) == 3:
                    break
            assert got == [("pushed", 0), ("pushed", 1), ("pushed", 2)]
            session_id = client.session
        assert client.closed
        await trio.testing.wait_all_tasks_blocked()
        # aclose() said bye: the session ended on the server too.
        assert session_id not in server.hub.sessions
        assert server.metrics.registry.get_sample_value(
            "wsgate_sessions_ended_total", {"why": "bye"}
        )


async def test_sends_are_delivered_in_order_and_the_close_flushes_them(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    seen: list[Any] = []
    gateway = Gateway()

    @gateway.on("note")
    async def note(session: Session, data: Any) -> None:
        seen.append(data)

    server = make_server(gateway, window=4)
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect) as client:
            for i in range(50):  # queued before the connection is even up
                await client.send("note", i)
    assert seen == list(range(50))


async def test_the_backoff_schedule_is_full_jitter_with_exact_times(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    backoff = Backoff(base=1, factor=2, cap=8)
    server = make_server()
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        wire.refuse = 6
        start = trio.current_time()
        async with open_client(URL, connect=wire.connect, backoff=backoff, seed=7) as client:
            await client.wait_connected()
    rng = random.Random(7)
    expected, t = [start], start
    for attempt in range(6):
        t += backoff.delay(attempt, rng)
        expected.append(t)
    assert wire.attempts == pytest.approx(expected, abs=1e-9)
    # The ceilings double up to the cap: 1, 2, 4, 8, 8, 8.
    assert [backoff.ceiling(n) for n in range(6)] == [1, 2, 4, 8, 8, 8]
    gaps = [b - a for a, b in zip(wire.attempts, wire.attempts[1:], strict=False)]
    assert all(0 <= gap <= backoff.ceiling(n) for n, gap in enumerate(gaps))


async def test_max_attempts_gives_up(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    async with trio.open_nursery() as nursery:
        wire = Wire(make_server(), nursery)
        wire.refuse = 100
        async with open_client(
            URL, connect=wire.connect, backoff=Backoff(base=1, max_attempts=3), seed=1
        ) as client:
            with pytest.raises(ClientClosed, match="gave up after 3 attempts"):
                await client.wait_connected()
            with pytest.raises(ClientClosed):
                await client.send("echo", 1)
        assert len(wire.attempts) == 4  # the first try and three more


async def test_a_silent_server_is_detected_at_interval_plus_timeout(
    autojump_clock: MockClock,
) -> None:
    """A server that welcomes and then says nothing, ever (a blackholed peer)."""
    welcomed_at: list[float] = []

    async def silent_server(stream: trio.abc.Stream) -> None:
        result = await accept_websocket(
            stream,
            decide=accept_json,
            max_message_size=65536,
        )
        assert isinstance(result, Handshake)
        transport = result.transport
        await transport.receive()  # hello
        welcome = Welcome("s1", "t", False, 0, 5.0, 2.0, 16, 65536)
        transport.send_message(JsonCodec().encode(welcome), False)
        await transport.flush()
        welcomed_at.append(trio.current_time())
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        wire = Wire(None, nursery)
        wire.serve = silent_server
        async with open_client(URL, connect=wire.connect, seed=3) as client:
            await client.wait_connected()
            await client.wait_state(ClientState.CONNECTING)
            dead_at = trio.current_time()
            await client.wait_connected()  # and it reconnects
            nursery.cancel_scope.cancel()
    assert dead_at == welcomed_at[0] + 5.0 + 2.0


async def test_a_dropped_connection_resumes_and_loses_nothing(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    seen: list[int] = []
    gateway = make_gateway()

    @gateway.on("note")
    async def note(session: Session, data: int) -> int:
        await trio.sleep(0.01)  # a cut may cancel it: then it runs again
        seen.append(data)
        session.send("noted", data)
        return data

    server = make_server(gateway, window=8)
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect, seed=5) as client:
            states = []

            async def watch() -> None:
                async for state in client.state_changes():
                    states.append(state)

            nursery.start_soon(watch)
            await client.wait_connected()
            replies: list[int] = []

            async def requester() -> None:
                for i in range(200):
                    replies.append(await client.request("note", i))

            async def cutter() -> None:
                for _ in range(10):
                    await client.wait_connected()
                    await trio.sleep(0.37)
                    await wire.cut()
                    await client.wait_state(ClientState.CONNECTING)

            async with trio.open_nursery() as inner:
                inner.start_soon(requester)
                inner.start_soon(cutter)
            pushed = []
            async for message in client.messages():
                pushed.append(message.data)
                if len(pushed) == 200:
                    break
            await client.wait_connected()
            assert client.statistics().resumes == 10
    assert seen == list(range(200))
    assert replies == list(range(200))
    assert pushed == list(range(200))
    assert ClientState.RESUMED in states
    assert ClientState.SESSION_LOST not in states
    assert states[-1] is ClientState.CLOSED


async def test_a_lost_session_fails_written_requests_and_sends_the_unwritten(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    gateway = make_gateway()
    server = make_server(gateway, resume_ttl=1)
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect, seed=2) as client:
            await client.wait_connected()
            first = client.session
            outcome: list[Any] = []

            async def slow_request() -> None:
                try:
                    outcome.append(await client.request("sleep", 10))
                except SessionLost as exc:
                    outcome.append(exc)

            nursery.start_soon(slow_request)
            await trio.testing.wait_all_tasks_blocked()
            wire.latency = 2  # the server drops the session 1 s after the cut
            await wire.cut()
            await client.wait_state(ClientState.CONNECTING)
            await client.send("echo", "queued while away")  # never written: carried over
            assert await client.wait_connected() is ClientState.SESSION_LOST
            assert client.session != first
            await trio.testing.wait_all_tasks_blocked()
            assert len(outcome) == 1
            assert isinstance(outcome[0], SessionLost)
            assert await client.request("echo", "after") == "after"


@pytest.mark.parametrize(("code", "again"), [(4005, False), (4006, False), (1001, True)])
async def test_the_close_code_decides_whether_to_reconnect(
    autojump_clock: MockClock, make_server: Callable[..., Server], code: int, again: bool
) -> None:
    assert reconnects_after(code) is again
    server = make_server()
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect, seed=4) as client:
            await client.wait_connected()
            (connection,) = server.connections
            connection.close(code, "bye from the server")
            if again:
                assert await client.wait_state(ClientState.RESUMED) is ClientState.RESUMED
            else:
                await client.wait_state(ClientState.CLOSED)
                assert client.close_code == code
                with pytest.raises(ClientClosed):
                    async for _ in client.messages():
                        pass


async def test_retry_after_is_honoured(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server()
    server.draining = True  # 503 with Retry-After: 5
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(
            URL, connect=wire.connect, backoff=Backoff(base=1), seed=9
        ) as client:
            await trio.testing.wait_all_tasks_blocked()  # refused, and waiting
            assert len(wire.attempts) == 1
            server.draining = False
            await client.wait_connected()
    assert len(wire.attempts) == 2
    assert 5 <= wire.attempts[1] - wire.attempts[0] <= 6


async def test_sends_wait_when_max_pending_are_unacknowledged(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    gateway = make_gateway()
    server = make_server(gateway)
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect, max_pending=2) as client:
            await client.wait_connected()
            sent: list[float] = []
            done = trio.Event()

            async def sender() -> None:
                for _ in range(3):
                    await client.send("sleep", 10)  # each holds the handler 10 s
                    sent.append(trio.current_time())
                done.set()

            start = trio.current_time()
            nursery.start_soon(sender)
            await trio.testing.wait_all_tasks_blocked()
            assert sent == [start, start]  # the third waits for room
            assert client.statistics().pending == 2
            await done.wait()
            # The first is acknowledged once processed, 10 s later (the ack rides on
            # its reply), and that lets the third in.
            assert sent[2] == start + 10


async def test_a_closed_client_leaves_no_task_behind(
    autojump_clock: MockClock, make_server: Callable[..., Server], tasks: Callable[[], int]
) -> None:
    server = make_server()
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        before = tasks()
        for _ in range(20):
            async with open_client(URL, connect=wire.connect) as client:
                await client.request("echo", 1)
                await wire.cut()
                assert await client.request("echo", 2) == 2  # after a resume
        await trio.testing.wait_all_tasks_blocked()
        assert tasks() == before
        assert server.hub.sessions == {}  # each said bye


async def test_a_lost_session_fails_requests_whose_reply_was_lost_after_their_ack() -> None:
    """The server acknowledged (processed) the request, then lost the session with its
    reply: the waiter must not hang."""
    from trio_wsgate.client import Client, _Request

    client = Client(URL)
    waiter = _Request(trio.Event())
    client._requests[1] = waiter  # acked long ago: no longer in the outbox
    client.session = "old"
    client._new_session(window=8)
    assert waiter.done.is_set()
    assert isinstance(waiter.error, SessionLost)


async def test_topics_subscribe_publish_and_recover_after_a_lost_session(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    from trio_wsgate import JwtAuthenticator

    from .test_auth import SECRET, now, token

    gateway = make_gateway()
    gateway.authenticate(JwtAuthenticator(secret=SECRET, clock=now))
    # resume_ttl 0: every drop loses the session, so the client must recover topics.
    server = make_server(
        gateway, allow_subscribe=("room:*",), allow_publish=("room:*",), resume_ttl=0
    )
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect, token=token("ada")) as client:
            await client.wait_connected()
            assert client.user == "ada"
            sub = await client.subscribe("room:1")
            assert sub["offset"] == 0
            assert await client.publish("room:1", "one") == {"offset": 1, "epoch": sub["epoch"]}
            await gateway.send_to_user("ada", "dm one")
            with pytest.raises(HandlerError) as info:
                await client.subscribe("secret")
            assert info.value.code == "forbidden"
            received = []
            async for message in client.messages():
                received.append((message.topic, message.offset, message.data))
                if len(received) == 2:
                    break
            # Cut: the server forgets the session; meanwhile more is published.
            await wire.cut()
            await gateway.publish("room:1", "two")
            await gateway.send_to_user("ada", "dm two")
            assert await client.wait_state(ClientState.SESSION_LOST) is ClientState.SESSION_LOST
            async for message in client.messages():
                received.append((message.topic, message.offset, message.data))
                if len(received) == 4:
                    break
            await gateway.publish("room:1", "three")
            async for message in client.messages():
                received.append((message.topic, message.offset, message.data))
                break
            # In order within each topic (topics are recovered one after the other).
            assert received[:2] == [("room:1", 1, "one"), ("user:ada", 1, "dm one")]
            assert sorted(received[2:4]) == [("room:1", 2, "two"), ("user:ada", 2, "dm two")]
            assert received[4] == ("room:1", 3, "three")
            assert client.recovered == {"room:1": True, "user:ada": True}
            await client.unsubscribe("room:1")
            await gateway.publish("room:1", "four")
            await gateway.send_to_user("ada", "dm three")
            async for message in client.messages():
                assert (message.topic, message.data) == ("user:ada", "dm three")
                break


async def test_refresh_sends_a_fresh_token(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    from trio_wsgate import JwtAuthenticator

    from .test_auth import SECRET, now, token

    gateway = make_gateway()
    gateway.authenticate(JwtAuthenticator(secret=SECRET, clock=now))
    server = make_server(gateway)
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect, token=token("ada", ttl=30)) as client:
            await client.wait_connected()
            await trio.sleep(20)
            client.refresh(token("ada", ttl=60))
            await trio.sleep(20)  # past the first exp
            assert await client.request("echo", 1) == 1
            assert client.state is ClientState.CONNECTED


async def take(client: Client, received: list[tuple[int | None, Any]], count: int) -> None:
    """Add (offset, data) of the client's next messages to ``received`` until it holds
    ``count``; what has not come within 300 s of virtual time is missing, not awaited."""
    with trio.move_on_after(300):
        async for message in client.messages():
            received.append((message.offset, message.data))
            if len(received) >= count:
                return


async def test_a_live_publication_before_the_recovery_does_not_hide_the_gap(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    # docs/protocol.md §6.7: a new session follows user:<sub> from its start, so a
    # publication made as it opens can reach the client before the recovery (sub
    # since) sends what was missed; the client delivers the gap, then that one, each
    # once and in offset order, rather than taking the live offset as its position.
    from trio_wsgate import JwtAuthenticator

    from .test_auth import SECRET, now, token

    gateway = make_gateway()
    gateway.authenticate(JwtAuthenticator(secret=SECRET, clock=now))
    sessions = 0

    @gateway.on_connect
    async def greet(session: Session) -> None:
        nonlocal sessions
        if not session.resumed:
            sessions += 1
            if sessions > 1:  # before the client's own envelopes are processed
                await gateway.send_to_user("ada", "welcome back")

    server = make_server(gateway, resume_ttl=0)
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect, token=token("ada")) as client:
            await client.wait_connected()
            await gateway.send_to_user("ada", "one")
            received: list[tuple[int | None, Any]] = []
            await take(client, received, 1)
            await wire.cut()  # the session is lost (resume_ttl 0)
            await gateway.send_to_user("ada", "two")
            await gateway.send_to_user("ada", "three")
            assert await client.wait_state(ClientState.SESSION_LOST) is ClientState.SESSION_LOST
            await take(client, received, 4)
            assert received == [(1, "one"), (2, "two"), (3, "three"), (4, "welcome back")]
            assert client.recovered == {"user:ada": True}
            await gateway.send_to_user("ada", "five")
            async for message in client.messages():
                assert (message.offset, message.data) == (5, "five")
                break


async def test_an_envelope_over_the_servers_limit_is_refused_not_sent(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    # The server would close with 1009, which ends the client (docs/protocol.md §2.2):
    # the client refuses that one call and carries on.
    server = make_server(max_message_size=4096)
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect) as client:
            await client.wait_connected()
            with pytest.raises(ValueError, match="at most 4096"):
                await client.request("echo", "x" * 5000)
            with pytest.raises(ValueError, match="at most 4096"):
                await client.send("echo", "x" * 5000)
            assert await client.request("echo", "x" * 4000) == "x" * 4000
            assert client.state is ClientState.CONNECTED


async def test_a_recovery_answered_unavailable_holds_what_came_until_the_retry(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # docs/protocol.md §6.7: the new session follows room:1 already (its on_connect
    # joins it) and a live publication comes before the recovery; the broker cannot
    # answer the recovery at first. What came waits for the retry, which asks from the
    # same position: 2 and 3 are not skipped for 4.
    from trio_wsgate.exceptions import BrokerUnavailable

    gateway = make_gateway()
    sessions = 0

    @gateway.on_connect
    async def join(session: Session) -> None:
        nonlocal sessions
        if not session.resumed:
            sessions += 1
            if sessions > 1:
                await session.subscribe("room:1")
                await gateway.publish("room:1", "four")

    server = make_server(gateway, allow_subscribe=("room:*",), resume_ttl=0)
    real = server.hub.subscribe
    refusals = [1]

    async def flaky(session: Session, topic: str, since: Any = None) -> Any:
        if since is not None and topic == "room:1" and refusals:
            refusals.pop()
            raise BrokerUnavailable("injected: the broker is away")
        return await real(session, topic, since)

    monkeypatch.setattr(server.hub, "subscribe", flaky)
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect) as client:
            await client.wait_connected()
            await client.subscribe("room:1")
            await gateway.publish("room:1", "one")
            received: list[tuple[int | None, Any]] = []
            await take(client, received, 1)
            await wire.cut()  # the session is lost (resume_ttl 0)
            await gateway.publish("room:1", "two")
            await gateway.publish("room:1", "three")
            await take(client, received, 4)
            assert received == [(1, "one"), (2, "two"), (3, "three"), (4, "four")]
            assert not refusals  # the recovery was refused once, then retried
            assert client.recovered == {"room:1": True}
