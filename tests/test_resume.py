"""Sessions that survive their connection (docs/protocol.md §5), on in-memory streams."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from trio_wsgate import Gateway, Server, Session, Unauthorized
from trio_wsgate.protocol.codecs import MSGPACK_SUBPROTOCOL
from trio_wsgate.testing import Closed, open_memory_connection

from .conftest import make_gateway


@asynccontextmanager
async def running(server: Server) -> AsyncIterator[trio.Nursery]:
    """A nursery with the server's hub task running (expiry, session-end hooks)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(server.hub.run)
        yield nursery
        nursery.cancel_scope.cancel()


def resume_of(welcome: dict[str, Any], ack: int) -> dict[str, Any]:
    return {"session": welcome["session"], "token": welcome["resume_token"], "ack": ack}


async def resume_once(
    server: Server, nursery: trio.Nursery, first: dict[str, Any], ack: int = 0, **hello: Any
) -> dict[str, Any]:
    """Connect, resume ``first``'s session, say bye; return the welcome."""
    async with open_memory_connection(server, nursery) as client:
        welcome = await client.hello(resume=resume_of(first, ack), **hello)
        await client.send({"type": "bye"})
        await client.wait_closed()
    return welcome


def sample(server: Server, name: str, **labels: str) -> float | None:
    return server.metrics.registry.get_sample_value(name, labels)


async def detached(server: Server) -> None:
    """Let the server notice the drop and detach the session."""
    await trio.testing.wait_all_tasks_blocked()
    assert not server.connections


async def test_a_resume_resends_above_the_client_ack_in_order_then_new(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server()
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as client:
            first = await client.hello()
            assert first["resumed"] is False
            assert first["ack"] == 0
            await client.send({"type": "msg", "seq": 1, "event": "push", "data": 5})
            got = [await client.recv_type("msg") for _ in range(2)]  # seq 1, 2
            assert [m["data"] for m in got] == [0, 1]
        # Dropped without acking anything; the client processed server seq 1 and 2.
        await detached(server)
        (session,) = server.hub.sessions.values()
        session.send("later", "while away")  # numbered 7, buffered
        async with open_memory_connection(server, nursery) as client:
            welcome = await client.hello(resume=resume_of(first, 2))
            assert welcome["resumed"] is True
            assert welcome["session"] == first["session"]
            assert welcome["ack"] == 1  # the push request was processed
            resent = [await client.recv() for _ in range(5)]
            assert [(e["type"], e["seq"]) for e in resent] == [
                ("msg", 3),
                ("msg", 4),
                ("msg", 5),
                ("reply", 6),
                ("msg", 7),
            ]
            assert resent[3]["re"] == 1
            assert resent[3]["data"] == 5
            assert resent[4]["data"] == "while away"
            # Numbering goes on in both directions.
            await client.send({"type": "msg", "seq": 2, "event": "echo", "data": "x", "ack": 7})
            reply = await client.recv_type("reply")
            assert (reply["seq"], reply["re"]) == (8, 2)
            await client.send({"type": "bye"})
            await client.wait_closed()
    assert sample(server, "wsgate_resumes_total", result="resumed") == 1


async def test_a_handler_cancelled_by_a_drop_runs_again_and_a_completed_one_never(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    runs: list[tuple[str, Any]] = []
    gateway = Gateway()

    @gateway.on("slow")
    async def slow(session: Session, data: Any) -> Any:
        runs.append(("start", data))
        await trio.sleep(5)
        runs.append(("done", data))
        return data

    server = make_server(gateway)
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as client:
            first = await client.hello()
            await client.send({"type": "msg", "seq": 1, "event": "slow", "data": "a"})
            await trio.sleep(1)
        await detached(server)
        assert runs == [("start", "a")]  # cancelled: not processed
        async with open_memory_connection(server, nursery) as client:
            welcome = await client.hello(resume=resume_of(first, 0))
            assert welcome["ack"] == 0  # so the client resends seq 1
            await client.send({"type": "msg", "seq": 1, "event": "slow", "data": "a"})
            reply = await client.recv_type("reply")
            assert (reply["re"], reply["data"]) == (1, "a")
            # The reply is not acknowledged: the connection drops again.
        await detached(server)
        assert runs == [("start", "a"), ("start", "a"), ("done", "a")]
        async with open_memory_connection(server, nursery) as client:
            welcome = await client.hello(resume=resume_of(first, 0))
            assert welcome["ack"] == 1  # processed: the client must not resend it...
            reply = await client.recv_type("reply")  # ...and gets the same reply again
            assert (reply["seq"], reply["re"], reply["data"]) == (1, 1, "a")
            # A client that resends anyway gets an ack, not a second run.
            await client.send({"type": "msg", "seq": 1, "event": "slow", "data": "a", "ack": 1})
            assert await client.recv_type("ack") == {"type": "ack", "ack": 1}
            await client.send({"type": "bye"})
            await client.wait_closed()
    assert runs == [("start", "a"), ("start", "a"), ("done", "a")]


async def test_take_over_closes_the_old_connection_4006_and_moves_the_session(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server(heartbeat_interval=None)
    async with running(server) as nursery, open_memory_connection(server, nursery) as old:
        first = await old.hello()
        (session,) = server.hub.sessions.values()
        for i in range(3):
            session.send("n", i)
        # The old client never reads again, like a half-open peer.
        async with open_memory_connection(server, nursery) as new:
            welcome = await new.hello(resume=resume_of(first, 0))
            assert welcome["resumed"] is True
            got = [await new.recv_type("msg") for _ in range(3)]
            assert [(m["seq"], m["data"]) for m in got] == [(1, 0), (2, 1), (3, 2)]
            assert session.connection is not None
            session.send("n", 3)
            assert (await new.recv_type("msg"))["seq"] == 4
            code, reason = await old.wait_closed()
            assert (code, reason) == (4006, "session taken over")
            await new.send({"type": "bye"})
            await new.wait_closed()
    assert sample(server, "wsgate_resumes_total", result="taken_over") == 1
    assert sample(server, "wsgate_closes_total", code="4006", reason="take_over") == 1


async def test_two_racing_take_overs_leave_one_winner(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    gateway = make_gateway()
    server = make_server(gateway, heartbeat_interval=None, close_timeout=2)
    # lockstep: the old connection's close handshake never completes, so the
    # take-over waits for its handlers, not for its transport.
    async with (
        running(server) as nursery,
        open_memory_connection(server, nursery, lockstep=True) as old,
    ):
        await old.send({"type": "hello"})
        first = await old.recv_type("welcome")
        await old.send({"type": "msg", "seq": 1, "event": "sleep", "data": 100})
        await trio.testing.wait_all_tasks_blocked()
        async with (
            open_memory_connection(server, nursery) as a,
            open_memory_connection(server, nursery) as b,
        ):
            await a.send({"type": "hello", "resume": resume_of(first, 0)})
            await b.send({"type": "hello", "resume": resume_of(first, 0)})
            outcomes = []
            for client in (a, b):
                try:
                    await client.recv_type("welcome")
                except Closed as closed:
                    outcomes.append(str(closed.code))
                else:
                    outcomes.append("welcome")
                    await client.send({"type": "bye"})
                    outcomes.append(str((await client.wait_closed())[0]))
            assert sorted(outcomes) == ["1000", "4006", "welcome"]


async def test_an_expired_session_is_not_resumed_and_is_reclaimed_at_the_ttl(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    ended: list[tuple[float, str]] = []
    gateway = make_gateway()

    @gateway.on_session_end
    async def end(session: Session) -> None:
        ended.append((trio.current_time(), session.id))

    server = make_server(gateway, resume_ttl=120)
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as client:
            first = await client.hello()
        await detached(server)
        dropped_at = trio.current_time()
        (session,) = server.hub.sessions.values()
        assert session.detached_at == dropped_at
        await trio.sleep_until(dropped_at + 119.5)
        assert server.hub.sessions  # still there half a second before
        await trio.sleep_until(dropped_at + 120)
        await trio.testing.wait_all_tasks_blocked()
        assert server.hub.sessions == {}
        assert ended == [(dropped_at + 120, first["session"])]
        welcome = await resume_once(server, nursery, first)
        assert welcome["resumed"] is False
        assert welcome["session"] != first["session"]
        assert welcome["ack"] == 0
    assert sample(server, "wsgate_sessions_ended_total", why="expired") == 1


async def test_expiry_holds_without_the_hub_task(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server(resume_ttl=10)
    async with trio.open_nursery() as nursery:
        async with open_memory_connection(server, nursery) as client:
            first = await client.hello()
        await detached(server)
        await trio.sleep(10)
        assert (await resume_once(server, nursery, first))["resumed"] is False
    assert sample(server, "wsgate_resumes_total", result="expired") == 1


@pytest.mark.parametrize(
    "forge",
    [
        lambda w: {"session": w["session"], "token": w["resume_token"][:-2] + "AA", "ack": 0},
        lambda w: {"session": w["session"], "token": "", "ack": 0},
        lambda w: {"session": "not-" + w["session"], "token": w["resume_token"], "ack": 0},
    ],
    ids=["altered", "empty", "other-session"],
)
async def test_a_forged_resume_token_gets_a_new_session_and_leaves_the_real_one_alone(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    forge: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    server = make_server(heartbeat_interval=None)
    async with running(server) as nursery, open_memory_connection(server, nursery) as owner:
        first = await owner.hello()
        async with open_memory_connection(server, nursery) as thief:
            welcome = await thief.hello(resume=forge(first))
            assert welcome["resumed"] is False
            assert welcome["session"] != first["session"]
            await thief.send({"type": "bye"})
            await thief.wait_closed()
        # The owner's connection was not taken over.
        await owner.send({"type": "msg", "seq": 1, "event": "echo", "data": "still mine"})
        assert (await owner.recv_type("reply"))["data"] == "still mine"
        await owner.send({"type": "bye"})
        await owner.wait_closed()
    assert sample(server, "wsgate_resumes_total", result="bad_token") == 1


async def test_another_user_cannot_resume_a_session(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    gateway = make_gateway()

    @gateway.authenticate
    async def users(token: str | None) -> str | None:
        if token not in ("alice", "bob"):
            raise Unauthorized("unknown user")
        return token

    server = make_server(gateway)
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as alice:
            first = await alice.hello(token="alice")
            assert first["user"] == "alice"
        await detached(server)
        welcome = await resume_once(server, nursery, first, token="bob")
        assert (welcome["resumed"], welcome["user"]) == (False, "bob")
        welcome = await resume_once(server, nursery, first, token="alice")
        assert (welcome["resumed"], welcome["user"]) == (True, "alice")
        async with open_memory_connection(server, nursery) as nobody:
            await nobody.send({"type": "hello", "token": "mallory"})
            assert await nobody.wait_closed() == (4001, "unauthorized: unknown user")


async def test_a_detached_session_past_max_buffered_is_dropped(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server(max_buffered=3)
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as client:
            first = await client.hello()
        await detached(server)
        (session,) = server.hub.sessions.values()
        for i in range(3):
            session.send("n", i)
        with pytest.raises(Exception, match="session closed"):
            session.send("n", 3)
        assert (await resume_once(server, nursery, first))["resumed"] is False
    assert sample(server, "wsgate_sessions_ended_total", why="overflow") == 1


@pytest.mark.parametrize(
    ("ending", "code"),
    [({"type": "bye"}, 1000), ({"type": "msg", "seq": 9}, 1002)],
    ids=["bye", "protocol-error"],
)
async def test_bye_and_protocol_errors_end_the_session(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    ending: dict[str, Any],
    code: int,
) -> None:
    server = make_server()
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as client:
            first = await client.hello()
            await client.send(ending)
            assert (await client.wait_closed())[0] == code
        await detached(server)
        assert server.hub.sessions == {}
        assert (await resume_once(server, nursery, first))["resumed"] is False


@pytest.mark.parametrize("ack", [2, 0], ids=["above-sent", "below-acked"])
async def test_a_resume_ack_the_server_cannot_honour_is_1002(
    autojump_clock: MockClock, make_server: Callable[..., Server], ack: int
) -> None:
    server = make_server()
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as client:
            first = await client.hello()
            (session,) = server.hub.sessions.values()
            session.send("n", 1)
            await client.recv_type("msg")
            if ack == 0:
                await client.send({"type": "ack", "ack": 1})
                await trio.testing.wait_all_tasks_blocked()
        await detached(server)
        async with open_memory_connection(server, nursery) as client:
            await client.send({"type": "hello", "resume": resume_of(first, ack)})
            code, _ = await client.wait_closed()
            assert code == 1002
        # The session itself is still there for a well-behaved resume.
        assert (await resume_once(server, nursery, first, ack=1))["resumed"] is True


async def test_a_resume_cannot_ack_what_was_numbered_while_detached(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Found by a hostile review: what the session numbered while detached went into
    its window's in-flight list, and a resume's ack was checked against that list,
    not against what was written: a resume acknowledging messages it never got was
    taken, and they were dropped. It is 1002 (§5.2), and the session stays for a
    resume with an ack it can honour, which gets all three."""
    server = make_server()
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as client:
            first = await client.hello()
            (session,) = server.hub.sessions.values()
            session.send("n", 0)
            await client.recv_type("msg")  # seq 1, written
        await detached(server)
        for i in range(1, 4):
            session.send("n", i)  # seq 2-4: numbered, never written
        async with open_memory_connection(server, nursery) as client:
            await client.send({"type": "hello", "resume": resume_of(first, 4)})
            assert (await client.wait_closed())[0] == 1002
        async with open_memory_connection(server, nursery) as client:
            welcome = await client.hello(resume=resume_of(first, 1))
            assert welcome["resumed"] is True
            got = [(m["seq"], m["data"]) for m in [await client.recv_type("msg") for _ in "123"]]
            assert got == [(2, 1), (3, 2), (4, 3)]
            await client.close()


async def test_a_resume_may_change_the_encoding(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server(allow_subscribe=("news",))
    async with running(server) as nursery:
        async with open_memory_connection(
            server, nursery, subprotocols=[MSGPACK_SUBPROTOCOL]
        ) as client:
            first = await client.hello()
            await client.send({"type": "sub", "seq": 1, "topic": "news"})
            assert "error" not in await client.recv_type("reply")
        await detached(server)
        (session,) = server.hub.sessions.values()
        session.send("n", {"k": [1, 2]})
        # Kept encoded in msgpack as a fan-out delivery (data encoded once, head spliced).
        pub = await server.gateway.publish("news", [3], event="e")
        async with open_memory_connection(server, nursery) as client:  # JSON now
            assert (await client.hello(resume=resume_of(first, 1)))["resumed"] is True
            assert (await client.recv_type("msg"))["data"] == {"k": [1, 2]}
            assert await client.recv_type("msg") == {
                "type": "msg",
                "seq": 3,
                "event": "e",
                "topic": "news",
                "offset": pub.offset,
                "epoch": pub.epoch,
                "data": [3],
            }
            await client.send({"type": "bye"})
            await client.wait_closed()


async def test_resume_is_off_with_a_zero_ttl(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = make_server(resume_ttl=0)
    async with trio.open_nursery() as nursery:
        async with open_memory_connection(server, nursery) as client:
            first = await client.hello()
        await detached(server)
        assert server.hub.sessions == {}
        assert (await resume_once(server, nursery, first))["resumed"] is False


async def test_tokens_from_a_shared_secret_are_accepted_by_another_node(
    make_server: Callable[..., Server],
) -> None:
    a = make_server(secret="s" * 32)
    b = make_server(secret="s" * 32)
    c = make_server(secret="t" * 32)
    assert a.hub.resume_token("id", "u") == b.hub.resume_token("id", "u")
    assert a.hub.resume_token("id", "u") != c.hub.resume_token("id", "u")
    assert a.hub.resume_token("id", "u") != a.hub.resume_token("id", "v")
    assert a.hub.resume_token("id", "u") != a.hub.resume_token("id2", "u")


async def test_the_secret_never_shows_in_the_config_repr(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(secret="very-secret-value-0123456789")
    assert "very-secret" not in repr(server.config)


async def test_a_chat_member_keeps_its_place_across_a_drop_and_leaves_at_expiry(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    from examples.chat import LOBBY, gateway

    server = make_server(gateway, heartbeat_interval=None, resume_ttl=60)
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as ada:
            first = await ada.hello()
        await detached(server)
        async with open_memory_connection(server, nursery) as bob:
            await bob.hello()
            await bob.send({"type": "msg", "seq": 1, "event": "say", "data": "missed it?"})
            await bob.recv_type("reply")
            async with open_memory_connection(server, nursery) as ada:
                assert (await ada.hello(resume=resume_of(first, 0)))["resumed"] is True
                got = [await ada.recv_type("msg") for _ in range(3)]
                # Hers, bob's, and bob's words, with consecutive offsets of the lobby.
                assert [m["event"] for m in got] == ["joined", "joined", "said"]
                assert [m["offset"] for m in got] == [1, 2, 3]
                assert {m["topic"] for m in got} == {LOBBY}
            await trio.testing.wait_all_tasks_blocked()
            assert len(await gateway.presence(LOBBY)) == 2  # she is still in, detached
            # Ada does not come back: her session ends at the TTL and bob hears it.
            await trio.sleep(59.9)
            assert first["session"] in server.hub.sessions
            await trio.sleep(0.1)
            left = await bob.recv_type("msg")
            while left["event"] != "left":  # his own joined and said come first
                left = await bob.recv_type("msg")
            assert left["data"]["from"].startswith("guest-")
            assert list((await gateway.presence(LOBBY)).values()) == [None]  # bob, a guest
            await bob.send({"type": "bye"})
            await bob.wait_closed()
        await trio.testing.wait_all_tasks_blocked()
        assert await gateway.presence(LOBBY) == {}
