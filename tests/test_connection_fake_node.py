"""The connection layer alone: a :class:`Connection` against a fake node.

No server and no hub: the node is :class:`FakeNode`, which answers the calls
``connection.py`` declares (``Node``) and records them, as websockets tests its
connection against a recording protocol. The WebSocket is the real transport over an
in-memory stream pair, and the times asserted are exact virtual times (MockClock).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from trio_wsgate.auth import Authenticator
from trio_wsgate.config import Config
from trio_wsgate.connection import Connection
from trio_wsgate.exceptions import BrokerUnavailable
from trio_wsgate.identity import Identity
from trio_wsgate.metrics import Metrics
from trio_wsgate.protocol import CloseReason, Codec, ErrorInfo, Resume, Sequenced
from trio_wsgate.protocol.codecs import JSON_SUBPROTOCOL, shared_codec
from trio_wsgate.session import ResumeResult, Session, SubscribeResult
from trio_wsgate.testing import RawClient
from trio_wsgate.timers import Timers
from trio_wsgate.transports.base import Accept, UpgradeRequest
from trio_wsgate.transports.websockets import Handshake, accept_websocket

_Handler = Callable[[Session, Any], Awaitable[Any]]
_Hook = Callable[[Session], Awaitable[None]]


class FakeApplication:
    """Handlers and hooks, as a Gateway would give them."""

    def __init__(self) -> None:
        self.handlers: Mapping[str, _Handler] = {"echo": self._echo}
        self.connect_hooks: Sequence[_Hook] = [self._connected]
        self.disconnect_hooks: Sequence[_Hook] = [self._disconnected]
        self.session_tasks: Sequence[_Hook] = []
        self.calls: list[tuple[str, Any]] = []

    async def _echo(self, session: Session, data: Any) -> Any:
        self.calls.append(("echo", data))
        return data

    async def _connected(self, session: Session) -> None:
        self.calls.append(("connected", session.id))

    async def _disconnected(self, session: Session) -> None:
        self.calls.append(("disconnected", session.id))


class FakeNode:
    """What a connection needs of its node (and its sessions of their host), recorded."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.users: dict[str, set[Session]] = {}
        self.authenticator: Authenticator | None = None
        self.timers = Timers()
        self.running = False  # the connection runs timers of its own
        self.live_check_armed = False
        self.max_buffered_bytes = config.max_buffered_bytes
        self.calls: list[tuple[Any, ...]] = []
        #: What topic_operation does: answer, or raise this.
        self.topic_failure: Exception | None = None

    # -- Node ------------------------------------------------------------------------

    def find(self, resume: Resume, user: str | None) -> tuple[Session | None, ResumeResult]:
        self.calls.append(("find", resume.session))
        return None, ResumeResult.UNKNOWN

    async def migrate(self, resume: Resume, user: str | None, codec: Codec) -> Session | None:
        self.calls.append(("migrate", resume.session))
        return None

    def create(self, user: str | None, codec: Codec) -> Session:
        session = Session(self, secrets.token_urlsafe(8), user, codec, self.config.window)
        session.resume_token = "token-" + session.id
        self.calls.append(("create", session.id))
        return session

    async def claim(self, session: Session) -> None:
        self.calls.append(("claim", session.id))

    def end(self, session: Session, code: int, reason: CloseReason, *, why: str) -> None:
        self.calls.append(("end", session.id, code))
        session.ended = True

    def detach(self, session: Session) -> None:
        assert session.connection is not None
        self.calls.append(("detach", session.id, session.connection.close_code))

    async def topic_operation(
        self, session: Session, envelope: Sequenced
    ) -> tuple[Any, ErrorInfo | None]:
        self.calls.append(("topic", envelope.type, envelope.seq))
        if self.topic_failure is not None:
            raise self.topic_failure
        return {"offset": 0, "epoch": "e"}, None

    # -- SessionHost (for the sessions it makes) -----------------------------------------

    async def subscribe(
        self, session: Session, topic: str, since: Any = None, *, before_held: bool = False
    ) -> SubscribeResult:
        return SubscribeResult(0, "e")

    def unsubscribe(self, session: Session, topic: str) -> bool:
        return False

    def arm_live_check(self) -> None:
        self.live_check_armed = True

    def hold(self, session: Session, nbytes: int) -> bool:
        return True

    def overflows(self, session: Session) -> bool:
        return False

    def release_held(self, session: Session) -> None:
        pass


@asynccontextmanager
async def connected(
    node: FakeNode, application: FakeApplication, verified: Identity | None = None
) -> AsyncIterator[tuple[RawClient, list[Connection]]]:
    """A raw client, and the connection serving it (once its handshake is done);
    ``verified``: who a token given with the handshake said the client is."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    served: list[Connection] = []

    async def accept(request: UpgradeRequest) -> Accept:
        return Accept(JSON_SUBPROTOCOL)

    async def serve() -> None:
        handshake = await accept_websocket(
            server_stream, decide=accept, max_message_size=node.config.max_message_size
        )
        assert isinstance(handshake, Handshake)
        connection = Connection(
            handshake.transport,
            shared_codec(JSON_SUBPROTOCOL),
            application,
            node.config,
            node.metrics,
            node,
            verified,
        )
        served.append(connection)
        await connection.run()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        client = await RawClient.connect(client_stream, subprotocols=[JSON_SUBPROTOCOL])
        yield client, served
        await trio.aclose_forcefully(client_stream)


def settings(**changes: Any) -> Config:
    changes.setdefault("admin_port", None)
    return Config(**changes)


async def test_hello_handlers_topics_and_the_end_go_through_the_node_it_declares(
    autojump_clock: MockClock,
) -> None:
    node, application = FakeNode(settings()), FakeApplication()
    async with connected(node, application) as (client, served):
        welcome = await client.hello()
        (connection,) = served
        session = connection.session
        assert session is not None
        assert welcome["session"] == session.id
        assert welcome["resume_token"] == "token-" + session.id
        assert node.calls == [("create", session.id), ("claim", session.id)]
        assert application.calls == [("connected", session.id)]
        await client.send({"type": "msg", "seq": 1, "event": "echo", "data": [1]})
        assert await client.recv_type("reply") == {
            "type": "reply",
            "seq": 1,
            "re": 1,
            "data": [1],
            "ack": 1,
        }
        await client.send({"type": "sub", "seq": 2, "topic": "room:a"})
        reply = await client.recv_type("reply")
        assert reply["re"] == 2
        assert reply["data"] == {"offset": 0, "epoch": "e"}
        assert node.calls[-1] == ("topic", "sub", 2)
        await client.send({"type": "bye"})
        assert await client.wait_closed() == (1000, "bye")
        await connection.wait_released()
        assert node.calls[-1] == ("detach", session.id, 1000)
        assert connection.close_reason is CloseReason.BYE
    assert application.calls[-1] == ("disconnected", session.id)


async def test_what_the_node_fails_to_answer_is_an_error_reply_and_the_connection_goes_on(
    autojump_clock: MockClock,
) -> None:
    node, application = FakeNode(settings()), FakeApplication()
    async with connected(node, application) as (client, served):
        await client.hello()
        node.topic_failure = BrokerUnavailable("the broker is away")
        await client.send({"type": "pub", "seq": 1, "topic": "room:a", "data": 1})
        reply = await client.recv_type("reply")
        assert reply["error"] == {"code": "unavailable", "reason": "the broker is away"}
        node.topic_failure = RuntimeError("a bug in the node")
        await client.send({"type": "sub", "seq": 2, "topic": "room:a"})
        reply = await client.recv_type("reply")
        assert reply["error"] == {"code": "internal", "reason": "internal error"}
        assert node.metrics.registry.get_sample_value("wsgate_internal_errors_total") == 1
        await client.send({"type": "msg", "seq": 3, "event": "echo", "data": "still here"})
        assert (await client.recv_type("reply"))["data"] == "still here"
        (connection,) = served
        assert not connection.closing


@pytest.mark.parametrize("interval", [10.0, 25.0])
async def test_on_its_own_timers_it_pings_and_closes_a_silent_peer_at_exact_times(
    autojump_clock: MockClock, interval: float
) -> None:
    # The node is not running: the connection runs timers of its own.
    node = FakeNode(settings(heartbeat_interval=interval, heartbeat_timeout=5.0))
    async with connected(node, FakeApplication()) as (client, served):
        start = trio.current_time()
        await client.hello()
        ping = await client.recv_type("ping")
        assert trio.current_time() - start == pytest.approx(interval)
        assert ping["ts"] == round(trio.current_time() * 1000)
        # It stays silent: the last frame it sent was hello, at ``start``.
        assert await client.wait_closed() == (4002, "heartbeat timeout")
        assert trio.current_time() - start == pytest.approx(interval + 5.0)
        (connection,) = served
        assert connection.close_reason is CloseReason.HEARTBEAT_TIMEOUT


async def test_a_token_from_the_handshake_is_who_the_session_is(
    autojump_clock: MockClock,
) -> None:
    class Verifier:
        async def __call__(self, token: str | None) -> Identity:
            raise AssertionError("hello.token is not verified again")

    node = FakeNode(settings())
    node.authenticator = Verifier()
    verified = Identity("ann", deadline=trio.current_time() + 30)
    async with connected(node, FakeApplication(), verified) as (client, served):
        start = trio.current_time()
        await client.hello()
        (connection,) = served
        assert connection.session is not None
        assert connection.session.user == "ann"
        # The handshake's token expires 30 s after it was verified: 4001 then.
        assert await client.wait_closed() == (4001, "unauthorized: token expired")
        assert trio.current_time() - start == pytest.approx(30)
