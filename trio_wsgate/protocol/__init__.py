"""The wire protocol (docs/protocol.md), free of I/O: envelopes, codecs and close codes.

This package never imports trio.
"""

from .closecodes import CloseCode, CloseReason
from .codecs import (
    CODECS,
    JSON_SUBPROTOCOL,
    MSGPACK_SUBPROTOCOL,
    Codec,
    JsonCodec,
    MsgpackCodec,
    shared_codec,
)
from .envelopes import (
    SEQUENCED_TYPES,
    Ack,
    Bye,
    Envelope,
    ErrorInfo,
    Hello,
    Msg,
    Ping,
    Pong,
    Pub,
    Refresh,
    Reply,
    Resume,
    Sequenced,
    Since,
    Sub,
    Unsub,
    Welcome,
    parse_envelope,
)

__all__ = [
    "CODECS",
    "JSON_SUBPROTOCOL",
    "MSGPACK_SUBPROTOCOL",
    "SEQUENCED_TYPES",
    "Ack",
    "Bye",
    "CloseCode",
    "CloseReason",
    "Codec",
    "Envelope",
    "ErrorInfo",
    "Hello",
    "JsonCodec",
    "Msg",
    "MsgpackCodec",
    "Ping",
    "Pong",
    "Pub",
    "Refresh",
    "Reply",
    "Resume",
    "Sequenced",
    "Since",
    "Sub",
    "Unsub",
    "Welcome",
    "parse_envelope",
    "shared_codec",
]
