"""Topic names and publication fields (docs/protocol.md §6): rules every layer shares.

The connection checks a client's ``sub``, the hub a publication, the server and the
authenticator a user id that must name a user topic; the rules live here, once.
"""

from __future__ import annotations

from typing import Any

from .codecs import CODECS, Codec, shared_codec
from .values import MAX_DEPTH, check_value

__all__ = [
    "MAX_TOPIC_LENGTH",
    "USER_TOPIC_PREFIX",
    "check_topic",
    "encode_fields",
    "prepare_data",
    "user_topic",
]

#: Each user's sessions follow the topic ``user:<sub>`` (docs/protocol.md §6.6).
USER_TOPIC_PREFIX = "user:"
#: Longest topic name accepted, in characters.
MAX_TOPIC_LENGTH = 256


def check_topic(topic: Any) -> str:
    """Return ``topic`` if it is a valid topic name, else raise ValueError with why."""
    if not isinstance(topic, str) or not topic:
        raise ValueError("a topic is a non-empty string")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise ValueError(f"a topic has at most {MAX_TOPIC_LENGTH} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in topic):
        raise ValueError("a topic has no control characters")
    if not topic.isascii():
        try:
            topic.encode()
        except UnicodeEncodeError:  # a lone surrogate: no broker nor encoding can carry it
            raise ValueError("a topic is valid Unicode (no lone surrogate)") from None
    return topic


def user_topic(user: str) -> str:
    """The topic every session of ``user`` follows."""
    return USER_TOPIC_PREFIX + user


def encode_fields(codec: Codec, data: Any) -> tuple[bytes, int]:
    """A publication's fields beyond its head, encoded by ``codec`` (:meth:`Codec.prepare`),
    and how many there are."""
    fields = {} if data is None else {"data": data}
    return codec.prepare(fields), len(fields)


def prepare_data(data: Any) -> dict[str, tuple[bytes, int]]:
    """Encode a publication's data once per encoding (both, so every subscriber can get it).

    Raises:
        ValueError: the data is outside the value domain (protocol/values.py): one of
            the encodings, or a browser, could not carry it.
    """
    try:
        check_value(data, MAX_DEPTH - 1)
        return {name: encode_fields(shared_codec(name), data) for name in CODECS}
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"data must be encodable as JSON and as msgpack: {exc}") from None
