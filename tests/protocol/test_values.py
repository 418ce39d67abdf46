"""The one value domain: whatever a codec accepts, both encoders encode (issue 18)."""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
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
        return any(_has_bytes(item) for item in [*value, *value.values()])
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


# Maps shaped like a client's msg to a handler, and near misses: each field present or
# not, most of the time of the right type, else of another (booleans for integers,
# integers for strings, past the bounds, a non-ASCII event), or a field no handler's msg
# has.
_integers = st.sampled_from([0, 1, 7, MAX_SAFE_INTEGER])
_misfits = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([-1, MAX_SAFE_INTEGER + 1, 2**64, 1.5, "é", "\ud800", "1", [1], {"a": 1}]),
)


@st.composite
def msg_like(draw: st.DrawFn) -> dict[str, Any]:
    value: dict[str, Any] = {"type": "msg", "seq": draw(_integers)}
    for key, good in (("ack", _integers), ("event", st.sampled_from(["echo", "a.b", ""]))):
        if draw(st.booleans()):
            value[key] = draw(good)
    if draw(st.booleans()):  # long runs of digits: exact in a string, 1007 as a number
        value["data"] = draw(
            values | st.sampled_from(["1" * 20, "-" + "9" * 25, {"n": 2**64}, [-(2**70)]])
        )
    # One misfit, sometimes: a field of another type or value, or one more field.
    misfit = draw(st.sampled_from([None, None, None, "type", "seq", "ack", "event", "+"]))
    if misfit == "type":
        value["type"] = draw(st.sampled_from(["reply", "Msg", 1]))
    elif misfit == "+":
        value[draw(st.sampled_from(["topic", "offset", "x", b"seq"]))] = 1
    elif misfit is not None:
        value[misfit] = draw(_misfits)
    return value


def _general(value: Any) -> str:
    """What the general way makes of one decoded message (an envelope or a batch): the
    checks and walk that the codecs' shortcut for requests must agree with, as a
    ``repr``, so that ``True`` and ``1`` differ."""
    from trio_wsgate.protocol import parse_envelope
    from trio_wsgate.protocol.values import weigh

    items = value if isinstance(value, list) else [value]
    weight = 16 * len(items) if isinstance(value, list) else 0
    envelopes = []
    for item in items:
        item_weight = weigh(item)
        if item_weight < 0:
            return repr(("error", 1007))
        try:
            envelopes.append(parse_envelope(item))
        except ProtocolError as exc:
            return repr(("error", int(exc.code)))
        weight += item_weight
    return repr((envelopes, weight))


def _decoded_by(codec: Any, raw: bytes) -> str:
    try:
        envelopes, weight = codec.decode_weighed(raw)
    except ProtocolError as exc:
        return repr(("error", int(exc.code)))
    return repr((envelopes, weight))


@settings(max_examples=500)
@given(msg_like(), st.integers(min_value=0, max_value=2))
def test_a_request_is_checked_and_weighed_as_any_envelope(
    value: dict[str, Any], batch: int
) -> None:
    """The codecs check and weigh the usual msg to a handler in one look (codecs.py,
    ``_request``): the envelopes, their weight and every refusal are the general
    way's, alone or in a batch."""
    message: Any = [value] * batch if batch else value
    for codec, raw in ((CODECS[0], _raw_json(message)), (CODECS[1], _raw_msgpack(message))):
        if raw is None:
            continue
        try:
            decoded = codec.loads(raw)
        except ProtocolError:
            continue  # not even decoded: nothing to weigh
        assert _decoded_by(codec, raw) == _general(decoded)
