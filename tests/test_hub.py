"""The hub (trio_wsgate/hub.py): what the node's sessions hold together, topics nobody
follows, sessions handed over by another node, and the hub's own chores.

On in-memory streams with a MockClock, over every transport.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from trio_wsgate import BrokerUnavailable, Server, Session
from trio_wsgate.brokers import History
from trio_wsgate.brokers.memory import MemoryBroker
from trio_wsgate.protocol import JsonCodec
from trio_wsgate.testing import open_memory_connection

from .conftest import ALL_TRANSPORTS
from .test_hardening import msg
from .test_resume import detached, resume_of, running, sample

pytestmark = pytest.mark.transports(*ALL_TRANSPORTS)


async def _hold_open(
    server: Server, remote: str, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
) -> None:
    async with (
        trio.open_nursery() as nursery,
        open_memory_connection(server, nursery, remote=remote) as client,
    ):
        client.session = (await client.hello())["session"]  # type: ignore[attr-defined]
        task_status.started(client)
        await trio.sleep_forever()


async def test_case5_detached_sessions_share_one_byte_bound_for_the_node(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Past ``max_detached_bytes`` the owner holding the most gives up its oldest
    detached session: one client cannot push the others' sessions out."""
    server = make_server(max_buffered_bytes=100_000, max_detached_bytes=40_000)
    hub = server.hub
    async with running(server) as nursery:
        welcomes = []
        for remote in ("10.0.0.1:1", "10.0.0.1:2", "10.0.0.2:1"):
            async with open_memory_connection(server, nursery, remote=remote) as client:
                welcomes.append(await client.hello())
            await detached(server)
        first, second, other = (hub.sessions[w["session"]] for w in welcomes)
        assert hub.detached_bytes == 3 * 2048  # a session weighs something empty too
        second.send("news", "z" * 20_000)
        other.send("news", "z" * 5_000)
        assert 31_000 < hub.detached_bytes <= 32_000
        # Over: 10.0.0.1 holds most, and of its sessions the largest goes, not its
        # oldest (idle) one.
        other.send("news", "z" * 10_000)
        assert [first.ended, second.ended, other.ended] == [False, True, False]
        assert hub.detached_bytes < 40_000
        with pytest.raises(Exception, match="slow_consumer"):
            other.send("news", "z" * 25_000)  # now 10.0.0.2 holds most: its own ends
        assert [first.ended, other.ended] == [False, True]
        assert sample(server, "wsgate_sessions_ended_total", why="overflow") == 2
        # A resume gives its bytes back to the node.
        async with open_memory_connection(server, nursery, remote="10.0.0.1:3") as client:
            assert (await client.hello(resume=resume_of(welcomes[0], 0)))["resumed"] is True
            assert hub.detached_bytes == 0
            await client.send({"type": "bye"})
            await client.wait_closed()


async def test_case8_a_topic_nobody_follows_is_forgotten_at_once(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Subscribing to many distinct topics and leaving them keeps nothing in the broker
    until its next sweep (a minute): each one is forgotten as it is left."""
    server = make_server(allow_subscribe=("t:*",))
    broker = server.hub.broker
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        seq = 0
        for round_ in range(5):
            for i in range(100):
                for kind in ("sub", "unsub"):
                    seq += 1
                    await client.send({"type": kind, "seq": seq, "topic": f"t:{round_}:{i}"})
                    reply = await client.recv_type("reply")
                    await client.send({"type": "ack", "ack": reply["seq"]})
            await trio.testing.wait_all_tasks_blocked()
            assert broker.statistics()["topics"] == 0
        await client.close()


class _ParkedBroker(MemoryBroker):
    """The in-memory broker, where another node left one session's state; while
    ``down``, it cannot be asked to follow a topic (Redis restarting)."""

    def __init__(self, history_size: int = 100) -> None:
        super().__init__(history_size)
        self.parked: dict[str, Any] = {}
        self.down = False
        # A topic's history is read only once its event is set (if it has one).
        self.gates: dict[str, trio.Event] = {}

    async def find_session(self, session: str) -> tuple[dict[str, Any] | None, str | None]:
        return self.parked.pop(session, None), None

    async def subscribe(self, topic: str) -> None:
        if self.down:
            raise BrokerUnavailable("Redis is restarting")
        await super().subscribe(topic)

    async def history(self, topic: str, since: int | None = None) -> History:
        if self.down:
            raise BrokerUnavailable("Redis is restarting")
        if topic in self.gates:
            await self.gates[topic].wait()
        return await super().history(topic, since)


def _park_elsewhere(server: Server) -> tuple[_ParkedBroker, Session]:
    """The broker of ``server`` made a :class:`_ParkedBroker`; its one session moved
    there, as if another node had held it."""
    hub = server.hub
    (session,) = hub.sessions.values()
    broker = _ParkedBroker(server.config.history_size)
    broker.bind(hub._receive, hub._on_control)
    broker._topics, broker._subscribed = hub.broker._topics, hub.broker._subscribed  # type: ignore[attr-defined]
    hub.broker = broker
    broker.parked[session.id] = hub._export(session)
    session.ended = True
    hub._unregister(session)
    return broker, session


async def _park_a_follower(
    server: Server, nursery: trio.Nursery
) -> tuple[dict[str, Any], dict[str, Any], _ParkedBroker, Session]:
    """A session that follows ``news``, detached, then parked by another node. Returns
    its welcome, its sub reply's data, the broker and the session."""
    async with open_memory_connection(server, nursery) as client:
        first = await client.hello()
        await client.send({"type": "sub", "seq": 1, "topic": "news"})
        position = (await client.recv_type("reply"))["data"]
    await detached(server)
    broker, session = _park_elsewhere(server)
    return first, position, broker, session


async def test_a_migrated_session_that_ends_while_its_history_comes_is_not_resumed(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server(max_buffered_bytes=10_000, allow_subscribe=("news",))
    async with running(server) as nursery:
        first, _, _, _ = await _park_a_follower(server, nursery)
        for _ in range(20):  # 20 KB of news meanwhile: over max_buffered_bytes on replay
            await server.gateway.publish("news", "n" * 1000)
        async with open_memory_connection(server, nursery) as client:
            welcome = await client.hello(resume=resume_of(first, 1))
            assert welcome["resumed"] is False  # not a dead session answering nothing
            await client.send(msg(1, "echo", "hi"))
            assert (await client.recv_type("reply"))["data"] == "hi"
            await client.close()


@contextlib.asynccontextmanager
async def _resumed_while_broker_down(
    server: Server, nursery: trio.Nursery, topics: tuple[str, ...], *published: tuple[str, str]
) -> AsyncIterator[tuple[Any, _ParkedBroker, float]]:
    """A session that follows ``topics`` is parked by another node; ``published`` comes
    meanwhile; then the broker cannot be asked to follow a topic, and the client resumes
    here. Yields the client, the broker and the trio time the resume began."""
    async with open_memory_connection(server, nursery) as client:
        first = await client.hello()
        for seq, topic in enumerate(topics, 1):
            await client.send({"type": "sub", "seq": seq, "topic": topic})
            await client.recv_type("reply")
    await detached(server)
    broker, _ = _park_elsewhere(server)
    for topic, data in published:
        await server.gateway.publish(topic, data)
    broker.down = True
    async with open_memory_connection(server, nursery) as client:
        start = trio.current_time()
        welcome = await client.hello(resume=resume_of(first, len(topics)))
        assert welcome["resumed"] is True
        yield client, broker, start


async def test_a_session_that_moves_while_the_broker_cannot_follow_its_topics_misses_nothing(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Found by the cluster chaos test: a session resumed on another node while Redis
    restarted was resumed deaf to its topic, and its client never knew. It keeps its
    place, and the node follows the topic from there once the broker answers (after
    0.5 s, then 1 s more: the pause doubles), with nothing for the client to do."""
    server = make_server(allow_subscribe=("news",))
    async with (
        running(server) as nursery,
        _resumed_while_broker_down(server, nursery, ("news",), ("news", "while parked")) as (
            client,
            broker,
            start,
        ),
    ):
        (session,) = server.hub.sessions.values()
        assert session.topics == ["news"]  # its place is kept
        await server.gateway.publish("news", "while following failed")
        await trio.sleep(1.2)
        broker.down = False
        await server.gateway.publish("news", "once back")
        got = []
        for _ in range(3):
            envelope = await client.recv_type("msg")
            got.append((envelope["data"], envelope["offset"], trio.current_time() - start))
        assert got == [
            ("while parked", 1, 1.5),
            ("while following failed", 2, 1.5),
            ("once back", 3, 1.5),
        ]
        await client.send(msg(2, "echo", "hi"))  # and the session goes on
        assert (await client.recv_type("reply"))["data"] == "hi"
        await client.close()


async def test_a_session_that_moves_past_its_topics_history_is_not_resumed(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """A session parked by another node while more was published to its topic than the
    history holds: resumed, it would have missed the oldest without a word. It is not
    resumed, and its client's recovery by offset says ``recovered: false``."""
    server = make_server(allow_subscribe=("news",), history_size=3)
    async with running(server) as nursery:
        first, position, _, _ = await _park_a_follower(server, nursery)
        for number in range(5):
            await server.gateway.publish("news", number)
        async with open_memory_connection(server, nursery) as client:
            welcome = await client.hello(resume=resume_of(first, 1))
            assert welcome["resumed"] is False
            await client.send({"type": "sub", "seq": 1, "topic": "news", "since": position})
            reply = await client.recv_type("reply")
            assert reply["data"]["recovered"] is False
            await client.close()
        assert sample(server, "wsgate_sessions_ended_total", why="history_lost") == 1


async def test_a_session_that_moves_during_its_first_read_of_a_topic_is_resumed(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """A subscription exported while its first read of the topic was under way has no
    place yet (offset 0, no epoch): it is no gap, and the session resumes, following
    the topic from where it stands."""
    server = make_server(allow_subscribe=("news",))
    async with running(server) as nursery:
        first, _, broker, session = await _park_a_follower(server, nursery)
        broker.parked[session.id]["subscriptions"]["news"] = [0, ""]
        await server.gateway.publish("news", "before")
        async with open_memory_connection(server, nursery) as client:
            welcome = await client.hello(resume=resume_of(first, 1))
            assert welcome["resumed"] is True
            await server.gateway.publish("news", "after")
            assert (await client.recv_type("msg"))["data"] == "after"
            await client.close()


async def test_a_topic_followed_again_past_its_history_ends_the_session(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """The same when the session was resumed while the broker could not be asked, and
    more than the history holds came before it could: the session ends (1011), and the
    client's next resume gets ``resumed: false``."""
    server = make_server(allow_subscribe=("news",), history_size=3)
    async with (
        running(server) as nursery,
        _resumed_while_broker_down(server, nursery, ("news",)) as (client, broker, _),
    ):
        broker.down = False  # it answers again, with more than the history holds
        for number in range(5):
            await server.gateway.publish("news", number)
        code, reason = await client.wait_closed()
        assert (code, reason, trio.current_time()) == (1011, "topic history lost: resume", 0.5)
        assert not server.hub.sessions


async def test_a_topic_kept_unfollowed_answers_the_clients_own_sub_from_its_place(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """The client's own ``sub`` of a topic its session keeps unfollowed: ``unavailable``
    while the broker is away (the place is kept), then followed from the place, not
    from now; its ``unsub`` drops it."""
    server = make_server(allow_subscribe=("news",))
    async with (
        running(server) as nursery,
        _resumed_while_broker_down(server, nursery, ("news",), ("news", "missed")) as (
            client,
            broker,
            _,
        ),
    ):
        (session,) = server.hub.sessions.values()
        await client.send({"type": "sub", "seq": 2, "topic": "news"})
        assert (await client.recv_type("reply"))["error"]["code"] == "unavailable"
        assert session.topics == ["news"]
        broker.down = False
        await client.send({"type": "sub", "seq": 3, "topic": "news"})
        missed = await client.recv_type("msg")
        reply = await client.recv_type("reply")
        assert (missed["data"], missed["offset"]) == ("missed", 1)
        assert reply["data"]["offset"] == 1
        await client.send({"type": "unsub", "seq": 4, "topic": "news"})
        await client.recv_type("reply")
        assert session.topics == []
        await trio.sleep(10)  # nothing follows it again behind the client's back
        assert session.topics == []
        assert "news" not in server.hub.topics
        await client.close()


async def test_what_the_client_does_while_its_topics_are_followed_again_stands(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """While the node reads the history of a kept topic to follow it again: the
    client's unsub of another kept topic is not undone, and its plain sub of the same
    topic gets what was missed (the kept place holds until the history has come)."""
    server = make_server(allow_subscribe=("a", "b"))
    async with (
        running(server) as nursery,
        _resumed_while_broker_down(server, nursery, ("a", "b"), ("a", "missed")) as (
            client,
            broker,
            start,
        ),
    ):
        (session,) = server.hub.sessions.values()
        broker.gates["a"] = gate = trio.Event()
        broker.down = False
        await trio.sleep(0.6)  # the hub's try at 0.5 s waits for a's history
        await client.send({"type": "unsub", "seq": 3, "topic": "b"})
        await client.recv_type("reply")
        await client.send({"type": "sub", "seq": 4, "topic": "a"})
        await trio.sleep(0.4)
        gate.set()
        missed = await client.recv_type("msg")
        reply = await client.recv_type("reply")
        assert (missed["data"], missed["offset"], reply["re"]) == ("missed", 1, 4)
        assert reply["data"]["offset"] == 1
        assert trio.current_time() - start == 1.0
        await trio.sleep(20)
        assert session.topics == ["a"]
        assert "b" not in server.hub.topics
        await client.close()


@contextlib.asynccontextmanager
async def _migrating(
    server: Server, nursery: trio.Nursery
) -> AsyncIterator[tuple[dict[str, Any], Any, trio.Event]]:
    """A session that follows a, b and c is parked by another node, and its client
    resumes here: the node follows a, then waits for b's history until the event is
    set. Yields the first welcome, the resuming client (its welcome not come) and
    the event."""
    for topic in "abc":  # (so that each topic is known to the broker of the other node)
        await server.gateway.publish(topic, "before")
    async with open_memory_connection(server, nursery) as client:
        first = await client.hello()
        for seq, topic in enumerate("abc", 1):
            await client.send({"type": "sub", "seq": seq, "topic": topic})
            await client.recv_type("reply")
    await detached(server)
    broker, _ = _park_elsewhere(server)
    broker.gates["b"] = gate = trio.Event()
    async with open_memory_connection(server, nursery) as migrating:
        await migrating.send({"type": "hello", "resume": resume_of(first, 3)})
        await trio.testing.wait_all_tasks_blocked()
        (session,) = server.hub.sessions.values()
        assert [(t, p.followed) for t, p in session.subscriptions.items()] == [
            ("a", True),
            ("b", False),
            ("c", False),
        ]
        yield first, migrating, gate


async def test_a_migration_cut_short_keeps_every_topic_for_the_next_resume(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Found by a hostile review: the connection of a resume that was taking a session
    over from another node closed (the node drained, a heartbeat missed) while the
    session's topics were being followed again. The topic under way was dropped and
    those after it never added, and the next resume said resumed: true, deaf to them."""
    server = make_server(allow_subscribe=("a", "b", "c"), heartbeat_interval=None)
    async with (
        running(server) as nursery,
        _migrating(server, nursery) as (first, migrating, gate),
    ):
        (connection,) = server.connections
        connection.close(1001, "going away")
        assert (await migrating.wait_closed())[0] == 1001
        await detached(server)
        (session,) = server.hub.sessions.values()
        assert sorted(session.subscriptions) == ["a", "b", "c"]  # b and c kept as places
        gate.set()
        await trio.sleep(1)  # the hub follows them again (_refollow, after 0.5 s)
        assert all(place.followed for place in session.subscriptions.values())
        async with open_memory_connection(server, nursery) as client:
            assert (await client.hello(resume=resume_of(first, 3)))["resumed"] is True
            for topic in "abc":
                await server.gateway.publish(topic, f"to {topic}")
            got = [(m["topic"], m["data"]) for m in [await client.recv_type("msg") for _ in "abc"]]
            assert got == [("a", "to a"), ("b", "to b"), ("c", "to c")]
            await client.close()


async def test_a_resume_during_a_migration_takes_the_session_from_the_older_one(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Found by a hostile review: a second resume found the session while the first
    was still following its topics, and got it; then the first, done, took it back
    and closed the newer connection with 4006, which a client takes as final. The
    newest claim wins: the older one is closed with 4006 instead."""
    server = make_server(allow_subscribe=("a", "b", "c"), heartbeat_interval=None)
    async with (
        running(server) as nursery,
        _migrating(server, nursery) as (first, migrating, gate),
        open_memory_connection(server, nursery) as client,
    ):
        if True:
            assert (await client.hello(resume=resume_of(first, 3)))["resumed"] is True
            gate.set()
            assert (await migrating.wait_closed())[0] == 4006
            (session,) = server.hub.sessions.values()
            assert all(place.followed for place in session.subscriptions.values())
            for topic in "abc":
                await server.gateway.publish(topic, f"to {topic}")
            got = [(m["topic"], m["data"]) for m in [await client.recv_type("msg") for _ in "abc"]]
            assert got == [("a", "to a"), ("b", "to b"), ("c", "to c")]
            await client.send(msg(4, "echo", "still here"))
            assert (await client.recv_type("reply"))["data"] == "still here"
            await client.close()


async def test_a_moved_session_keeps_counting_its_clients_subscriptions(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Found by a review of the max_subscriptions fix: which subscriptions the client
    made did not move with the session, and after a move the client could subscribe
    max_subscriptions more."""
    server = make_server(max_subscriptions=2, allow_subscribe=("room:*",))
    async with running(server) as nursery:
        for room in ("room:1", "room:2"):  # (known to the other node's broker)
            await server.gateway.publish(room, "before")
        async with open_memory_connection(server, nursery) as client:
            first = await client.hello()
            for seq in (1, 2):
                await client.send({"type": "sub", "seq": seq, "topic": f"room:{seq}"})
                assert "error" not in await client.recv_type("reply")
        await detached(server)
        _park_elsewhere(server)
        async with open_memory_connection(server, nursery) as client:
            assert (await client.hello(resume=resume_of(first, 2)))["resumed"] is True
            await client.send({"type": "sub", "seq": 3, "topic": "room:3"})
            reply = await client.recv_type("reply")
            assert reply["error"]["code"] == "limit_exceeded"
            await client.close()


async def test_a_moved_session_is_welcomed_with_its_own_window(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Found by a hostile review of the client: a resume announced this node's
    --window, while the session keeps the window it was made with (another node's):
    a client trusting the welcome could send more than the session takes (1002)."""
    server = make_server(window=256)
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as client:
            first = await client.hello()
        await detached(server)
        broker, session = _park_elsewhere(server)
        state = broker.parked[session.id]
        state["inbox"]["window"] = state["outbox"]["window"] = 4  # made where --window 4
        async with open_memory_connection(server, nursery) as client:
            welcome = await client.hello(resume=resume_of(first, 0))
            assert (welcome["resumed"], welcome["window"]) == (True, 4)
            await client.close()


async def test_a_migrated_session_whose_resume_fails_still_expires(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server(resume_ttl=120)
    hub = server.hub
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as client:
            first = await client.hello()
        await detached(server)
        hub.sessions[first["session"]].send("kept", "k" * 50_000)
        _park_elsewhere(server)
        async with open_memory_connection(server, nursery) as client:
            await client.send({"type": "hello", "resume": resume_of(first, 999)})
            assert (await client.wait_closed())[0] == 1002  # an ack above what was sent
        assert first["session"] in hub.sessions  # kept for a correct resume...
        await trio.sleep(121)
        assert not hub.sessions  # ...for resume_ttl, not for ever
        assert hub.detached_bytes == 0


class _HangingBroker(MemoryBroker):
    """The in-memory broker, whose presence writes wait out a command timeout (2 s) and
    fail, as against a Redis that hangs; ``healthy`` as the health check would say."""

    async def set_presence(self, topic: str, session: str, user: str | None, present: bool) -> None:
        await trio.sleep(2)
        raise BrokerUnavailable("Redis did not answer within 2.0 s")


async def test_a_hanging_broker_neither_delays_expiry_nor_piles_up_chores(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Found by a hostile review: with Redis frozen, each chore took its 2 s timeout,
    chores came faster, and the hub's loop never got back to expiry: detached sessions
    with resume_ttl 1 s were never expired, and the queue grew. The chores run in a
    task of their own now, and are dropped while the broker is down."""
    server = make_server(resume_ttl=1, allow_subscribe=("t:*",), heartbeat_interval=None)
    broker = _HangingBroker(server.config.history_size)
    server.hub.broker = broker
    broker.bind(server.hub._receive, server.hub._on_control)
    hub = server.hub
    async with running(server) as nursery:
        for i in range(10):  # a presence chore each, 2 s each: 20 s of them
            async with open_memory_connection(server, nursery) as client:
                await client.hello()
                await client.send({"type": "sub", "seq": 1, "topic": f"t:{i}"})
                await client.recv_type("reply")
        gone = trio.current_time()
        await detached(server)
        await trio.sleep(1)
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == gone + 1
        assert not hub.sessions  # expired on time, the chores still at it
        assert len(hub._chores) > 0
        broker.healthy = False  # the health check found Redis lost
        await trio.sleep(2)  # the chore under way times out; the rest are dropped
        assert not hub._chores


class _PickyBroker(MemoryBroker):
    """The in-memory broker, failing to unsubscribe from ``t:0`` (as a cluster's
    sharded pub/sub can, for a channel whose slot just moved)."""

    def __init__(self, history_size: int) -> None:
        super().__init__(history_size)
        self.left: list[str] = []

    async def unsubscribe(self, topic: str) -> None:
        if topic == "t:0":
            raise KeyError(topic)
        self.left.append(topic)
        await super().unsubscribe(topic)


async def test_a_topic_the_broker_fails_to_leave_does_not_keep_the_others(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Found by a hostile review: one failed unsubscribe ended the hub's pass over the
    topics left, and the rest stayed followed at the broker for good."""
    server = make_server(allow_subscribe=("t:*",), heartbeat_interval=None)
    broker = _PickyBroker(server.config.history_size)
    server.hub.broker = broker
    broker.bind(server.hub._receive, server.hub._on_control)
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        await client.hello()
        for seq, topic in enumerate(("t:0", "t:1", "t:2"), 1):
            await client.send({"type": "sub", "seq": seq, "topic": topic})
            await client.recv_type("reply")
        await client.send({"type": "bye"})  # the session ends: its topics left at once
        await client.wait_closed()
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(broker.left) == ["t:1", "t:2"]


async def test_a_churn_of_subscriptions_does_not_pile_up_broker_chores(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """The attack battery's subscribe-many: one chore per topic left took the broker
    lock each, and the queue grew faster than it drained (300k chores, +267 MiB),
    holding every ended session and its subscriptions."""
    server = make_server(allow_subscribe=("*",))
    hub = server.hub
    most = [0]
    chore = hub._chore

    def counted(job: Any) -> None:
        chore(job)
        most[0] = max(most[0], len(hub._chores))

    hub._chore = counted  # type: ignore[method-assign]
    async with running(server) as nursery:

        async def churn(worker: int) -> None:
            for round_ in range(5):
                remote = f"10.2.{worker}.{round_}:1"
                async with open_memory_connection(server, nursery, remote=remote) as client:
                    await client.hello()
                    batch = [
                        {"type": "sub", "seq": seq, "topic": f"c-{worker}-{round_}-{seq}"}
                        for seq in range(1, 65)
                    ]
                    await client.send(*batch)
                    for _ in batch:
                        await client.recv_type("reply")
                    await client.send({"type": "bye"})
                    await client.wait_closed()

        async with trio.open_nursery() as workers:
            for worker in range(20):
                workers.start_soon(churn, worker)
        await trio.testing.wait_all_tasks_blocked()
        # 20 x 5 sessions of 64 topics: 12,800 subscriptions made and left.
        assert most[0] < 2_000, most[0]
        assert not hub.topics
        assert hub.broker.statistics()["topics"] == 0


class _SlowToLeave(MemoryBroker):
    """The in-memory broker, where stopping to listen to a topic takes a while (a
    Redis UNSUBSCRIBE on its way)."""

    def __init__(self) -> None:
        super().__init__()
        self.leaving = trio.Event()
        self.left = trio.Event()

    async def unsubscribe(self, topic: str) -> None:
        await self.left.wait()
        await super().unsubscribe(topic)
        self.leaving.set()


async def test_a_topic_followed_again_while_the_node_stops_listening_to_it_is_heard(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Found by the cluster chaos test: a session that came to a node as the node's
    last follower of the topic left it was subscribed while the node was still
    unsubscribing from the broker. The hub took the topic for one it listens to, the
    unsubscription then went through, and the session heard nothing more of it (74
    publications lost) until another session subscribed there."""
    server = make_server(allow_subscribe=("news",))
    broker = _SlowToLeave()
    broker.bind(server.hub._receive, server.hub._on_control)
    server.hub.broker = broker
    async with running(server) as nursery, open_memory_connection(server, nursery) as leaver:
        await leaver.hello()
        await leaver.send({"type": "sub", "seq": 1, "topic": "news"})
        await leaver.recv_type("reply")
        await leaver.send({"type": "unsub", "seq": 2, "topic": "news"})
        await leaver.recv_type("reply")
        await trio.testing.wait_all_tasks_blocked()  # the node unsubscribes...
        async with open_memory_connection(server, nursery) as comer:
            await comer.hello()
            await comer.send({"type": "sub", "seq": 1, "topic": "news"})
            await trio.testing.wait_all_tasks_blocked()
            broker.left.set()  # ... and only then is through with it
            assert (await comer.recv_type("reply"))["data"]["offset"] == 0
            await broker.leaving.wait()
            await server.gateway.publish("news", "heard")
            with trio.fail_after(1):
                assert (await comer.recv_type("msg"))["data"] == "heard"
            await comer.close()
        await leaver.close()


async def test_live_sessions_together_are_held_to_max_live_bytes(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """One client with many connections, each under its own bound, cannot make the node
    hold more than max_live_bytes: past it, the owner holding the most loses its
    largest session, at the next check (every second)."""
    server = make_server(max_live_bytes=60_000)
    hub = server.hub
    async with running(server) as nursery:
        clients = {}
        for name, remote in (("a1", "10.0.0.1:1"), ("a2", "10.0.0.1:2"), ("b", "10.0.0.2:1")):
            client = await nursery.start(_hold_open, server, remote)
            clients[name] = client
        sessions = {
            name: next(s for s in hub.sessions.values() if s.id == client.session)
            for name, client in clients.items()
        }
        await trio.sleep(10)
        assert not hub.live_check_armed  # nothing held: no check made
        start = trio.current_time()
        for name, size in (("a1", 30_000), ("a2", 20_000), ("b", 25_000)):
            sessions[name].send("news", "z" * size)  # never acknowledged
        code, _ = await clients["a1"].wait_closed()
        assert code == 4004
        assert trio.current_time() - start <= 1.0
        assert [sessions[name].ended for name in ("a1", "a2", "b")] == [True, False, False]
        await trio.sleep(5)  # under the bound now: nothing more happens
        assert not sessions["a2"].ended
        assert not sessions["b"].ended
        assert sample(server, "wsgate_sessions_ended_total", why="overflow") == 1
        nursery.cancel_scope.cancel()


class _FlakyBroker(MemoryBroker):
    """The in-memory broker, down while ``up`` is False; its unsubscribe is a round
    trip (as Redis's)."""

    up = True

    @property  # type: ignore[override]
    def healthy(self) -> bool:
        return self.up

    async def unsubscribe(self, topic: str) -> None:
        await trio.sleep(0.01)
        await super().unsubscribe(topic)


async def test_topics_left_during_an_outage_or_a_cancelled_presence_are_left_after(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Found by a hostile review: the chores dropped during an outage took the pass
    that leaves topics at the broker with them, and nothing queued one again: the node
    stayed subscribed to every topic left since. A presence() cancelled in the middle
    of that pass (it runs the chores in its caller's task) lost the rest too."""
    server = make_server()
    hub = server.hub
    hub.broker = broker = _FlakyBroker(server.config.history_size)
    broker.bind(hub._receive, hub._on_control)
    async with running(server):
        session = hub.create(None, JsonCodec())
        for topic in ("a", "b", "c", "d"):
            await hub.subscribe(session, topic)
        broker.up = False  # an outage: what is queued is dropped
        hub.unsubscribe(session, "a")
        await trio.testing.wait_all_tasks_blocked()
        broker.up = True
        for topic in ("b", "c", "d"):
            hub.unsubscribe(session, topic)
        with trio.move_on_after(0.005):  # a handler's presence(), with a time bound
            await server.gateway.presence("b")
        await trio.sleep(1)
        assert not hub._broker_topics
        assert not broker._subscribed  # type: ignore[attr-defined]
