"""Topic names and publication fields (trio_wsgate.protocol.topics, docs/protocol.md §6)."""

from __future__ import annotations

import msgpack
import orjson
import pytest

from trio_wsgate.protocol.codecs import CODECS, JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL
from trio_wsgate.protocol.topics import (
    MAX_TOPIC_LENGTH,
    check_topic,
    prepare_data,
    user_topic,
)


@pytest.mark.parametrize("topic", ["a", "room:lobby", "é" * MAX_TOPIC_LENGTH, "user:ada", "a b"])
def test_topic_names_that_are_accepted(topic: str) -> None:
    assert check_topic(topic) == topic


@pytest.mark.parametrize(
    ("topic", "why"),
    [
        ("", "non-empty"),
        (None, "non-empty"),
        (7, "non-empty"),
        ("x" * (MAX_TOPIC_LENGTH + 1), "at most 256"),
        ("room:\x00", "control"),
        ("room:\x7f", "control"),
        ("a\nb", "control"),
        ("room:\ud800", "lone surrogate"),  # no broker nor encoding carries one
    ],
)
def test_topic_names_that_are_refused_say_why(topic: object, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_topic(topic)


def test_the_user_topic_of_a_user() -> None:
    assert user_topic("ada") == "user:ada"


def test_data_is_prepared_once_per_encoding_and_decodes_to_itself() -> None:
    prepared = prepare_data({"n": [1, 2.5, "é"]})
    assert set(prepared) == set(CODECS)
    json_fields, count = prepared[JSON_SUBPROTOCOL]
    assert count == 1
    # The fields close the envelope's map (Codec.prepare): the head opens it.
    assert orjson.loads(b"{" + json_fields) == {"data": {"n": [1, 2.5, "é"]}}
    packed, count = prepared[MSGPACK_SUBPROTOCOL]
    assert count == 1
    assert msgpack.unpackb(b"\x81" + packed) == {"data": {"n": [1, 2.5, "é"]}}
    assert prepare_data(None)[JSON_SUBPROTOCOL][1] == 0  # no data field at all


def nested(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("data", [2**53, float("nan"), b"bytes", "\ud800", nested(40)])
def test_data_outside_the_value_domain_is_refused(data: object) -> None:
    with pytest.raises(ValueError, match="encodable as JSON and as msgpack"):
        prepare_data(data)
