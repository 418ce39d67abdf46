"""Hypothesis over the decoder and over a live connection's state machine (issue 6).

Random and mutated envelopes, batches, bytes and frame kinds: the only outcomes are
envelopes, a :class:`ProtocolError` with a documented close code, or a connection
closed with one of docs/protocol.md §8's codes. Never an unhandled exception, never a
1011, and never harm to the connection next door.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_wsgate import Config, Server
from trio_wsgate.exceptions import ProtocolError
from trio_wsgate.protocol import CODECS, JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL
from trio_wsgate.testing import open_memory_connection

from .conftest import make_gateway

#: What the decoder may refuse with (docs/protocol.md §8): bad envelope, bad payload.
DECODER_CODES = {1002, 1007}
#: What a server may close a fuzzed connection with: §8's codes, 1011 excepted.
CLOSE_CODES = {1000, 1002, 1003, 1007, 1008, 1009, 4001, 4002, 4003, 4004, 4009}

TYPES = ["hello", "welcome", "msg", "reply", "sub", "unsub", "pub", "ack", "ping", "pong"]
TYPES += ["refresh", "bye", "teleport", ""]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    # Inside the value domain and beyond it (protocol/values.py).
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
small_ints = st.integers(min_value=-2, max_value=12)


@st.composite
def envelopes(draw: st.DrawFn) -> Any:
    """An envelope-shaped map: a type, and fields of the right names, any values."""
    envelope: dict[str, Any] = {}
    if draw(st.integers(0, 19)):  # rarely: no type
        envelope["type"] = draw(st.sampled_from(TYPES) | st.text(max_size=6) | values)
    for name in draw(st.sets(st.sampled_from(FIELDS), max_size=5)):
        envelope[name] = draw(st.one_of(small_ints, values))
    if draw(st.integers(0, 9)) == 0:  # rarely: not a map at all
        return draw(values)
    return envelope


FIELDS = ["seq", "ack", "re", "event", "topic", "data", "token", "resume", "since", "ts"]


def encode(value: Any, binary: bool) -> bytes:
    if binary:
        return msgpack.packb(value, use_bin_type=True)
    return json.dumps(value).encode()


messages = st.one_of(
    st.tuples(st.lists(envelopes(), min_size=1, max_size=4), st.just("batch")),
    st.tuples(envelopes(), st.just("one")),
    st.tuples(st.binary(max_size=40), st.just("raw")),
)


def payload_of(message: tuple[Any, str], binary: bool) -> bytes:
    value, kind = message
    if kind == "raw":
        return bytes(value)
    return encode(value, binary)


@settings(max_examples=300, deadline=None)
@given(
    subprotocol=st.sampled_from([JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL]),
    message=messages,
    flips=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=3),
)
def test_the_decoder_gives_envelopes_or_a_documented_code(
    subprotocol: str, message: tuple[Any, str], flips: list[tuple[int, int]]
) -> None:
    codec = CODECS[subprotocol]()
    payload = bytearray(payload_of(message, codec.binary))
    for at, byte in flips:  # mutate a valid encoding
        if payload:
            payload[at % len(payload)] = byte
    outcome: list[Any] | ProtocolError
    try:
        outcome = codec.decode(bytes(payload))
    except ProtocolError as exc:
        outcome = exc
    if isinstance(outcome, ProtocolError):
        assert outcome.code in DECODER_CODES
        assert outcome.reason
    else:
        assert all(envelope.type for envelope in outcome)


async def _fuzz_connection(
    subprotocol: str, steps: list[tuple[str, Any]], hello_first: bool
) -> tuple[int | None, int]:
    gateway = make_gateway()
    server = Server(
        gateway,
        Config(
            admin_port=None,
            heartbeat_interval=None,  # the neighbour sleeps through the waits too
            window=4,
            max_message_size=4096,
            rate_limit=50,
            rate_burst=20,
        ),
    )
    codec = CODECS[subprotocol]()
    async with trio.open_nursery() as nursery:
        async with open_memory_connection(server, nursery) as neighbour:
            await neighbour.hello()
            async with open_memory_connection(server, nursery, subprotocols=[subprotocol]) as bad:
                if hello_first:
                    await bad.hello()
                for kind, value in steps:
                    try:
                        if kind == "wait":
                            await trio.sleep(value)
                        elif kind == "frame":
                            await bad.send_raw(bytes(value[0]), binary=value[1])
                        else:
                            payload = payload_of(value, codec.binary)
                            await bad.send_raw(payload, binary=codec.binary)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        break  # the server has closed its end
                    await trio.testing.wait_all_tasks_blocked()
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await bad.close()
                code, _ = await bad.wait_closed()
            # The neighbour was never touched.
            await neighbour.send({"type": "msg", "seq": 1, "event": "echo", "data": "ok"})
            assert (await neighbour.recv_type("reply"))["data"] == "ok"
            await neighbour.close()
        nursery.cancel_scope.cancel()
    errors = server.metrics.internal_errors._value.get()
    return code, int(errors)


def fuzz_connection(
    subprotocol: str, steps: list[tuple[str, Any]], hello_first: bool
) -> tuple[int | None, int]:
    """Run the steps on MockClock: how the connection ended, and the internal errors."""
    return trio.run(
        _fuzz_connection,
        subprotocol,
        steps,
        hello_first,
        clock=trio.testing.MockClock(autojump_threshold=0),
    )


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    subprotocol=st.sampled_from([JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL]),
    hello_first=st.booleans(),
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("message"), messages),
            st.tuples(st.just("frame"), st.tuples(st.binary(max_size=30), st.booleans())),
            st.tuples(st.just("wait"), st.sampled_from([0.01, 0.2, 1.0, 40.0])),
        ),
        max_size=8,
    ),
)
def test_a_fuzzed_connection_ends_only_with_documented_codes(
    subprotocol: str, hello_first: bool, steps: list[tuple[str, Any]]
) -> None:
    code, errors = fuzz_connection(subprotocol, steps, hello_first)
    assert errors == 0
    assert code is None or code in CLOSE_CODES, code


@pytest.mark.parametrize("number", [2**53, -(2**53), 2**64, -(2**63) - 1, 10**30])
def test_numbers_beyond_the_safe_integers_are_refused_as_invalid_data(number: int) -> None:
    codec = CODECS[JSON_SUBPROTOCOL]()
    for field in ("seq", "ack", "data"):
        with pytest.raises(ProtocolError) as info:
            codec.decode(json.dumps({"type": "msg", "seq": 1, field: number}).encode())
        assert info.value.code == 1007


async def test_an_example_of_each_documented_refusal_is_reached() -> None:
    """The strategies above do reach the codes: a sanity check of the fuzzing itself."""
    seen = set()
    codec = CODECS[JSON_SUBPROTOCOL]()
    for payload in (b"{", b'{"type": "teleport"}', b'{"type": "msg", "seq": "x"}', b"\xff"):
        try:
            codec.decode(payload)
        except ProtocolError as exc:
            seen.add(exc.code)
    assert seen == DECODER_CODES


@pytest.mark.parametrize(
    ("steps", "hello_first", "expected"),
    [
        ([("frame", (b"{", False))], True, 1007),
        ([("message", ({"type": "teleport"}, "one"))], True, 1002),
        ([("frame", (b"{}", True))], True, 1003),
        ([("wait", 40.0)], False, 4003),
        ([("message", ([{"type": "ping"}] * 30, "batch"))], True, 4009),
        ([("message", ({"type": "ping"}, "one"))], True, 1000),
    ],
)
def test_the_fuzzing_harness_sees_each_ending(
    steps: list[tuple[str, Any]], hello_first: bool, expected: int
) -> None:
    """The harness of the property above reports what really happened."""
    assert fuzz_connection(JSON_SUBPROTOCOL, steps, hello_first) == (expected, 0)
