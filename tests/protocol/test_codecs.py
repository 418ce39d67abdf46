"""The two encodings and envelope validation: round trips and every malformed case."""

from __future__ import annotations

import json
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
u64 = st.integers(min_value=0, max_value=2**64 - 1)
text = st.text(max_size=20)
json_data = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=10,
)
opt = st.none

envelopes = st.one_of(
    st.builds(Hello, token=opt() | text, resume=opt() | st.builds(Resume, text, text, u64)),
    st.builds(
        Welcome,
        session=text,
        resume_token=text,
        resumed=st.booleans(),
        ack=u64,
        heartbeat_interval=st.integers(0, 100),
        heartbeat_timeout=st.integers(0, 100),
        window=u64,
        max_message_size=u64,
        user=opt() | text,
    ),
    st.builds(
        Msg,
        seq=u64,
        event=opt() | text,
        topic=opt() | text,
        offset=opt() | u64,
        epoch=opt() | text,
        data=json_data,
        ack=opt() | u64,
    ),
    st.builds(Reply, seq=u64, re=u64, data=json_data, error=opt(), ack=opt() | u64),
    st.builds(Reply, seq=u64, re=u64, error=st.builds(ErrorInfo, text, text), ack=opt() | u64),
    st.builds(Sub, seq=u64, topic=text, since=opt() | st.builds(Since, u64, text), ack=opt() | u64),
    st.builds(Unsub, seq=u64, topic=text, ack=opt() | u64),
    st.builds(Pub, seq=u64, topic=text, data=json_data, ack=opt() | u64),
    st.builds(Ack, u64),
    st.builds(Ping, ts=opt() | u64),
    st.builds(Pong, ts=opt() | u64),
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
        {"type": "msg", "seq": 2**64},
        {"type": "msg", "seq": 1.5},
        {"type": "msg", "seq": True},
        {"type": "msg", "seq": "1"},
        {"type": "msg", "seq": 1, "event": 5},
        {"type": "msg", "seq": 1, "ack": -3},
        {"type": "ack"},
        {"type": "sub", "seq": 1},
        {"type": "sub", "seq": 1, "topic": "t", "since": {"offset": 1}},
        {"type": "sub", "seq": 1, "topic": "t", "since": 5},
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
