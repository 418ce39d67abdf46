"""The Python client (trio_wsgate.client) at its edges: a late sub reply after a resume,
a close during a connection attempt, impossible welcomes, a recovery that gives up.
Each found by a hostile review, and failed before its fix. In memory, on MockClock:
times are virtual and asserted exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from trio_wsgate import ClientClosed, ClientState, Gateway, Server, Session, open_client
from trio_wsgate.protocol import CloseCode, JsonCodec, Welcome
from trio_wsgate.transports import Accept, UpgradeRequest
from trio_wsgate.transports.websockets import Handshake, accept_websocket

from .conftest import make_gateway
from .test_client import URL, Wire
from .test_protocol_v2_races import Peer, _connects, _reply, _scripted, _welcome


def _pub(topic: str, offset: int) -> dict[str, Any]:
    return {"type": "pub", "topic": topic, "offset": offset, "epoch": "E", "data": offset}


# -- 1. Version 2: a first sub answered after a resume, overtaken by a live pub ----------


@pytest.mark.parametrize("cancelled", [False, True], ids=["waited", "wait-cancelled"])
async def test_a_late_first_sub_reply_overtaken_by_a_live_pub_still_recovers_the_gap(
    autojump_clock: MockClock, make_server: Callable[..., Server], cancelled: bool
) -> None:
    # docs/protocol.md §14, "A sub's reply on a later connection": the server processed
    # the sub, the connection dropped before its reply (held back by a full window), and
    # p1..p4 were published meanwhile. After the resume the live p5 overtakes the resent
    # reply: it must not become the topic's position, or p1..p4 are never asked for.
    # Cancelling subscribe() does not unsend the sub: its reply still places the topic.
    gateway = make_gateway()
    server = make_server(gateway, window=2, allow_subscribe=("room:*",))
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect, protocol=2, buffer=0, seed=1) as client:
            await client.wait_connected()
            await client.send("push", 2)  # two msgs fill the window: buffer=0 acks nothing
            waiting = trio.CancelScope()

            async def subscribe() -> None:
                with waiting:
                    await client.subscribe("room:1")

            nursery.start_soon(subscribe)
            await trio.testing.wait_all_tasks_blocked()  # processed; its reply waits
            if cancelled:
                waiting.cancel()
            await wire.cut()
            for i in range(1, 5):
                await gateway.publish("room:1", f"p{i}")
            assert await client.wait_state(ClientState.RESUMED) is ClientState.RESUMED
            await gateway.publish("room:1", "p5")  # live: the reply still waits
            got: list[Any] = []
            with trio.move_on_after(60):
                async for message in client.messages():
                    if message.topic == "room:1":
                        got.append(message.data)
                    if len(got) == 5:
                        break
            assert got == ["p1", "p2", "p3", "p4", "p5"]
            assert client.recovered == {"room:1": True}
        nursery.cancel_scope.cancel()


async def test_live_pubs_before_a_late_first_reply_are_held_and_delivered_in_order(
    autojump_clock: MockClock,
) -> None:
    # The same race, scripted: the resumed connection sends the live pub 5 before the
    # resent reply of the first sub (offset 0). The client holds 5, asks the history
    # from the reply's offset (recover), and delivers 1..5 once each, in order.
    recoveries: list[dict[str, Any]] = []
    subscribed = trio.Event()

    async def script(number: int, peer: Peer, hello: dict[str, Any]) -> None:
        if number == 1:
            await peer.send(_welcome("s1", False, 0))
            await peer.recv_type("sub")  # processed; the reply never leaves
            subscribed.set()
        elif number == 2:
            await peer.send(_welcome("s1", True, 1), _pub("t", 5))
            await peer.send(_reply(1, 1, {"offset": 0, "epoch": "E"}))
            sub = await peer.recv_type("sub")
            recoveries.append(sub)
            await peer.send(*[_pub("t", offset) for offset in range(1, 6)])
            await peer.send(_reply(2, sub["seq"], {"offset": 5, "epoch": "E", "recovered": True}))

    got: list[Any] = []
    async with trio.open_nursery() as nursery:
        wire = Wire(None, nursery)
        wire.serve = _scripted(script)
        async with open_client(URL, connect=wire.connect, protocol=2, seed=1) as client:
            await client.wait_connected()
            nursery.start_soon(client.subscribe, "t")
            with trio.fail_after(5):
                await subscribed.wait()
            await wire.cut()
            await _connects(client, 2)
            with trio.move_on_after(30):
                async for message in client.messages():
                    got.append(message.data)
                    if len(got) == 5:
                        break
            recovered = dict(client.recovered)
        nursery.cancel_scope.cancel()
    assert [(s["topic"], s.get("since"), s.get("recover")) for s in recoveries] == [
        ("t", {"offset": 0, "epoch": "E"}, True)
    ]
    assert got == [1, 2, 3, 4, 5]
    assert recovered == {"t": True}


# -- 2. aclose() during a connection attempt; a cancelled aclose() ------------------------


async def test_aclose_during_a_connection_attempt_stays_closed(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    # The attempt takes 1 s; aclose() at 0.5 s closes at once (nothing to deliver). The
    # connection that comes up later is closed without a hello: no session on the
    # server, no CONNECTED, and CLOSED stays the state for good.
    server = make_server()
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        wire.latency = 1.0
        states: list[ClientState] = []
        async with open_client(URL, connect=wire.connect) as client:
            changes = client.state_changes()

            async def watch() -> None:
                async for state in changes:
                    states.append(state)

            nursery.start_soon(watch)
            await trio.sleep(0.5)
            start = trio.current_time()
            await client.aclose()
            assert trio.current_time() == start
            assert client.closed
            await trio.sleep(10)
            assert client.state is ClientState.CLOSED
            assert len(wire.attempts) == 1
            assert not server.hub.sessions
            assert not server.connections
        assert client.state is ClientState.CLOSED
        assert states == [ClientState.CLOSED]
        with trio.fail_after(1):  # the application closed it: iterators end at once
            assert [m async for m in client.messages()] == []
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("how", ["block-exit", "aclose-again"])
async def test_a_cancelled_aclose_is_finished_by_the_next_one(
    autojump_clock: MockClock, make_server: Callable[..., Server], how: str
) -> None:
    # aclose() waits for the send's ack (the handler sleeps 3 s); cancelled after 1 s it
    # leaves the client closing (sends refused), and the next aclose() -- the block's
    # exit, or the application's -- finishes it: the ack at 3 s, bye, CLOSED.
    ran: list[int] = []
    gateway = Gateway()

    @gateway.on("slow")
    async def slow(session: Session, data: Any) -> None:
        await trio.sleep(3)
        ran.append(data)

    server = make_server(gateway)
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect) as client:
            await client.wait_connected()
            start = trio.current_time()
            await client.send("slow", 1)
            with trio.move_on_after(1):
                await client.aclose()
            assert client.state is ClientState.CONNECTED
            with pytest.raises(ClientClosed):
                await client.send("slow", 2)
            if how == "aclose-again":
                await client.aclose()
                assert client.closed
        assert trio.current_time() - start == pytest.approx(3)
        assert client.state is ClientState.CLOSED
        assert ran == [1]
        await trio.testing.wait_all_tasks_blocked()
        assert not server.hub.sessions  # ended with bye
        nursery.cancel_scope.cancel()


# -- 3. A welcome with numbers no server sends --------------------------------------------


async def _accept_json(request: UpgradeRequest) -> Accept:
    return Accept("wsgate.v1.json")


@pytest.mark.parametrize(
    "fields",
    [
        {"window": 0},
        {"max_message_size": 0},
        {"heartbeat_interval": -1.0},
        {"heartbeat_timeout": -5.0},
        {"ack": 7},
    ],
    ids=[
        "window-0",
        "max-message-size-0",
        "negative-interval",
        "negative-timeout",
        "new-session-ack-7",
    ],
)
async def test_a_welcome_with_impossible_numbers_is_a_protocol_error(
    autojump_clock: MockClock, fields: dict[str, Any]
) -> None:
    # Nothing escapes into the application's block: the client closes with 1002 and
    # stops, as after any protocol error of the server's (docs/protocol.md §8), within
    # close_timeout of a server that never answers the close.
    closes: list[tuple[int, str]] = []

    async def server(stream: trio.abc.Stream) -> None:
        result = await accept_websocket(stream, decide=_accept_json, max_message_size=65536)
        assert isinstance(result, Handshake)
        transport = result.transport
        await transport.receive()  # hello
        settings: dict[str, Any] = {
            "session": "s1",
            "resume_token": "t",
            "resumed": False,
            "ack": 0,
            "heartbeat_interval": 25.0,
            "heartbeat_timeout": 10.0,
            "window": 16,
            "max_message_size": 65536,
        }
        settings.update(fields)
        transport.send_message(JsonCodec().encode(Welcome(**settings)), False)
        await transport.flush()
        while True:
            incoming = await transport.receive()
            if incoming.peer_close is not None:
                closes.append(incoming.peer_close)
            if incoming.eof or incoming.peer_close:
                await trio.sleep_forever()  # never answers the close

    async with trio.open_nursery() as nursery:
        wire = Wire(None, nursery)
        wire.serve = server
        start = trio.current_time()
        async with open_client(URL, connect=wire.connect, close_timeout=5) as client:
            with pytest.raises(ClientClosed) as info:
                await client.wait_connected()
        assert trio.current_time() - start == pytest.approx(5)
        assert info.value.code == CloseCode.PROTOCOL_ERROR
        assert client.close_code == CloseCode.PROTOCOL_ERROR
        assert closes == [(CloseCode.PROTOCOL_ERROR, client.close_reason)]
        assert "welcome" in client.close_reason
        assert len(wire.attempts) == 1  # a protocol error does not reconnect
        nursery.cancel_scope.cancel()


# -- 4. A resubscription retried after unavailable, then refused for good -----------------


async def test_a_retried_recovery_refused_for_good_wakes_the_reader_and_forgets_the_topic(
    autojump_clock: MockClock,
) -> None:
    # The recovery after a resume is answered unavailable; the live pub 3 that comes
    # meanwhile is held for the retry. The retry is answered not_subscribed (the
    # application unsubscribed the session): the held pub goes to the reader that
    # waits, at once, and the topic is not asked for again after the next resume.
    retried = trio.Event()
    later_subs: list[dict[str, Any]] = []

    async def script(number: int, peer: Peer, hello: dict[str, Any]) -> None:
        if number == 1:
            await peer.send(_welcome("s1", False, 0))
            sub = await peer.recv_type("sub")
            await peer.send(_reply(1, sub["seq"], {"offset": 0, "epoch": "E"}), _pub("t", 1))
        elif number == 2:
            await peer.send(_welcome("s1", True, 1))
            sub = await peer.recv_type("sub")
            await peer.send(_reply(2, sub["seq"], error="unavailable"), _pub("t", 3))
            sub = await peer.recv_type("sub")
            await peer.send(_reply(3, sub["seq"], error="not_subscribed"))
            retried.set()
        else:
            await peer.send(_welcome("s1", True, 3))
            while True:
                later_subs.append(await peer.recv_type("sub"))

    got: list[tuple[Any, float]] = []
    async with trio.open_nursery() as nursery:
        wire = Wire(None, nursery)
        wire.serve = _scripted(script)
        async with open_client(URL, connect=wire.connect, protocol=2, seed=1) as client:
            await client.wait_connected()
            await client.subscribe("t")

            async def read() -> None:
                async for message in client.messages():
                    got.append((message.data, trio.current_time()))

            nursery.start_soon(read)
            await wire.cut()
            await _connects(client, 2)
            with trio.fail_after(30):
                await retried.wait()
            answered = trio.current_time()
            await trio.sleep(5)
            assert got[1:] == [(3, answered)]  # at the answer, not at some later wake-up
            await wire.cut()
            await _connects(client, 3)
            await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert [data for data, _ in got] == [1, 3]
    assert later_subs == []


# -- 5. Version 2: a retry armed before a lost session ------------------------------------


async def test_a_retry_armed_before_a_lost_session_does_not_only_recover_in_the_new_one(
    autojump_clock: MockClock,
) -> None:
    # docs/protocol.md §14, "A session lost, then resumed". The recovery after a resume
    # is answered unavailable, and so are its retries: the next one is 4 to 12 s away
    # when the session is lost. The new session subscribes t again (plain), answered
    # unavailable for 20 s. The old retry must not fire into it with recover: the
    # session does not follow t yet, not_subscribed would drop t for good, silently.
    third: list[dict[str, Any]] = []
    cut = trio.Event()

    async def script(number: int, peer: Peer, hello: dict[str, Any]) -> None:
        if number == 1:
            await peer.send(_welcome("s1", False, 0))
            sub = await peer.recv_type("sub")
            await peer.send(_reply(1, sub["seq"], {"offset": 0, "epoch": "E"}), _pub("t", 1))
        elif number == 2:
            await peer.send(_welcome("s1", True, 1))
            for seq in range(2, 7):  # the recovery and four retries
                sub = await peer.recv_type("sub")
                await peer.send(_reply(seq, sub["seq"], error="unavailable"))
            cut.set()
        else:
            await peer.send(_welcome("s2", False, 0))
            until, followed, seq = trio.current_time() + 20, False, 0
            while True:
                sub = await peer.recv_type("sub")
                third.append(sub)
                seq += 1
                if sub.get("recover") and not followed:
                    await peer.send(_reply(seq, sub["seq"], error="not_subscribed"))
                elif trio.current_time() < until:
                    await peer.send(_reply(seq, sub["seq"], error="unavailable"))
                else:
                    followed = True
                    data = {"offset": 1, "epoch": "E", "recovered": True}
                    await peer.send(_reply(seq, sub["seq"], data), _pub("t", 2))

    got: list[Any] = []
    async with trio.open_nursery() as nursery:
        wire = Wire(None, nursery)
        wire.serve = _scripted(script)
        async with open_client(URL, connect=wire.connect, protocol=2, seed=1) as client:
            await client.wait_connected()
            await client.subscribe("t")
            await wire.cut()
            with trio.fail_after(30):
                await cut.wait()
            await wire.cut()
            with trio.move_on_after(120):
                async for message in client.messages():
                    got.append(message.data)
                    if len(got) == 2:
                        break
        nursery.cancel_scope.cancel()
    assert got == [1, 2]
    assert len(third) > 1  # the new session's sub, and its retries
    assert all(sub.get("recover") is None for sub in third)
    assert all(sub["since"] == {"offset": 1, "epoch": "E"} for sub in third)


# -- 6. refresh() while the hello is unanswered ------------------------------------------


async def test_a_refresh_between_hello_and_welcome_is_sent_after_the_welcome(
    autojump_clock: MockClock,
) -> None:
    # The hello carried the old token: the server's deadline is its exp, and the new
    # token must still reach it (4001 at the old exp would end the session).
    seen: list[Any] = []
    hello_came, refreshed = trio.Event(), trio.Event()

    async def script(number: int, peer: Peer, hello: dict[str, Any]) -> None:
        seen.append(hello.get("token"))
        hello_came.set()
        await refreshed.wait()
        await peer.send(_welcome("s1", False, 0))
        seen.append(await peer.recv_type("refresh"))

    async with trio.open_nursery() as nursery:
        wire = Wire(None, nursery)
        wire.serve = _scripted(script)
        async with open_client(
            URL, connect=wire.connect, protocol=2, token="old", seed=1
        ) as client:
            with trio.fail_after(5):
                await hello_came.wait()
            client.refresh("new")
            refreshed.set()
            await client.wait_connected()
            await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert seen == ["old", {"type": "refresh", "token": "new"}]


# -- 7. A resumed welcome with a smaller max_message_size ---------------------------------


async def test_a_resumed_welcome_with_a_smaller_limit_fails_what_no_longer_fits(
    autojump_clock: MockClock,
) -> None:
    # Resent, the 40000-byte envelopes would be closed 1009 by a node that takes 16384,
    # which ends the client. The server processed nothing above welcome.ack (1) and will
    # not unless they are resent: the request fails as a call over the limit does
    # (ValueError), the send is not resent, and what follows takes their seqs.
    second: list[tuple[int, str]] = []
    written = trio.Event()

    async def script(number: int, peer: Peer, hello: dict[str, Any]) -> None:
        if number == 1:
            await peer.send(_welcome("s1", False, 0))
            for _ in range(4):
                await peer.recv_type("msg")
            written.set()
        else:
            await peer.send(Welcome("s1", "rt-s1", True, 1, 0, 0, 16, 16384).to_wire())
            for seq in (1, 2):
                msg = await peer.recv_type("msg")
                second.append((msg["seq"], msg["event"]))
                await peer.send(_reply(seq, msg["seq"], msg["data"]))

    outcomes: dict[str, Any] = {}

    async def call(name: str, data: Any) -> None:
        try:
            outcomes[name] = await client.request(name, data)
        except ValueError as exc:
            outcomes[name] = exc

    async with trio.open_nursery() as nursery:
        wire = Wire(None, nursery)
        wire.serve = _scripted(script)
        async with open_client(URL, connect=wire.connect, protocol=2, seed=1) as client:
            await client.wait_connected()
            big = "x" * 40000
            await client.send("first", 1)
            nursery.start_soon(call, "store", big)
            await trio.testing.wait_all_tasks_blocked()
            await client.send("big", big)
            nursery.start_soon(call, "small", 4)
            with trio.fail_after(5):
                await written.wait()
            await wire.cut()
            await _connects(client, 2)
            assert client.state is ClientState.RESUMED
            with trio.move_on_after(60):
                outcomes["next"] = await client.request("next", 5)
            assert client.statistics().pending == 0
        nursery.cancel_scope.cancel()
    assert second == [(2, "small"), (3, "next")]
    assert isinstance(outcomes["store"], ValueError)
    assert "at most 16384" in str(outcomes["store"])
    assert (outcomes["small"], outcomes["next"]) == (4, 5)
