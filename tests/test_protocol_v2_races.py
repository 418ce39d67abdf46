"""Protocol version 2 (docs/protocol.md §14): the races a review found in the clients'
recovery and the server's answers, each a test that failed before its fix."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
import trio.testing
from trio.testing import MockClock

from trio_wsgate import ClientState, MemoryBroker, Server, Session, open_client
from trio_wsgate.brokers import History
from trio_wsgate.exceptions import BrokerUnavailable
from trio_wsgate.protocol import JSON_V2_SUBPROTOCOL, Welcome
from trio_wsgate.testing import open_memory_connection
from trio_wsgate.transports import Accept, UpgradeRequest
from trio_wsgate.transports.websockets import Handshake, accept_websocket

from .conftest import make_gateway
from .test_auth import token
from .test_client import URL, Wire
from .test_protocol_v2 import _Peer as Peer
from .test_protocol_v2 import _pub, jwt_node, open_server, slow_answers
from .test_resume import running
from .test_topics import Seq, request

# -- a scripted version-2 server ----------------------------------------------------------


async def _accept(request: UpgradeRequest) -> Accept:
    return Accept(JSON_V2_SUBPROTOCOL)


async def _open_peer(stream: trio.abc.Stream) -> Peer:
    result = await accept_websocket(stream, decide=_accept, max_message_size=65536)
    assert isinstance(result, Handshake)
    return Peer(result.transport)


def _scripted(
    script: Callable[[int, Peer, dict[str, Any]], Awaitable[None]],
) -> Callable[[trio.abc.Stream], Awaitable[None]]:
    """A scripted server: ``script(number, peer, hello)`` plays its ``number``-th
    connection (from 1) once ``hello`` came; a connection the client drops ends it."""
    count = 0

    async def serve(stream: trio.abc.Stream) -> None:
        nonlocal count
        count += 1
        number = count
        try:
            peer = await _open_peer(stream)
            hello = await peer.recv_type("hello")
            await script(number, peer, hello)
            await trio.sleep_forever()
        except Exception:
            return

    return serve


def _welcome(session: str, resumed: bool, ack: int) -> dict[str, Any]:
    return Welcome(session, "rt-" + session, resumed, ack, 0, 0, 16, 65536).to_wire()


def _reply(seq: int, re: int, data: Any = None, error: str | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"type": "reply", "seq": seq, "re": re, "ack": re}
    if error is not None:
        reply["error"] = {"code": error, "reason": error}
    else:
        reply["data"] = data
    return reply


def _msg(seq: int) -> dict[str, Any]:
    return {"type": "msg", "seq": seq, "event": "x", "data": seq}


async def _answer_subs(
    peer: Peer, seq: int, followed: set[str], offset: int, seen: list[dict[str, Any]]
) -> None:
    """Answer every ``sub`` as a server that follows ``followed`` would: a ``recover`` of
    another topic is ``not_subscribed``; any other follows its topic, from ``offset``.
    Replies are numbered after ``seq``; every sub is appended to ``seen``."""
    while True:
        sub = await peer.recv_type("sub")
        seen.append(sub)
        seq += 1
        if sub.get("recover") and sub["topic"] not in followed:
            await peer.send(_reply(seq, sub["seq"], error="not_subscribed"))
        else:
            followed.add(sub["topic"])
            data = {"offset": offset, "epoch": "E", "recovered": True}
            await peer.send(_reply(seq, sub["seq"], data))


async def _connects(client: Any, count: int) -> None:
    with trio.fail_after(60):
        if client.statistics().connects < count:
            async for _ in client.state_changes():
                if client.statistics().connects >= count:
                    break
        await trio.testing.wait_all_tasks_blocked()


# -- Finding 1: catch-up releases held live pubs above a gap ------------------------------


async def test_a_catch_up_that_falls_behind_again_loses_nothing(
    autojump_clock: MockClock,
) -> None:
    # buffer=4. Pubs 1..10: 1-4 kept, 5.. let go (position 4, behind). The application
    # takes two: catch-up asks since 4. Live 11 and 12 (published after the sub left the
    # client, before the server read it) come first and are held; the replay 5..12 then
    # finds the budget full (2 buffered + 2 held) and is let go. The reply releases
    # 11, 12: the position jumps to 12 and 5..10 are never asked again.
    async def serve(stream: trio.abc.Stream) -> None:
        try:
            peer = await _open_peer(stream)
            await peer.recv_type("hello")
            await peer.send(_welcome("s1", False, 0))
            seq, first = 0, True
            while True:
                sub = await peer.recv_type("sub")
                seq += 1
                since = sub.get("since")
                if since is None:
                    pubs = [_pub(n) for n in range(1, 11)]
                    await peer.send(_reply(seq, sub["seq"], {"offset": 0, "epoch": "E"}), *pubs)
                    continue
                out = []
                if first:
                    first = False
                    out += [_pub(11), _pub(12)]
                out += [_pub(n) for n in range(since["offset"] + 1, 13)]
                data = {"offset": 12, "epoch": "E", "recovered": True}
                await peer.send(*out, _reply(seq, sub["seq"], data))
        except Exception:
            return

    got: list[int | None] = []
    async with trio.open_nursery() as nursery:
        wire = Wire(None, nursery)
        wire.serve = serve
        async with open_client(URL, connect=wire.connect, protocol=2, buffer=4, seed=1) as client:
            await client.wait_connected()
            await client.subscribe("t")
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(30):
                async for message in client.messages():
                    got.append(message.offset)
                    if len(got) == 12:
                        break
        nursery.cancel_scope.cancel()
    assert got == list(range(1, 13)), got


# -- Finding 2: a resume drops the queued plain subs of a lost session --------------------


async def test_own_topics_not_yet_resubscribed_survive_a_resume(
    autojump_clock: MockClock,
) -> None:
    # Five own topics; the session is lost; the client sends 4 plain subs (at most four
    # at a time) and queues t5. The connection drops before any reply; the new session
    # is resumed: _on_welcome clears _to_recover and asks every topic with recover: true.
    # s2 never subscribed t5: not_subscribed, and the client forgets t5 for good.
    topics = [f"t{n}" for n in range(1, 6)]
    lost_subs: list[dict[str, Any]] = []
    later_subs: list[dict[str, Any]] = []
    second = trio.Event()

    async def script(number: int, peer: Peer, hello: dict[str, Any]) -> None:
        if number == 1:
            await peer.send(_welcome("s1", False, 0))
            for seq in range(1, 6):
                sub = await peer.recv_type("sub")
                await peer.send(_reply(seq, sub["seq"], {"offset": 0, "epoch": "E"}))
        elif number == 2:
            await peer.send(_welcome("s2", False, 0))  # s1 is gone
            for _ in range(4):
                lost_subs.append(await peer.recv_type("sub"))
            second.set()  # processed (s2 follows t1..t4); the replies never leave
        else:
            await peer.send(_welcome("s2", True, len(lost_subs)))
            resent = [
                _reply(i, s["seq"], {"offset": 0, "epoch": "E"}) for i, s in enumerate(lost_subs, 1)
            ]
            await peer.send(*resent)
            followed = {s["topic"] for s in lost_subs}
            await _answer_subs(peer, len(lost_subs), followed, 0, later_subs)

    async with trio.open_nursery() as nursery:
        wire = Wire(None, nursery)
        wire.serve = _scripted(script)
        async with open_client(URL, connect=wire.connect, protocol=2, seed=1) as client:
            await client.wait_connected()
            for topic in topics:
                await client.subscribe(topic)
            await wire.cut()
            assert await client.wait_state(ClientState.SESSION_LOST) is ClientState.SESSION_LOST
            with trio.fail_after(30):
                await second.wait()
            await trio.testing.wait_all_tasks_blocked()
            await wire.cut()
            assert await client.wait_state(ClientState.RESUMED) is ClientState.RESUMED
            await trio.testing.wait_all_tasks_blocked()
            followed_by_client = set(client._topics)
        nursery.cancel_scope.cancel()
    asked_plainly = {s["topic"] for s in lost_subs + later_subs if not s.get("recover")}
    # The application subscribed to t5 and never left it: the client must still follow
    # it, and the new session must have been asked to subscribe it (recover never does).
    assert "t5" in followed_by_client, followed_by_client
    assert "t5" in asked_plainly, asked_plainly


# -- Finding 3: _detach keeps an unprocessed direct msg behind a released pub -------------


async def test_a_direct_message_past_the_buffer_is_not_delivered_twice(
    autojump_clock: MockClock,
) -> None:
    # buffer=4. During a recovery (resumed welcome) the server sends pub 1 (held), then
    # direct msgs 2..6 (6 is past the buffer: not processed, not acked), then the reply,
    # which appends pub 1 (seq 0) after msg 6. A drop: _detach pops from the end only
    # while seq > processed, stops at the seq-0 pub, and keeps msg 6; the resume resends
    # seq 6 (resume.ack 5) and the inbox takes it again.
    done = trio.Event()

    async def script(number: int, peer: Peer, hello: dict[str, Any]) -> None:
        if number == 1:
            await peer.send(_welcome("s1", False, 0))
            sub = await peer.recv_type("sub")
            await peer.send(_reply(1, sub["seq"], {"offset": 0, "epoch": "E"}))
        elif number == 2:
            await peer.send(_welcome("s1", True, 1))
            sub = await peer.recv_type("sub")  # the recovery of t (client seq 2)
            data = {"offset": 1, "epoch": "E", "recovered": True}
            await peer.send(_pub(1), *[_msg(k) for k in range(2, 7)], _reply(7, sub["seq"], data))
            done.set()
        else:
            await peer.send(_welcome("s1", True, 2))
            above = hello["resume"]["ack"]
            resend = [_msg(k) for k in range(above + 1, 7)]
            if above < 7:
                resend.append(_reply(7, 2, {"offset": 1, "epoch": "E", "recovered": True}))
            await peer.send(*resend)
            seq = 7
            while True:
                sub = await peer.recv_type("sub")
                seq += 1
                data = {"offset": 1, "epoch": "E", "recovered": True}
                await peer.send(_reply(seq, sub["seq"], data))

    got: list[tuple[str | None, int | None, Any]] = []
    async with trio.open_nursery() as nursery:
        wire = Wire(None, nursery)
        wire.serve = _scripted(script)
        async with open_client(URL, connect=wire.connect, protocol=2, buffer=4, seed=1) as client:
            await client.wait_connected()
            await client.subscribe("t")
            await wire.cut()
            await _connects(client, 2)
            with trio.fail_after(30):
                await done.wait()
            await trio.testing.wait_all_tasks_blocked()
            await wire.cut()
            await _connects(client, 3)
            with trio.move_on_after(10):
                async for message in client.messages():
                    got.append((message.topic, message.offset, message.data))
        nursery.cancel_scope.cancel()
    direct = [data for topic, _, data in got if topic is None]
    assert direct == [2, 3, 4, 5, 6], got


# -- Finding 4: a first sub answered after a drop places the topic past a dead pub --------


async def test_a_v2_sub_answer_leaves_out_a_pub_held_during_its_history_read(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = open_server(make_server)
    broker = slow_answers(server)
    answers: list[dict[str, Any]] = []
    async with (
        running(server) as nursery,
        open_memory_connection(server, nursery, subprotocols=[JSON_V2_SUBPROTOCOL]) as client,
    ):
        await client.hello()
        gate = broker.gate = trio.Event()

        async def sub() -> None:
            answers.append(await request(client, Seq(), "sub", topic="room:1"))

        nursery.start_soon(sub)
        await trio.testing.wait_all_tasks_blocked()
        await server.gateway.publish("room:1", "held")  # during the history read
        gate.set()
        broker.gate = None
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    (answer,) = answers
    # Had the reply counted pub 1 (offset 1) and pub 1 died with the connection, the
    # client would take the resent reply as its place (§14) and never ask for it.
    # Answering where the history stood (0) is safe: the client moves its position
    # forward only, and drops pub 1 if it did arrive.
    assert answer["data"]["offset"] == 0, answer


# -- Finding 5: a recovery raised to the floor says recovered: true ----------------------


async def test_a_recovery_raised_to_the_floor_does_not_say_recovered(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    gateway = make_gateway()

    @gateway.on_connect
    async def join(session: Session) -> None:
        await session.subscribe("news")  # not one the client may subscribe to itself

    server = open_server(make_server, gateway=gateway, resume_ttl=0)
    got: list[Any] = []
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect, protocol=2, seed=3) as client:
            await client.wait_connected()
            await gateway.publish("news", "n1")
            with trio.fail_after(10):
                async for message in client.messages():
                    got.append(message.data)
                    break
            wire.latency = 1  # n2 is published before the new session's on_connect
            await wire.cut()
            await client.wait_state(ClientState.CONNECTING)
            await gateway.publish("news", "n2")  # while away; the session is gone
            assert await client.wait_state(ClientState.SESSION_LOST) is ClientState.SESSION_LOST
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(10):
                async for message in client.messages():
                    got.append(message.data)
            recovered = dict(client.recovered)
        nursery.cancel_scope.cancel()
    # The client asked since 1 and the server answered from the new session's floor (2):
    # n2 was skipped, yet the reply says recovered: true, so the application never reloads.
    assert "n2" in got or recovered.get("news") is False, (got, recovered)


# Version 1 too: topic msgs past the buffer cap were taken (their position moved), the
# drop let them go, and the resume resent them as "already received".
async def test_v1_topic_msgs_past_the_buffer_survive_a_drop(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = open_server(make_server)
    got: list[Any] = []
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect, protocol=1, buffer=2, seed=1) as client:
            await client.wait_connected()
            await client.subscribe("room:1")
            for n in range(1, 6):
                await server.gateway.publish("room:1", n)
            await trio.testing.wait_all_tasks_blocked()
            await wire.cut()
            assert await client.wait_state(ClientState.RESUMED) is ClientState.RESUMED
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(10):
                async for message in client.messages():
                    got.append(message.offset)
        nursery.cancel_scope.cancel()
    assert got == [1, 2, 3, 4, 5], got


# a recover sub that was never written is carried into a new session with
#    recover: true (JS strips it); it goes before the plain resubscription and is answered
#    not_subscribed: the client forgets its own topic.
async def test_v2_carried_recover_sub_of_an_own_topic(autojump_clock: MockClock) -> None:
    seen: list[dict[str, Any]] = []

    async def script(number: int, peer: Peer, hello: dict[str, Any]) -> None:
        if number == 1:
            await peer.send(_welcome("s1", False, 0))
            sub = await peer.recv_type("sub")
            await peer.send(_reply(1, sub["seq"], {"offset": 0, "epoch": "E"}), _pub(1))
        elif number == 2:
            await peer.send(_welcome("s1", True, 1))
        else:
            await peer.send(_welcome("s2", False, 0))
            await _answer_subs(peer, 0, set(), 1, seen)

    async with trio.open_nursery() as nursery:
        wire = Wire(None, nursery)
        wire.serve = _scripted(script)
        async with open_client(URL, connect=wire.connect, protocol=2, seed=1) as client:
            await client.wait_connected()
            await client.subscribe("t")
            await trio.testing.wait_all_tasks_blocked()
            for i in range(16):  # the window (16): never acked
                await client.send("x", i)
            await trio.testing.wait_all_tasks_blocked()
            await wire.cut()
            await _connects(client, 2)  # resumed: the recovery of t waits behind the window
            await wire.cut()
            assert await client.wait_state(ClientState.SESSION_LOST) is ClientState.SESSION_LOST
            await trio.testing.wait_all_tasks_blocked()
            topics = dict(client._topics)
            server_topics = set(client._server_topics)
        nursery.cancel_scope.cancel()
    assert "t" in topics, seen
    assert "t" not in server_topics


# Server: a replay (recovery) is queued without check_room, but it counts in
#    queue_depth: a pub held during the history read (delivered right after, live) then
#    finds the queue "full" and closes with 4004, although §14 says a recovery does not
#    count against --queue-size (and enqueue_unsequenced: "so that a recovery larger
#    than those bounds completes").
async def test_v2_replay_larger_than_queue_size(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = open_server(make_server, queue_size=10, history_size=50)
    broker = slow_answers(server)
    codes: list[Any] = []
    async with (
        running(server) as nursery,
        open_memory_connection(server, nursery, subprotocols=[JSON_V2_SUBPROTOCOL]) as client,
    ):
        await client.hello()
        last = None
        for n in range(20):
            last = await server.gateway.publish("room:1", n)
        seq = Seq()
        broker.gate = trio.Event()
        await client.send(seq("sub", topic="room:1", since={"offset": 0, "epoch": last.epoch}))
        await trio.testing.wait_all_tasks_blocked()
        await server.gateway.publish("room:1", "live")  # during the history read
        broker.gate.set()
        broker.gate = None
        with trio.move_on_after(5):
            while True:
                try:
                    await client.recv()
                except Exception as exc:
                    codes.append(repr(exc))
                    break
        codes.append(client.close_code)
        nursery.cancel_scope.cancel()
    assert 4004 not in codes, codes


# A first version-2 session: what its user topic was given during the history read of
# its subscription, before its welcome, comes right after the welcome.
async def test_a_first_session_gets_what_its_user_topic_gave_it_before_its_welcome(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server, broker = jwt_node(make_server)
    gateway, gate = server.gateway, broker.gate
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect, protocol=2, token=token("ada")) as client:
            await trio.testing.wait_all_tasks_blocked()
            await gateway.send_to_user("ada", "meanwhile")  # during the history read
            gate.set()
            broker.gate = None
            await client.wait_connected()
            await trio.testing.wait_all_tasks_blocked()
            await gateway.send_to_user("ada", "after")
            got = []
            with trio.fail_after(30):
                async for message in client.messages():
                    got.append((message.offset, message.data))
                    if len(got) == 2:
                        break
            assert got == [(1, "meanwhile"), (2, "after")], got
        nursery.cancel_scope.cancel()


async def _following(client: Any, server: Server) -> list[Any]:
    """Once connected, subscribe to room:1 and take its first publication, "one"."""
    await client.wait_connected()
    await client.subscribe("room:1")
    await server.gateway.publish("room:1", "one")
    async for message in client.messages():
        return [message.data]
    raise AssertionError("no message")


# A version-2 recovery whose history read fails or is cut short leaves the topic
# followed (its client asks again with recover, which needs the session to follow it).
class _Flaky(MemoryBroker):
    """The in-memory broker, whose next ``fail`` history reads with ``since`` fail."""

    fail = 0

    async def history(self, topic: str, since: int | None = None) -> History:
        if since is not None and self.fail:
            self.fail -= 1
            raise BrokerUnavailable("redis hiccup")
        return await super().history(topic, since)


async def test_a_recovery_answered_unavailable_keeps_the_topic_followed(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = open_server(make_server)
    hub = server.hub
    broker = _Flaky(server.config.history_size)
    broker.bind(hub._receive, hub._on_control)
    hub.broker = broker
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect, protocol=2, seed=1) as client:
            got = await _following(client, server)
            broker.fail = 1  # the next recovery's history read fails once
            await wire.cut()
            await client.wait_state(ClientState.CONNECTING)
            await server.gateway.publish("room:1", "away")
            assert await client.wait_connected() is ClientState.RESUMED
            with trio.fail_after(30):  # the recovery answered unavailable is asked again
                async for message in client.messages():
                    got.append(message.data)
                    break
            (session,) = server.hub.sessions.values()
            assert list(session.subscriptions) == ["room:1"]
            await server.gateway.publish("room:1", "later")
            with trio.fail_after(30):
                async for message in client.messages():
                    got.append(message.data)
                    break
            assert got == ["one", "away", "later"], got
        nursery.cancel_scope.cancel()


async def test_a_recovery_cut_short_keeps_the_topic_followed(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = open_server(make_server)
    broker = slow_answers(server)
    async with trio.open_nursery() as nursery:
        wire = Wire(server, nursery)
        async with open_client(URL, connect=wire.connect, protocol=2, seed=1) as client:
            got = await _following(client, server)
            await wire.cut()
            await client.wait_state(ClientState.CONNECTING)
            broker.gate = trio.Event()  # the recovery's history read hangs...
            await client.wait_connected()
            await trio.testing.wait_all_tasks_blocked()
            await wire.cut()  # ...and the connection drops under it
            await client.wait_state(ClientState.CONNECTING)
            broker.gate.set()
            broker.gate = None
            assert await client.wait_connected() is ClientState.RESUMED
            await trio.testing.wait_all_tasks_blocked()
            (session,) = server.hub.sessions.values()
            assert list(session.subscriptions) == ["room:1"]
            await server.gateway.publish("room:1", "later")
            with trio.fail_after(30):
                async for message in client.messages():
                    got.append(message.data)
                    if len(got) == 2:
                        break
            assert got == ["one", "later"], got
        nursery.cancel_scope.cancel()
