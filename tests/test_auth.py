"""Tokens (docs/protocol.md §3 and §8): JWTs at the handshake and in hello, expiry, refresh."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from trio.testing import MockClock

from trio_wsgate import Config, Identity, JwtAuthenticator, Server
from trio_wsgate.testing import Refused, open_memory_connection

from .conftest import make_gateway
from .test_resume import resume_of, running, sample

SECRET = "a-test-secret-that-is-32-bytes-long!"
# The wall clock of these tests: Unix time BASE at trio time 0, moving with trio's clock.
BASE = 1_800_000_000.0


def now() -> float:
    return BASE + trio.current_time()


def token(sub: Any = "ada", *, key: Any = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    """A token whose ``exp`` (if given as ``ttl``) is relative to trio's clock."""
    ttl = claims.pop("ttl", 3600)
    payload = {"sub": sub, **claims}
    if ttl is not None:
        payload["exp"] = int(now() + ttl)
    return jwt.encode(payload, key, algorithm=algorithm)


def jwt_server(
    make_server: Callable[..., Server],
    authenticator: JwtAuthenticator | None = None,
    **settings: Any,
) -> Server:
    gateway = make_gateway()
    gateway.authenticate(authenticator or JwtAuthenticator(secret=SECRET, clock=now))
    return make_server(gateway, **settings)


async def closed_after_hello(
    server: Server, nursery: trio.Nursery, **hello: Any
) -> tuple[int, str]:
    async with open_memory_connection(server, nursery) as client:
        await client.send({"type": "hello", **hello})
        return await client.wait_closed()


async def test_a_valid_token_in_hello_names_the_user(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = jwt_server(make_server)
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        welcome = await client.hello(token=token("ada"))
        assert welcome["user"] == "ada"
        # The registry: connection id -> session -> user, and the user's sessions.
        session = server.hub.sessions[welcome["session"]]
        (connection,) = server.hub.connections.values()
        assert connection.session is session
        assert session.connection is connection
        assert session.user == "ada"
        assert server.hub.users["ada"] == {session}
    assert not server.hub.connections


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (lambda: token(ttl=-1), "unauthorized: token expired"),
        (lambda: token(key="another-secret-that-is-32-bytes-long"), "signature"),
        (lambda: jwt.encode({"sub": "ada"}, None, algorithm="none"), "alg value is not allowed"),
        (lambda: token(sub=None), "sub"),
        (lambda: token(sub=""), "sub"),
        (lambda: token(sub="a\nb"), "user id"),
        (lambda: token(topics="room:*"), "topics"),
        (lambda: "not.a.jwt", "invalid token"),
        (lambda: None, "a token is required"),
    ],
)
async def test_a_bad_token_in_hello_closes_with_4001(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    bad: Callable[[], str | None],
    reason: str,
) -> None:
    server = jwt_server(make_server)
    async with running(server) as nursery:
        code, text = await closed_after_hello(server, nursery, token=bad())
    assert code == 4001
    assert reason in text.lower() or reason in text
    assert not server.hub.sessions


async def test_audience_and_issuer_are_checked_where_configured(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    strict = JwtAuthenticator(secret=SECRET, audience="chat", issuer="https://id.test", clock=now)
    server = jwt_server(make_server, strict)
    good = {"aud": "chat", "iss": "https://id.test"}
    async with running(server) as nursery:
        for claims, expected in [
            ({**good, "aud": "billing"}, "audience"),
            ({**good, "iss": "https://evil.test"}, "issuer"),
            ({"iss": "https://id.test"}, "aud"),
        ]:
            code, text = await closed_after_hello(server, nursery, token=token(**claims))
            assert code == 4001
            assert expected in text.lower()
        async with open_memory_connection(server, nursery) as client:
            assert (await client.hello(token=token(**good)))["user"] == "ada"


async def test_handshake_tokens_from_header_or_query_and_401_when_bad(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = jwt_server(make_server)
    async with running(server) as nursery:
        bearer = {"Authorization": f"Bearer {token('ada')}"}
        async with open_memory_connection(server, nursery, headers=bearer) as client:
            assert (await client.hello())["user"] == "ada"  # no token in hello needed
        async with open_memory_connection(server, nursery, path=f"/ws?token={token('bob')}") as c:
            assert (await c.hello())["user"] == "bob"
        for options in (
            {"headers": {"Authorization": f"Bearer {token(ttl=-5)}"}},
            {"path": "/ws?token=garbage"},
        ):
            with pytest.raises(Refused) as refused:
                async with open_memory_connection(server, nursery, **options):
                    pass
            assert refused.value.status == 401
            response = refused.value.response
            assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        assert (
            server.metrics.registry.get_sample_value(
                "wsgate_handshakes_refused_total", {"status": "401"}
            )
            == 2
        )
        # A token in hello wins over the one of the handshake.
        async with open_memory_connection(server, nursery, headers=bearer) as client:
            assert (await client.hello(token=token("bob")))["user"] == "bob"


def _pem(private: Any) -> bytes:
    return bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


@pytest.mark.parametrize(
    ("make_key", "algorithm"),
    [
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), "ES256"),
    ],
)
async def test_public_key_files_rs256_and_es256(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    tmp_path: Path,
    make_key: Callable[[], Any],
    algorithm: str,
) -> None:
    private = make_key()
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(_pem(private))
    authenticator = JwtAuthenticator.from_key_file(key_file, clock=now)
    assert authenticator.algorithms == [algorithm]
    server = jwt_server(make_server, authenticator)
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as client:
            welcome = await client.hello(token=token("ada", key=private, algorithm=algorithm))
            assert welcome["user"] == "ada"
        # Another key pair of the same kind: the signature does not verify.
        forged = token("ada", key=make_key(), algorithm=algorithm)
        assert (await closed_after_hello(server, nursery, token=forged))[0] == 4001
        # Algorithm confusion: HS256 "signed" with the public key as the secret.
        # PyJWT refuses to even make one, so make it by hand.
        confused = jwt.api_jws.PyJWS()
        confused._algorithms["HS256"].prepare_key = lambda key: key  # type: ignore[method-assign]
        made = confused.encode(b'{"sub":"ada"}', _pem(private), algorithm="HS256")
        code, text = await closed_after_hello(server, nursery, token=made)
        assert (code, "alg value is not allowed" in text) == (4001, True)


def test_node_settings_build_the_authenticator(tmp_path: Path) -> None:
    server = Server(make_gateway(), Config(jwt_secret=SECRET, admin_port=None))
    assert isinstance(server.authenticator, JwtAuthenticator)
    assert SECRET not in repr(server.authenticator)
    assert SECRET not in repr(server.config)
    assert Server(make_gateway(), Config(admin_port=None)).authenticator is None
    with pytest.raises(ValueError, match="32 bytes"):
        Config(jwt_secret="short")
    with pytest.raises(ValueError, match="not both"):
        Config(jwt_secret=SECRET, jwt_public_key="key.pem")
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(ValueError, match="PEM"):
        Server(make_gateway(), Config(jwt_public_key=str(bad), admin_port=None))
    good = tmp_path / "ec.pem"
    good.write_bytes(_pem(ec.generate_private_key(ec.SECP256R1())))
    settings = Config(jwt_public_key=str(good), jwt_audience="chat", admin_port=None)
    verifier = Server(make_gateway(), settings).authenticator
    assert isinstance(verifier, JwtAuthenticator)
    assert (verifier.algorithms, verifier.audience) == (["ES256"], "chat")
    with pytest.raises(ValueError, match="RSA or EC"):
        JwtAuthenticator(public_key=_pem(ec.generate_private_key(ec.SECP192R1())))


async def test_an_expired_token_closes_the_session_with_4001_at_exp(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = jwt_server(make_server)
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as client:
            start = trio.current_time()
            welcome = await client.hello(token=token("ada", ttl=30))
            assert await client.wait_closed() == (4001, "unauthorized: token expired")
            assert trio.current_time() - start == 30
        # 4001 ends the session: a resume, even with a fresh token, starts anew.
        async with open_memory_connection(server, nursery) as client:
            again = await client.hello(token=token("ada"), resume=resume_of(welcome, 0))
            assert again["resumed"] is False


async def test_a_refresh_before_exp_keeps_the_session(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = jwt_server(make_server, heartbeat_interval=None)
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        start = trio.current_time()
        await client.hello(token=token("ada", ttl=30))
        await trio.sleep(20)
        await client.send({"type": "refresh", "token": token("ada", ttl=60)})
        await trio.sleep(20)  # past the first token's exp
        await client.send({"type": "msg", "seq": 1, "event": "echo", "data": "still here"})
        assert (await client.recv_type("reply"))["data"] == "still here"
        # ... until the refreshed token expires in turn, 20 + 60 s after the start.
        assert await client.wait_closed() == (4001, "unauthorized: token expired")
        assert trio.current_time() - start == 80


async def test_a_refresh_after_exp_is_too_late(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = jwt_server(make_server)
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        await client.hello(token=token("ada", ttl=30))
        await trio.sleep(31)
        # The connection closed at exp; the refresh finds no one to renew.
        await client.send({"type": "refresh", "token": token("ada", ttl=60)})
        assert await client.wait_closed() == (4001, "unauthorized: token expired")


async def test_only_the_latest_refresh_counts(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = jwt_server(make_server, heartbeat_interval=None)
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        start = trio.current_time()
        await client.hello(token=token("ada", ttl=30))
        await trio.sleep(5)
        # A bad one, then a good one before the first is checked: the good one decides.
        await client.send(
            {"type": "refresh", "token": token("bob", ttl=60)},
            {"type": "refresh", "token": token("ada", ttl=60)},
        )
        assert await client.wait_closed() == (4001, "unauthorized: token expired")
        assert trio.current_time() - start == 65


@pytest.mark.parametrize(
    ("fresh", "reason"),
    [
        (lambda: token("bob", ttl=60), "unauthorized: a token for another user"),
        (lambda: token("ada", ttl=-1), "unauthorized: token expired"),
        (lambda: "garbage", "unauthorized: invalid token: Not enough segments"),
    ],
)
async def test_a_bad_refresh_closes_with_4001(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    fresh: Callable[[], str],
    reason: str,
) -> None:
    server = jwt_server(make_server)
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        await client.hello(token=token("ada", ttl=30))
        await trio.sleep(5)
        await client.send({"type": "refresh", "token": fresh()})
        assert await client.wait_closed() == (4001, reason)


async def test_a_token_for_another_user_does_not_resume(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = jwt_server(make_server)
    async with running(server) as nursery:
        async with open_memory_connection(server, nursery) as client:
            first = await client.hello(token=token("ada"))
        async with open_memory_connection(server, nursery) as client:
            welcome = await client.hello(token=token("bob"), resume=resume_of(first, 0))
            assert (welcome["resumed"], welcome["user"]) == (False, "bob")
        async with open_memory_connection(server, nursery) as client:
            welcome = await client.hello(token=token("ada"), resume=resume_of(first, 0))
            assert (welcome["resumed"], welcome["user"]) == (True, "ada")


async def test_tokens_never_reach_the_logs(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    server = jwt_server(make_server)
    secrets = [token("ada", ttl=-1), token("ada", key="wrong-secret-wrong-secret-wrong-sec")]
    async with running(server) as nursery:
        for secret in secrets:
            await closed_after_hello(server, nursery, token=secret)
            with pytest.raises(Refused):
                async with open_memory_connection(
                    server, nursery, headers={"Authorization": f"Bearer {secret}"}
                ):
                    pass
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for secret in secrets:
        assert secret not in logged
        assert secret.split(".")[2] not in logged  # not even the signature
    assert SECRET not in logged


async def test_a_refresh_still_being_checked_is_cancelled_at_the_decision_to_close(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Like the application's tasks: it does not finish on a connection that is closing."""
    gateway, checked = make_gateway(), []

    async def authenticator(token: str | None) -> str:
        if token == "slow":
            await trio.sleep(1)  # a key fetch
            checked.append(token)
        return "ada"

    gateway.authenticate(authenticator)
    server = make_server(gateway, heartbeat_interval=None, close_timeout=2)
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        await client.hello(token="fine")
        (connection,) = server.connections
        await client.send({"type": "refresh", "token": "slow"})
        await trio.testing.wait_all_tasks_blocked()  # the check is under way
        await client.send({"type": "bye"})
        # The client does not answer the close: the connection stays for close_timeout,
        # longer than the check would take.
        await connection.wait_released()
        assert connection.close_code == 1000
        assert connection.released_at == connection.close_decided_at + 2
        assert checked == []


async def test_a_flood_of_refreshes_keeps_one_check_in_flight(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Found by a hostile review: each refresh started a check, and none was cancelled
    by a later one, although only the latest decides. 30,000 refreshes in a second were
    30,000 calls in flight to an authenticator that asks an identity provider. The
    latest now cancels the check of an earlier one, and the refreshes of one read
    start one task."""
    gateway, calls = make_gateway(), {"started": 0, "in flight": 0, "most": 0}

    async def provider(token: str | None) -> Identity:
        calls["started"] += 1
        calls["in flight"] += 1
        calls["most"] = max(calls["most"], calls["in flight"])
        try:
            await trio.sleep(0.1)  # a round trip to the identity provider
        finally:
            calls["in flight"] -= 1
        return Identity("ada", deadline=trio.current_time() + int(token or "10"))

    gateway.authenticate(provider)
    server = make_server(gateway, heartbeat_interval=None)
    async with running(server) as nursery, open_memory_connection(server, nursery) as client:
        await client.hello(token="10")
        for _burst in range(20):
            for _ in range(500):
                await client.send({"type": "refresh", "token": "60"})
            await trio.sleep(0.05)
        await client.send({"type": "refresh", "token": "3600"})  # the latest decides
        sent = trio.current_time()
        await trio.sleep(1)
        # (One cancelled check may still be unwinding as the next starts.)
        assert calls["most"] <= 2
        (session,) = server.hub.sessions.values()
        assert session.identity.deadline == sent + 0.1 + 3600
        await client.close()


# Issue 18, case 3: time claims that are not times. Python's JSON reads NaN, Infinity
# and 1e400 (as inf); NaN reached the node's timer heap and trio refused it as a
# deadline ("deadline must not be NaN"), which ended the process.
BAD_TIMES = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e400",
    str(2**53),  # MAX_TIME: the first value refused
    str(2**64),
    "1" + "0" * 400,
    "-1",
    "true",
    "false",
    '"1800000000"',
    "null",
    "[1800000000]",
]


def raw_token(**claims: str) -> str:
    """A correctly signed token whose claims are JSON text as given (NaN, 1e400...)."""
    fields = {"sub": '"ada"', "exp": str(int(now() + 3600)), **claims}
    payload = "{" + ",".join(f'"{name}":{value}' for name, value in fields.items()) + "}"
    return jwt.api_jws.encode(payload.encode(), SECRET, algorithm="HS256")


BAD_CLAIMS = [
    pytest.param(name, value, id=f"{name}={value[:12]}")
    for name in ("exp", "nbf", "iat")
    for value in BAD_TIMES
]


async def expires_on_time(server: Server, nursery: trio.Nursery) -> None:
    """The node still serves, and its timers still run: a token expires at its exp."""
    async with open_memory_connection(server, nursery) as client:
        start = trio.current_time()
        await client.hello(token=token("ada", ttl=30))
        await client.send({"type": "msg", "seq": 1, "event": "echo", "data": "hi"})
        assert (await client.recv_type("reply"))["data"] == "hi"
        assert await client.wait_closed() == (4001, "unauthorized: token expired")
        assert trio.current_time() - start == 30


@pytest.mark.parametrize(("name", "value"), BAD_CLAIMS)
async def test_a_time_claim_that_is_not_a_time_is_refused_everywhere(
    autojump_clock: MockClock, make_server: Callable[..., Server], name: str, value: str
) -> None:
    server = jwt_server(make_server, heartbeat_interval=None)
    bad = raw_token(**{name: value})
    reason = f"unauthorized: invalid token: {name} is not a valid time"
    async with running(server) as nursery:
        # At the handshake: 401.
        with pytest.raises(Refused) as refused:
            async with open_memory_connection(
                server, nursery, headers={"Authorization": f"Bearer {bad}"}
            ):
                pass
        assert refused.value.status == 401
        assert refused.value.response.body.decode() == reason + "\n"
        # In hello: 4001.
        assert await closed_after_hello(server, nursery, token=bad) == (4001, reason)
        # In refresh: 4001.
        async with open_memory_connection(server, nursery) as client:
            await client.hello(token=token("ada"))
            await client.send({"type": "refresh", "token": bad})
            assert await client.wait_closed() == (4001, reason)
        assert not server.hub.sessions
        await expires_on_time(server, nursery)
    assert server.metrics.registry.get_sample_value("wsgate_internal_errors_total") == 0


async def test_valid_time_claims_are_taken_with_their_fractions(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    server = jwt_server(make_server, heartbeat_interval=None)
    async with running(server) as nursery:
        start = trio.current_time()
        # RFC 7519's NumericDate may have a fraction; nbf and iat in the past are fine.
        fine = raw_token(exp=repr(now() + 30.5), nbf=repr(now() - 1.5), iat=str(int(now())))
        async with open_memory_connection(server, nursery) as client:
            await client.hello(token=fine)
            assert await client.wait_closed() == (4001, "unauthorized: token expired")
            assert trio.current_time() - start == 30.5
        # Not valid yet: nbf or iat in the future (by the authenticator's clock).
        for name in ("nbf", "iat"):
            early = raw_token(**{name: str(int(now() + 60))})
            code, reason = await closed_after_hello(server, nursery, token=early)
            assert (code, reason) == (4001, f"unauthorized: invalid token: not valid yet ({name})")
        # The largest time taken: exp just under MAX_TIME, a finite deadline.
        async with open_memory_connection(server, nursery) as client:
            assert (await client.hello(token=raw_token(exp=str(2**53 - 1))))["user"] == "ada"
            (connection,) = server.connections
            assert connection.session is not None
            deadline = connection.session.identity.deadline
            assert deadline is not None
            assert deadline < 2**53


def test_the_leeway_is_a_finite_number_of_seconds() -> None:
    for leeway in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="leeway"):
            JwtAuthenticator(secret=SECRET, leeway=leeway)


@pytest.mark.parametrize(
    ("deadline", "refused"),
    [
        (float("nan"), True),
        (-float("inf"), True),
        (float("inf"), False),  # never, like None
        (10**400, False),  # past the floats: never too
    ],
    ids=["nan", "-inf", "inf", "huge-int"],
)
async def test_an_authenticators_own_deadline_never_reaches_trio_unless_finite(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    deadline: float,
    refused: bool,
) -> None:
    """A custom authenticator sets Identity.deadline itself: checked all the same."""
    gateway = make_gateway()
    valid = JwtAuthenticator(secret=SECRET, clock=now)

    async def authenticator(given: str | None) -> Identity:
        if given == "odd":
            return Identity("ada", deadline)
        return await valid(given)

    gateway.authenticate(authenticator)
    server = make_server(gateway, heartbeat_interval=None)
    reason = "unauthorized: invalid token: its expiry is not a valid time"
    async with running(server) as nursery:
        if refused:
            with pytest.raises(Refused) as info:
                async with open_memory_connection(
                    server, nursery, headers={"Authorization": "Bearer odd"}
                ):
                    pass
            assert info.value.status == 401
            assert await closed_after_hello(server, nursery, token="odd") == (4001, reason)
            async with open_memory_connection(server, nursery) as client:
                await client.hello(token=token("ada"))
                await client.send({"type": "refresh", "token": "odd"})
                assert await client.wait_closed() == (4001, reason)
        else:
            async with open_memory_connection(server, nursery) as client:
                await client.hello(token="odd")
                (connection,) = server.connections
                assert connection.session is not None
                assert connection.session.identity.deadline is None
                await trio.sleep(10**6)  # never expires
                await client.send({"type": "msg", "seq": 1, "event": "echo", "data": 1})
                assert (await client.recv_type("reply"))["data"] == 1
        await expires_on_time(server, nursery)
    assert server.metrics.registry.get_sample_value("wsgate_internal_errors_total") == 0


def _crit(extension: str) -> str:
    """An unsigned token whose header names a critical extension PyJWT does not know
    (PyJWT's message names it, before any signature is checked)."""
    import base64
    import json

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    header = part({"alg": "HS256", "typ": "JWT", "crit": [extension]})
    return f"{header}.{part({'sub': 'ada'})}.c2ln"


async def test_a_token_cannot_choose_what_its_refusal_says(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Found by a hostile review: PyJWT names an unknown ``crit`` entry in its message,
    which was the 401's body and the 4001's reason. A lone surrogate there could not be
    encoded: the handshake was dropped as a bug of the node's (ASGI: 500) and a hello
    closed 1011; CR and LF went into the body as they came."""
    server = jwt_server(make_server)
    async with running(server) as nursery:
        for extension in ("\ud800", "a\r\nSet-Cookie: x=1", "x" * 500):
            forged = _crit(extension)
            with pytest.raises(Refused) as refused:
                async with open_memory_connection(
                    server, nursery, headers={"Authorization": f"Bearer {forged}"}
                ):
                    pass
            assert refused.value.status == 401
            body = refused.value.response.body or b""
            assert body.startswith(b"unauthorized: invalid token: Unsupported critical")
            assert b"\r" not in body.rstrip(b"\n")
            assert len(body) <= 130
            code, reason = await closed_after_hello(server, nursery, token=forged)
            assert code == 4001
            assert reason.startswith("unauthorized: invalid token")
            assert reason.isascii()
            assert reason.isprintable()
    assert sample(server, "wsgate_internal_errors_total") == 0


def test_a_repeated_request_header_is_read_by_its_first_value() -> None:
    from websockets.datastructures import Headers

    from trio_wsgate.transports.base import FirstValues

    headers = FirstValues(Headers([("Authorization", "Bearer a"), ("authorization", "Bearer b")]))
    assert headers["AUTHORIZATION"] == headers.get("Authorization") == "Bearer a"
    assert headers.get("Origin") is None
    assert len(headers) == 1
