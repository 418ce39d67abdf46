"""The server API on the admin port (docs/protocol.md §9), over real sockets with hypercorn."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from trio_wsgate import JwtAuthenticator, Server
from trio_wsgate.testing import RawClient, open_memory_connection

from .conftest import make_gateway
from .helpers import http_request
from .test_auth import SECRET, now, token
from .test_topics import Seq, msgs, request

KEY = "the-api-key"
AUTH = {"Authorization": f"apikey {KEY}"}


@asynccontextmanager
async def api_node(
    make_server: Callable[..., Server], **settings: Any
) -> AsyncIterator[tuple[Server, trio.Nursery]]:
    gateway = make_gateway()
    gateway.authenticate(JwtAuthenticator(secret=SECRET, clock=now))
    settings.setdefault("api_key", KEY)
    server = make_server(gateway, port=0, admin_port=0, allow_subscribe=("room:*",), **settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server, nursery
        nursery.cancel_scope.cancel()


async def call(
    server: Server,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = AUTH,
) -> tuple[int, Any]:
    """A request to the admin port: ``(status, parsed JSON body)``."""
    port = server.admin_addresses[0][1]
    raw = body if isinstance(body, bytes | str) or body is None else json.dumps(body)
    status, _, answer = await http_request(port, method, path, raw, headers)
    return status, json.loads(answer)


@asynccontextmanager
async def user(server: Server, nursery: trio.Nursery, name: str) -> AsyncIterator[RawClient]:
    async with open_memory_connection(server, nursery) as client:
        await client.hello(token=token(name))
        yield client


ENDPOINTS = [
    ("POST", "/api/publish", {"topic": "room:1", "data": 1}),
    ("POST", "/api/send", {"user": "ada", "data": 1}),
    ("POST", "/api/kick", {"user": "nobody"}),
    ("GET", "/api/stats", None),
    ("GET", "/api/presence?topic=room:1", None),
]


async def test_without_a_configured_key_the_api_answers_403(
    make_server: Callable[..., Server],
) -> None:
    async with api_node(make_server, api_key=None) as (server, _):
        for method, path, body in ENDPOINTS:
            status, answer = await call(server, method, path, body)
            assert (status, answer["error"]) == (403, "forbidden"), path
        # The probes and metrics of the admin port need no key.
        port = server.admin_addresses[0][1]
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await http_request(port, "GET", path))[0] == 200


async def test_open_api_needs_no_key(make_server: Callable[..., Server]) -> None:
    async with api_node(make_server, api_key=None, open_api=True) as (server, _):
        for method, path, body in ENDPOINTS:
            status, _ = await call(server, method, path, body, headers={})
            assert status == 200, path


async def test_a_missing_or_wrong_key_gets_401(make_server: Callable[..., Server]) -> None:
    async with api_node(make_server) as (server, _):
        port = server.admin_addresses[0][1]
        for headers in ({}, {"Authorization": "apikey nope"}, {"Authorization": f"Bearer {KEY}"}):
            for method, path, body in ENDPOINTS:
                status, answer = await call(server, method, path, body, headers=headers)
                assert (status, answer["error"]) == (401, "unauthorized"), (path, headers)
        status, response_headers, _ = await http_request(port, "GET", "/api/stats")
        assert response_headers["www-authenticate"] == "apikey"


async def test_publish_reaches_subscribers_and_answers_offset_and_epoch(
    make_server: Callable[..., Server],
) -> None:
    async with api_node(make_server) as (server, nursery), user(server, nursery, "ada") as ada:
        sub = await request(ada, Seq(), "sub", topic="room:1")
        for offset in (1, 2):
            status, answer = await call(
                server, "POST", "/api/publish", {"topic": "room:1", "data": {"n": offset}}
            )
            assert (status, answer) == (200, {"offset": offset, "epoch": sub["data"]["epoch"]})
        status, _ = await call(
            server, "POST", "/api/publish", {"topic": "room:1", "data": "x", "event": "note"}
        )
        assert status == 200
        got = await msgs(ada, 3)
        assert [(m.get("event"), m["data"], m["offset"]) for m in got] == [
            (None, {"n": 1}, 1),
            (None, {"n": 2}, 2),
            ("note", "x", 3),
        ]


async def test_send_reaches_every_session_of_the_user(make_server: Callable[..., Server]) -> None:
    async with (
        api_node(make_server) as (server, nursery),
        user(server, nursery, "ada") as phone,
        user(server, nursery, "ada") as laptop,
    ):
        status, answer = await call(
            server, "POST", "/api/send", {"user": "ada", "event": "dm", "data": "hi"}
        )
        assert (status, answer["offset"]) == (200, 1)
        for device in (phone, laptop):
            (dm,) = await msgs(device, 1)
            assert (dm["topic"], dm["event"], dm["data"]) == ("user:ada", "dm", "hi")


async def test_kick_by_user_or_session(make_server: Callable[..., Server]) -> None:
    async with (
        api_node(make_server) as (server, nursery),
        user(server, nursery, "ada") as ada,
        user(server, nursery, "bob") as bob,
    ):
        (session,) = server.hub.users["bob"]
        assert await call(server, "POST", "/api/kick", {"user": "ada"}) == (200, {"kicked": 1})
        assert await call(server, "POST", "/api/kick", {"session": session.id}) == (
            200,
            {"kicked": 1},
        )
        assert await ada.wait_closed() == (4005, "kicked")
        assert await bob.wait_closed() == (4005, "kicked")
        assert await call(server, "POST", "/api/kick", {"user": "ada"}) == (200, {"kicked": 0})


async def test_stats_and_presence(make_server: Callable[..., Server]) -> None:
    async with (
        api_node(make_server, node_id="node-a") as (server, nursery),
        user(server, nursery, "ada") as ada,
        user(server, nursery, "bob") as bob,
    ):
        a = await request(ada, Seq(), "sub", topic="room:1")
        await request(bob, Seq(), "sub", topic="room:1")
        assert "data" in a
        status, stats = await call(server, "GET", "/api/stats")
        assert status == 200
        assert stats["node"] == "node-a"
        assert (stats["connections"], stats["sessions"], stats["users"]) == (2, 2, 2)
        assert stats["topics"] == 3  # room:1, user:ada, user:bob
        assert stats["draining"] is False
        status, present = await call(server, "GET", "/api/presence?topic=room:1")
        assert status == 200
        assert present["topic"] == "room:1"
        assert present["users"] == ["ada", "bob"]
        assert sorted(s["user"] for s in present["sessions"]) == ["ada", "bob"]
        assert await call(server, "GET", "/api/presence?topic=room:2") == (
            200,
            {"topic": "room:2", "users": [], "sessions": []},
        )


@pytest.mark.parametrize(
    ("path", "body", "error", "why"),
    [
        ("/api/publish", "{not json", "bad_json", "not valid JSON"),
        ("/api/publish", "", "bad_json", "not valid JSON"),
        ("/api/publish", "[1, 2]", "bad_request", "JSON object"),
        ("/api/publish", {"data": 1}, "bad_request", "'topic'"),
        ("/api/publish", {"topic": "room:1"}, "bad_request", "'data'"),
        ("/api/publish", {"topic": "", "data": 1}, "bad_request", "'topic'"),
        ("/api/publish", {"topic": "a\u0001b", "data": 1}, "bad_request", "control"),
        ("/api/publish", {"topic": "t", "data": 1, "event": 5}, "bad_request", "'event'"),
        ("/api/publish", {"topic": "t", "data": 2**70}, "bad_request", "msgpack"),
        ("/api/send", {"data": 1}, "bad_request", "'user'"),
        ("/api/send", {"user": 7, "data": 1}, "bad_request", "'user'"),
        ("/api/kick", {}, "bad_request", "either"),
        ("/api/kick", {"user": "a", "session": "b"}, "bad_request", "either"),
        ("/api/kick", {"user": ["a"]}, "bad_request", "'user'"),
        # Lone surrogates (JSON's "\ud800"): no broker nor encoding carries them; the
        # Redis broker answered 500 and counted an internal error.
        ("/api/publish", {"topic": "room:\ud800", "data": 1}, "bad_request", "Unicode"),
        ("/api/send", {"user": "\ud800", "data": 1}, "bad_request", "Unicode"),
        ("/api/kick", {"user": "\ud800"}, "bad_request", "Unicode"),
        ("/api/kick", {"session": "a\udfff"}, "bad_request", "Unicode"),
    ],
)
async def test_bad_bodies_get_400_with_a_reason(
    make_server: Callable[..., Server], path: str, body: Any, error: str, why: str
) -> None:
    async with api_node(make_server) as (server, _):
        status, answer = await call(server, "POST", path, body)
        assert (status, answer["error"]) == (400, error)
        assert why in answer["reason"]
        # The node carries on.
        assert (await call(server, "GET", "/api/stats"))[0] == 200


async def test_wrong_methods_paths_and_sizes(make_server: Callable[..., Server]) -> None:
    async with api_node(make_server, max_message_size=1024) as (server, _):
        status, answer = await call(server, "GET", "/api/publish")
        assert (status, answer["error"]) == (405, "method_not_allowed")
        status, answer = await call(server, "POST", "/api/stats", {})
        assert status == 405
        status, answer = await call(server, "GET", "/api/nope")
        assert (status, answer["error"]) == (404, "not_found")
        status, answer = await call(server, "GET", "/api/presence")
        assert (status, answer["error"]) == (400, "bad_request")
        huge = {"topic": "t", "data": "x" * 10_000}
        status, answer = await call(server, "POST", "/api/publish", huge)
        assert (status, answer["error"]) == (413, "too_large")
        port = server.admin_addresses[0][1]
        assert (await http_request(port, "POST", "/metrics", "{}"))[0] == 405
