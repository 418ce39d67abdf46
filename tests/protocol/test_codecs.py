"""The two encodings and envelope validation: round trips and every malformed case."""

from __future__ import annotations

import datetime
import enum
import json
import tracemalloc
import uuid
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_wsgate.exceptions import ProtocolError
from trio_wsgate.protocol import (
    Ack,
    Bye,
    Envelope,
    ErrorInfo,
    Hello,
    JsonCodec,
    Msg,
    MsgpackCodec,
    Ping,
    Pong,
    Pub,
    Refresh,
    Reply,
    Resume,
    Since,
    Sub,
    Unsub,
    Welcome,
    parse_envelope,
)

CODECS = [JsonCodec(), MsgpackCodec()]
u53 = st.integers(min_value=0, max_value=2**53 - 1)
text = st.text(max_size=20)
json_data = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53 - 1), 2**53 - 1) | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=10,
)
opt = st.none

envelopes = st.one_of(
    st.builds(Hello, token=opt() | text, resume=opt() | st.builds(Resume, text, text, u53)),
    st.builds(
        Welcome,
        session=text,
        resume_token=text,
        resumed=st.booleans(),
        ack=u53,
        heartbeat_interval=st.integers(0, 100),
        heartbeat_timeout=st.integers(0, 100),
        window=u53,
        max_message_size=u53,
        user=opt() | text,
    ),
    st.builds(
        Msg,
        seq=u53,
        event=opt() | text,
        topic=opt() | text,
        offset=opt() | u53,
        epoch=opt() | text,
        data=json_data,
        ack=opt() | u53,
    ),
    st.builds(Reply, seq=u53, re=u53, data=json_data, error=opt(), ack=opt() | u53),
    st.builds(Reply, seq=u53, re=u53, error=st.builds(ErrorInfo, text, text), ack=opt() | u53),
    st.builds(Sub, seq=u53, topic=text, since=opt() | st.builds(Since, u53, text), ack=opt() | u53),
    st.builds(Unsub, seq=u53, topic=text, ack=opt() | u53),
    st.builds(Pub, seq=u53, topic=text, data=json_data, ack=opt() | u53),
    st.builds(Ack, u53),
    st.builds(Ping, ts=opt() | u53),
    st.builds(Pong, ts=opt() | u53),
    st.builds(Refresh, text),
    st.builds(Bye),
)


@pytest.mark.parametrize("codec", CODECS, ids=["json", "msgpack"])
@given(envelope=envelopes)
def test_every_envelope_round_trips(codec: Any, envelope: Envelope) -> None:
    assert codec.decode(codec.encode(envelope)) == [envelope]


@pytest.mark.parametrize("codec", CODECS, ids=["json", "msgpack"])
@given(batch=st.lists(envelopes, min_size=1, max_size=5))
def test_batches_decode_in_order(codec: Any, batch: list[Envelope]) -> None:
    payload = codec.batch([codec.encode(e) for e in batch])
    assert codec.decode(payload) == batch


def test_an_empty_batch_is_no_envelope_at_all() -> None:
    assert JsonCodec().decode(b"[]") == []
    assert MsgpackCodec().decode(b"\x90") == []


def test_unknown_fields_are_ignored() -> None:
    assert parse_envelope({"type": "ack", "ack": 3, "future": [1, 2]}) == Ack(3)


@pytest.mark.parametrize(
    "value",
    [
        "hello",
        {"no": "type"},
        {"type": 7},
        {"type": "nonsense"},
        {"type": "msg"},
        {"type": "msg", "seq": -1},
        {"type": "msg", "seq": 2**53},
        {"type": "msg", "seq": 1.5},
        {"type": "msg", "seq": True},
        {"type": "msg", "seq": "1"},
        {"type": "msg", "seq": 1, "event": 5},
        {"type": "msg", "seq": 1, "ack": -3},
        {"type": "ack"},
        {"type": "sub", "seq": 1},
        {"type": "sub", "seq": 1, "topic": "t", "since": {"offset": 1}},
        {"type": "sub", "seq": 1, "topic": "t", "since": 5},
        {"type": "sub", "seq": 1, "topic": "t", "recover": "yes"},
        {"type": "sub", "seq": 1, "topic": "t", "recover": 1},
        {"type": "pub", "seq": 1, "topic": "t"},
        {"type": "hello", "resume": {"session": "s", "token": "t"}},
        {"type": "hello", "token": 5},
        {"type": "refresh"},
    ],
)
def test_bad_envelopes_are_protocol_errors(value: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_envelope(value)
    assert info.value.code == 1002


def test_a_publish_without_seq_is_told_so() -> None:
    # (Not taken for a server's version-2 delivery, which carries an offset instead.)
    with pytest.raises(ProtocolError, match="pub: missing integer field 'seq'"):
        parse_envelope({"type": "pub", "topic": "t", "data": 1})
    with pytest.raises(ProtocolError, match="pub: missing integer field 'offset'"):
        parse_envelope({"type": "pub", "topic": "t", "data": 1, "epoch": "e", "offset": None})


@pytest.mark.parametrize(
    "payload",
    [b"{", b"\xff\xfe", b'{"type": "ack", "ack": NaN}', b"[" * 100_000 + b"]" * 100_000, b""],
)
def test_bad_json_is_1007(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        JsonCodec().decode(payload)
    assert info.value.code == 1007


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # never used
        b"\x92\x01",  # truncated array
        msgpack.packb({"type": "ack", "ack": 1}) + b"\x00",  # extra data
        msgpack.packb(msgpack.ExtType(5, b"x")),  # ext types are refused
        msgpack.packb(msgpack.Timestamp(1)),  # the timestamp ext too
        msgpack.packb({1: 2}),  # non-string keys
        b"\xa3\xff\xff\xff",  # str with invalid UTF-8
        b"\xdd\xff\xff\xff\xff",  # array header claiming 4 billion items
    ],
)
def test_bad_msgpack_is_1007(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        MsgpackCodec().decode(payload)
    assert info.value.code == 1007


def test_json_encoding_is_compact_utf8() -> None:
    payload = JsonCodec().encode(Msg(seq=1, event="é", data=[1]))
    assert payload == '{"type":"msg","seq":1,"event":"é","data":[1]}'.encode()
    assert json.loads(payload) == {"type": "msg", "seq": 1, "event": "é", "data": [1]}


def test_json_refuses_to_encode_nan() -> None:
    with pytest.raises(ValueError, match="JSON"):
        JsonCodec().encode(Msg(seq=1, data=float("nan")))
    with pytest.raises(ValueError, match="JSON"):
        JsonCodec().encode(Msg(seq=1, data={"a": None, "b": [float("-inf")]}))


# JsonCodec uses orjson where it answers as the standard library does, and the
# standard library elsewhere: what goes over the wire is the same either way.
def _values(floats: st.SearchStrategy[float]) -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()  # past 64 bits too
        | floats
        | st.text(max_size=8)
        | st.sampled_from(["\ud800", "\u2028", "null", "12345678901234567890", "\x00"])
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.text(max_size=4), inner, max_size=4)
            | st.dictionaries(st.integers(-5, 5), inner, max_size=2)  # keys become strings
        ),
        max_leaves=12,
    )


def _canonical(value: Any) -> str:
    # Tells 1 from 1.0 and -0.0 from 0.0, which == does not.
    return json.dumps(value, allow_nan=True)


@given(value=_values(st.floats()))  # NaN and the infinities too
def test_json_encodes_as_the_standard_library_does(value: Any) -> None:
    try:
        standard = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        expected = json.loads(standard.encode())
    except (TypeError, ValueError) as exc:
        with pytest.raises(type(exc)):
            JsonCodec().dumps(value)
        return
    assert _canonical(json.loads(JsonCodec().dumps(value))) == _canonical(expected)


@given(value=_values(st.floats(allow_nan=False, allow_infinity=False)), ascii_only=st.booleans())
def test_json_decodes_as_the_standard_library_does(value: Any, ascii_only: bool) -> None:
    payload = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    try:
        expected = json.loads(payload.decode("utf-8"))
    except ValueError:  # a lone surrogate written raw is not UTF-8
        with pytest.raises(ProtocolError) as info:
            JsonCodec().loads(payload)
        assert info.value.code == 1007
        return
    assert _canonical(JsonCodec().loads(payload)) == _canonical(expected)


@pytest.mark.parametrize(
    ("payload", "value"),
    [
        (b"[18446744073709551616, -9223372036854775809]", [2**64, -(2**63) - 1]),
        (b'{"n": 123456789012345678901234567890}', {"n": 123456789012345678901234567890}),
        (b"[18446744073709551615, 1e16, 0.1]", [2**64 - 1, 1e16, 0.1]),
        (b'"\\ud800"', "\ud800"),  # a lone surrogate escape, as Python decodes it
    ],
)
def test_json_decodes_long_integers_exactly(payload: bytes, value: Any) -> None:
    assert _canonical(JsonCodec().loads(payload)) == _canonical(value)


@pytest.mark.parametrize("codec", CODECS, ids=["json", "msgpack"])
@given(
    head=st.dictionaries(st.text(max_size=3).map("h".__add__), json_data, max_size=20),
    fields=st.dictionaries(st.text(max_size=3).map("f".__add__), json_data, max_size=20),
)
def test_a_spliced_map_is_the_head_and_the_prepared_fields(
    codec: Any, head: dict[str, Any], fields: dict[str, Any]
) -> None:
    # Fan-out encodes a publication's fields once and each subscriber's head alone;
    # map headers change size at 16 pairs (msgpack), hence up to 20 on each side.
    spliced = codec.splice(head, codec.prepare(fields), len(fields))
    assert codec.loads(spliced) == {**head, **fields}


@pytest.mark.parametrize("size", [10, 5000, 100_000])
@pytest.mark.parametrize("codec", CODECS, ids=["json", "msgpack"])
def test_an_encoded_envelope_holds_no_more_memory_than_its_size(codec: Any, size: int) -> None:
    # A session's outbox keeps each envelope it sent until acknowledged: an encoder
    # that hands back its whole working buffer (orjson does) multiplies that memory.
    envelope = Msg(seq=1, data="y" * size)
    codec.encode(envelope)  # warm: whatever the encoder allocates once
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [codec.encode(envelope) for _ in range(50)]
        per_envelope = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    finally:
        tracemalloc.stop()
    assert per_envelope < len(kept[0]) + 200


class _Colour(enum.Enum):
    RED = "red"


class _Ids(enum.Enum):
    ONE = uuid.UUID("12345678-1234-5678-1234-567812345678")


class _Nested(enum.Enum):
    RED = _Colour.RED


@pytest.mark.parametrize("codec", CODECS, ids=["json", "msgpack"])
def test_enums_of_uuids_and_of_enums_travel_as_their_innermost_value(codec: Any) -> None:
    payload = codec.dumps({"id": _Ids.ONE, "colour": _Nested.RED})
    assert codec.loads(payload) == {"id": str(_Ids.ONE.value), "colour": "red"}


@pytest.mark.parametrize("codec", CODECS, ids=["json", "msgpack"])
def test_uuids_and_enum_members_travel_as_their_string_and_value(codec: Any) -> None:
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    payload = codec.dumps({"id": ident, "colour": _Colour.RED, "n": 2**40})
    assert codec.loads(payload) == {"id": str(ident), "colour": "red", "n": 2**40}
    with pytest.raises(TypeError):
        codec.dumps({"when": datetime.datetime(2026, 11, 24)})


@pytest.mark.parametrize("codec", CODECS, ids=["json", "msgpack"])
@given(batch=st.lists(envelopes, max_size=12), budget=st.integers(1, 400))
def test_pack_keeps_order_and_the_size_bound(
    codec: Any, batch: list[Envelope], budget: int
) -> None:
    """What the write loops send: every envelope once, in order, and no message over
    the budget unless it is one envelope that is larger on its own."""
    payloads = [codec.encode(e) for e in batch]
    messages = codec.pack(payloads, budget)
    assert [e for m in messages for e in codec.decode(m)] == batch
    for message in messages:
        assert len(message) <= budget or message in payloads
