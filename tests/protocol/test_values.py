"""The one value domain: whatever a codec accepts, both encoders encode (issue 18)."""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_wsgate.exceptions import ProtocolError
from trio_wsgate.protocol import JsonCodec, MsgpackCodec
from trio_wsgate.protocol.values import MAX_DEPTH, MAX_SAFE_INTEGER, check_value, value_error

CODECS = [JsonCodec(), MsgpackCodec()]

# Values inside the domain and beyond it: every integer msgpack and JSON carry, NaN and
# the infinities, lone surrogates, bytes.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64 + 1),
    st.sampled_from([MAX_SAFE_INTEGER, MAX_SAFE_INTEGER + 1, -MAX_SAFE_INTEGER - 1]),
    st.floats(),
    st.text(max_size=8),
    st.sampled_from(["\ud800", "a\udfffb", "é"]),
    st.binary(max_size=4),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=10,
)


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def _raw_json(value: Any) -> bytes | None:
    """``value`` written as a peer may write it (NaN, lone surrogates and all)."""
    if _has_bytes(value):
        return None
    return json.dumps(value, allow_nan=True).encode()  # ensure_ascii: \ud800 escapes


def _has_bytes(value: Any) -> bool:
    if isinstance(value, bytes):
        return True
    if isinstance(value, list):
        return any(_has_bytes(item) for item in value)
    if isinstance(value, dict):
        return any(_has_bytes(item) for item in value.values())
    return False


def _raw_msgpack(value: Any) -> bytes | None:
    try:
        packed: bytes = msgpack.packb(value, use_bin_type=True, unicode_errors="surrogatepass")
    except (OverflowError, ValueError, TypeError, UnicodeEncodeError):
        return None
    return packed


@given(data=values)
def test_anything_a_decoder_accepts_both_encoders_encode(data: Any) -> None:
    envelope = {"type": "msg", "seq": 1, "event": "e", "data": data}
    for codec, raw in ((CODECS[0], _raw_json(envelope)), (CODECS[1], _raw_msgpack(envelope))):
        if raw is None:
            continue
        if value_error(envelope) is not None:
            with pytest.raises(ProtocolError) as info:
                codec.decode(raw)
            assert info.value.code == 1007
            continue
        (decoded,) = codec.decode(raw)
        for other in CODECS:
            assert other.decode(other.encode(decoded)) == [decoded]


@given(data=values)
def test_the_domain_is_what_both_encoders_carry_exactly(data: Any) -> None:
    if value_error(data) is not None:
        return
    for codec in CODECS:
        assert codec.loads(codec.dumps(data)) == data or _has_nan(data)


def _has_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


@pytest.mark.parametrize(
    "value",
    [
        2**53,
        -(2**53),
        2**64,
        math.nan,
        math.inf,
        -math.inf,
        "\ud800",
        {"\udc00": 1},
        b"bytes",
        _nested(MAX_DEPTH + 1),
        {1: "a"},
        {1, 2},
    ],
    ids=repr,
)
def test_values_outside_the_domain_are_refused(value: Any) -> None:
    with pytest.raises(ValueError, match=r"integer|NaN|Unicode|bytes|nest|key|type"):
        check_value(value)


@pytest.mark.parametrize(
    "value",
    [
        MAX_SAFE_INTEGER,
        -MAX_SAFE_INTEGER,
        1.5e300,
        "é\U0001f600",
        _nested(MAX_DEPTH),
        (1, 2),
        {"a": [None, True, 0.5]},
    ],
    ids=repr,
)
def test_values_inside_the_domain_pass(value: Any) -> None:
    assert check_value(value) is value


_OUTSIDE = {
    "2**53": 2**53,
    "too deep": _nested(MAX_DEPTH),
    "surrogate": "\ud800",
    "nan": math.nan,
    "infinity": -math.inf,
}


@pytest.mark.parametrize(
    ("codec", "data"),
    [(codec, value) for codec in CODECS for value in _OUTSIDE.values()]
    + [(CODECS[0], 2**64), (CODECS[1], b"\x00")],  # what only one encoding can carry
    ids=[f"{c}-{v}" for c in ("json", "msgpack") for v in _OUTSIDE]
    + ["json-2**64", "msgpack-bytes"],
)
def test_a_message_outside_the_domain_is_1007(codec: Any, data: Any) -> None:
    envelope = {"type": "msg", "seq": 1, "data": data}
    raw = _raw_json(envelope) if codec.subprotocol.endswith("json") else _raw_msgpack(envelope)
    assert raw is not None
    with pytest.raises(ProtocolError) as info:
        codec.decode(raw)
    assert info.value.code == 1007


def test_a_ping_ts_or_a_token_outside_the_domain_is_1007() -> None:
    codec = CODECS[0]
    for raw in (b'{"type":"ping","ts":1e400}', b'{"type":"hello","token":"\\ud800"}'):
        with pytest.raises(ProtocolError) as info:
            codec.decode(raw)
        assert info.value.code == 1007
