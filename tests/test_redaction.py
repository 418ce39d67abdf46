"""No secret reaches the logs: tokens, API keys, resume tokens (issue 6)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from trio_wsgate import Server
from trio_wsgate.logs import RedactingFilter, redact

from .conftest import ALL_TRANSPORTS
from .test_auth import SECRET, jwt_server, token
from .test_limits import connect_from, refused

pytestmark = pytest.mark.transports(*ALL_TRANSPORTS)


async def test_secret_shapes_are_redacted() -> None:
    jwt = token("ada")
    cases = {
        f"GET /ws?token={jwt}&x=1": "GET /ws?token=[redacted]&x=1",
        f"Authorization: Bearer {jwt}": "Authorization: Bearer [redacted]",
        "Authorization: apikey k3y-Value": "Authorization: apikey [redacted]",
        f'{{"type": "hello", "token": "{jwt}"}}': '{"type": "hello", "token": "[redacted]"}',
        "{'resume_token': 'abc.def'}": "{'resume_token': '[redacted]'}",
        "redis://:hunter2@localhost:6379/0": "redis://:[redacted]@localhost:6379/0",
        # The other schemes --redis takes (found by a hostile review: not redacted).
        "redis+sentinel://:pw@h:26379/main": "redis+sentinel://:[redacted]@h:26379/main",
        "redis+cluster://u:pw@a:7000,b:7001": "redis+cluster://u:[redacted]@a:7000,b:7001",
        "unix://:pw@/run/redis.sock": "unix://:[redacted]@/run/redis.sock",
        "see http://example.com:80/a@b": "see http://example.com:80/a@b",  # no password
        f"a bare {jwt} in text": "a bare [redacted] in text",
    }
    for text, expected in cases.items():
        assert redact(text) == expected
    assert redact("the key is s3cr3t-value", ["s3cr3t-value"]) == "the key is [redacted]"
    assert redact("nothing to hide here") == "nothing to hide here"


def test_the_filter_redacts_messages_arguments_and_tracebacks() -> None:
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "token=%s", ("abc",), None)
    try:
        raise ValueError("apikey sekrit")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    assert RedactingFilter(["abc"]).filter(record)
    assert record.getMessage() == "token=[redacted]"
    assert record.exc_text is not None
    assert "sekrit" not in record.exc_text
    assert "apikey [redacted]" in record.exc_text


async def test_the_gateway_logs_no_secret_at_debug_level(
    autojump_clock: MockClock,
    make_server: Callable[..., Server],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, the libraries' too
    server = jwt_server(make_server, heartbeat_interval=None)
    good, expired, other = token("ada"), token("ada", ttl=-10), token("bob", ttl=-10)
    async with trio.open_nursery() as nursery:
        # A token in the query string and one in the header.
        first = await connect_from(server, nursery, headers={"X-Test": "1"})
        welcome = await first.hello(token=good)
        refresh = token("ada", ttl=7200)
        await first.send({"type": "refresh", "token": refresh})
        await first.send({"type": "msg", "seq": 1, "event": "fail", "data": None})
        await first.recv_type("reply")
        await first.stream.aclose()
        assert (
            await refused(server, nursery, headers={"Authorization": f"Bearer {expired}"})
        ).status == 401
        client_stream, server_stream = trio.testing.memory_stream_pair()
        nursery.start_soon(server.serve_stream, server_stream, "10.0.0.9:1")
        from trio_wsgate.testing import RawClient, Refused

        with pytest.raises(Refused):
            await RawClient.connect(client_stream, path=f"/ws?token={other}")
        again = await connect_from(server, nursery)
        resume = {"session": welcome["session"], "token": welcome["resume_token"], "ack": 0}
        await again.hello(token=good, resume=resume)
        bad = await connect_from(server, nursery)
        await bad.send({"type": "hello", "token": expired})
        assert (await bad.wait_closed())[0] == 4001
        nursery.cancel_scope.cancel()
    text = caplog.text
    assert text  # something was logged (the failing handler, at least)
    for secret in (good, expired, other, refresh, welcome["resume_token"], SECRET):
        assert secret not in text
