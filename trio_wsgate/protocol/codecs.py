"""The encodings of docs/protocol.md §1: JSON and msgpack, in protocol versions 1 and 2.

A codec turns one WebSocket message into a list of envelopes (one message may carry a
single envelope or a batch, an array handled in order) and turns envelopes into
message payloads. Decoding failures map to close codes: invalid UTF-8, JSON or
msgpack, and a value outside the one value domain (:mod:`.values`), is 1007; a value
of the wrong shape is 1002 (from :func:`parse_envelope`).
Nothing here does I/O.
"""

from __future__ import annotations

import enum
import json
import threading
import uuid
from typing import Any, ClassVar

import msgpack
import orjson

from ..exceptions import ProtocolError
from .closecodes import CloseCode
from .envelopes import Envelope, Msg, parse_envelope
from .values import MAX_SAFE_INTEGER, value_error, weigh, weigh_request

__all__ = [
    "CODECS",
    "JSON_SUBPROTOCOL",
    "JSON_V2_SUBPROTOCOL",
    "MSGPACK_SUBPROTOCOL",
    "MSGPACK_V2_SUBPROTOCOL",
    "SUBPROTOCOLS",
    "Codec",
    "JsonCodec",
    "JsonCodecV2",
    "MsgpackCodec",
    "MsgpackCodecV2",
    "shared_codec",
]

JSON_SUBPROTOCOL = "wsgate.v1.json"
MSGPACK_SUBPROTOCOL = "wsgate.v1.msgpack"
# Version 2 (docs/protocol.md, "Version"): the same encodings; publications travel as
# unsequenced ``pub`` envelopes.
JSON_V2_SUBPROTOCOL = "wsgate.v2.json"
MSGPACK_V2_SUBPROTOCOL = "wsgate.v2.msgpack"


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are Python extensions, not JSON (RFC 8259 §6).
    raise ValueError(f"{name} is not valid JSON")


def _extended(value: Any) -> Any:
    """What both encodings send for the types beyond JSON's that they accept.

    A UUID is sent as its string and an enum member as its value, in JSON as in
    msgpack (orjson sends them so, and a value must mean the same in both encodings);
    any other type cannot be encoded.
    """
    if isinstance(value, enum.Enum):
        while isinstance(value, enum.Enum):  # an enum of enums: the innermost value
            value = value.value
        return str(value) if isinstance(value, uuid.UUID) else value
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# orjson encodes and decodes JSON several times faster than the standard library
# (docs/benchmarks.md, "Optimisation log"); the standard library takes over wherever
# orjson would answer differently, so the wire contract is the same either way:
# - orjson refuses what it cannot encode exactly (integers past 64 bits, map keys
#   that are not strings, subclasses of str/int/list/dict, datetimes, dataclasses);
#   the standard library then encodes it, or says why it cannot;
# - orjson writes NaN and Infinity as null; the standard library refuses them;
# - orjson decodes integers past 64 bits as floats: a payload with a run of 19 or
#   more digits is decoded by the standard library, exactly;
# - what orjson will not decode (a lone surrogate escape, 1e400...), the standard
#   library decodes or says why not.
#
# orjson's result keeps the whole buffer orjson wrote it in: 4 KiB for a ping, 64 KiB
# for an envelope of 5 KB, for as long as it lives (a session's outbox keeps what it
# sends until acknowledged). It writes a newline at the end, and slicing it off copies
# the envelope into bytes of its own size, for a thirtieth of what the standard
# library takes to encode it.
_ORJSON_OPTIONS = (
    orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_APPEND_NEWLINE
)
# Every digit as a 0, to find a run of 19 digits with one search (a regular expression
# takes five times as long as this on an envelope).
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_NUMBER = b"0" * 19


def _weighed(value: Any) -> int:
    # Everything a client sends is inside the one value domain, so that it can be kept,
    # re-encoded and delivered anywhere (protocol/values.py); the rest is 1007.
    weight = weigh(value)
    if weight < 0:
        raise ProtocolError(CloseCode.INVALID_DATA, value_error(value) or "invalid value")
    return weight


# The fields of what clients send most, a msg to a handler (docs/protocol.md §2).
_HANDLER_MSG = frozenset(("type", "seq", "ack", "event", "data"))


def _request(value: Any) -> tuple[Msg, int] | None:
    """``value`` checked and weighed at once if it is what clients send most: a msg with
    only the fields of a request to a handler, each of the usual type (the same
    envelope and weight as :func:`_decoded`'s general way); else None."""
    if type(value) is dict and value.get("type") == "msg" and value.keys() <= _HANDLER_MSG:
        seq, ack, event = value.get("seq"), value.get("ack"), value.get("event")
        if (
            type(seq) is int
            and 0 <= seq <= MAX_SAFE_INTEGER
            and (ack is None or (type(ack) is int and 0 <= ack <= MAX_SAFE_INTEGER))
            and (event is None or (type(event) is str and event.isascii()))
        ):
            data = value.get("data")
            weight = weigh_request(value, ack, event, data)
            if weight >= 0:
                return Msg(seq, event, None, None, None, data, ack), weight
    return None


def _decoded(value: Any) -> tuple[Envelope, int]:
    """One decoded envelope, checked (:func:`parse_envelope`), and what it weighs
    (:func:`weigh`): a request at once (:func:`_request`); anything else, valid or not,
    the general way, which says what is wrong with it."""
    request = _request(value)
    if request is not None:
        return request
    weight = _weighed(value)
    return parse_envelope(value), weight


class Codec:
    """One wire encoding. Subclasses set :attr:`subprotocol` and :attr:`binary`."""

    subprotocol: ClassVar[str]
    #: True when messages travel in binary frames, False for text frames.
    binary: ClassVar[bool]
    #: The protocol version the subprotocol speaks (docs/protocol.md, "Version").
    version: ClassVar[int] = 1
    #: The version-1 subprotocol of the same encoding: what a publication's shared
    #: fields are encoded under, once for both versions (``Publication.encoded``).
    encoding: ClassVar[str]

    def loads(self, payload: bytes) -> Any:
        """Decode one message payload into plain values; raise ProtocolError(1007)."""
        raise NotImplementedError

    def dumps(self, value: Any) -> bytes:
        """Encode one plain value; raises TypeError or ValueError if it can't be encoded."""
        raise NotImplementedError

    def batch(self, parts: list[bytes]) -> bytes:
        """Join already-encoded envelopes into one array message, without re-encoding."""
        raise NotImplementedError

    def pack(self, payloads: list[bytes], budget: int) -> list[bytes]:
        """Group encoded envelopes, in order, into as few messages as fit ``budget`` bytes.

        A run that fits becomes one batch; an envelope larger than ``budget`` goes alone.
        """
        messages: list[bytes] = []
        index, count = 0, len(payloads)
        while index < count:
            first = payloads[index]
            end, size = index + 1, len(first) + 2  # the batch's own framing, roughly
            while end < count and size + len(payloads[end]) + 1 <= budget:
                size += len(payloads[end]) + 1
                end += 1
            messages.append(first if end == index + 1 else self.batch(payloads[index:end]))
            index = end
        return messages

    def prepare(self, fields: dict[str, Any]) -> bytes:
        """Encode the part of a map that many envelopes share, once.

        Fan-out (docs/protocol.md §6) sends one publication to many sessions; only its
        ``seq`` and ``ack`` differ. The shared fields are encoded here once per
        encoding and :meth:`splice` adds each session's own head without re-encoding.
        Raises TypeError or ValueError if a value cannot be encoded.
        """
        raise NotImplementedError

    def splice(self, head: dict[str, Any], prepared: bytes, count: int) -> bytes:
        """One map: ``head`` encoded now, then ``count`` fields :meth:`prepare` encoded."""
        raise NotImplementedError

    def decode(self, payload: bytes) -> list[Envelope]:
        """Decode one WebSocket message into its envelopes, in order.

        Raises:
            ProtocolError: 1007 for an undecodable payload, 1002 for a bad envelope.
        """
        return self.decode_weighed(payload)[0]

    def decode_weighed(self, payload: bytes) -> tuple[list[Envelope], int]:
        """:meth:`decode`, and the bytes the decoded values hold in this process
        (roughly: :func:`~.values.weigh`), for the bounds on what waits to be processed.
        """
        return self._weighed_envelopes(self.loads(payload))

    def _weighed_envelopes(self, value: Any) -> tuple[list[Envelope], int]:
        if isinstance(value, list):
            weight = len(value) * 16
            envelopes = []
            for item in value:
                envelope, item_weight = _decoded(item)
                weight += item_weight
                envelopes.append(envelope)
            return envelopes, weight
        envelope, weight = _decoded(value)
        return [envelope], weight

    def encode(self, envelope: Envelope) -> bytes:
        """Encode one envelope into a message payload."""
        return self.dumps(envelope.to_wire())


class JsonCodec(Codec):
    """UTF-8 JSON in text frames."""

    subprotocol = JSON_SUBPROTOCOL
    encoding = JSON_SUBPROTOCOL
    binary = False

    def __init__(self) -> None:
        self._decoder = json.JSONDecoder(parse_constant=_reject_constant)
        self._encoder = json.JSONEncoder(
            separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_extended
        )

    def decode_weighed(self, payload: bytes) -> tuple[list[Envelope], int]:
        # A request whose data is a string or null holds no number orjson could have
        # made a float of (its other fields are checked to be integers and strings):
        # it needs no look for long numbers first (loads).
        try:
            value = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return self._weighed_envelopes(self._exactly(payload))
        if type(value) is dict:
            data = value.get("data")
            if data is None or type(data) is str:
                request = _request(value)
                if request is not None:
                    return [request[0]], request[1]
        if _LONG_NUMBER in payload.translate(_DIGITS_AS_ZERO):
            value = self._exactly(payload)
        return self._weighed_envelopes(value)

    def loads(self, payload: bytes) -> Any:
        if _LONG_NUMBER not in payload.translate(_DIGITS_AS_ZERO):
            try:
                return orjson.loads(payload)
            except orjson.JSONDecodeError:
                pass  # the standard library decodes it, or says why not
        return self._exactly(payload)

    def _exactly(self, payload: bytes) -> Any:
        """Decode by the standard library: long numbers exactly; or say why not."""
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(CloseCode.INVALID_DATA, "payload is not valid UTF-8") from exc
        try:
            return self._decoder.decode(text)
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(CloseCode.INVALID_DATA, "payload is not valid JSON") from exc

    def dumps(self, value: Any) -> bytes:
        try:
            encoded = orjson.dumps(value, default=_extended, option=_ORJSON_OPTIONS)
        except orjson.JSONEncodeError:
            pass  # the standard library encodes it, or says why not
        else:
            if b"null" not in encoded:  # else it may be a NaN or an Infinity
                return encoded[:-1]  # without the newline, in bytes of its own size
        return self._encoder.encode(value).encode("utf-8")

    def batch(self, parts: list[bytes]) -> bytes:
        return b"[" + b",".join(parts) + b"]"

    def prepare(self, fields: dict[str, Any]) -> bytes:
        if not fields:
            return b"}"
        return self.dumps(fields)[1:]  # '"k":v,...}' without the opening brace

    def splice(self, head: dict[str, Any], prepared: bytes, count: int) -> bytes:
        opened = self.dumps(head)[:-1]  # '{"k":v,...' without the closing brace
        if not count:
            return opened + prepared
        return opened + (b"," if head else b"") + prepared


class MsgpackCodec(Codec):
    """msgpack in binary frames, decoded defensively.

    Map keys must be strings (``strict_map_key``), extension types, including the
    timestamp extension, are refused (``max_ext_len=0``), and msgpack's own length
    limits are bounded by the payload size, which the WebSocket layer already caps
    at ``max_message_size``.
    """

    subprotocol = MSGPACK_SUBPROTOCOL
    encoding = MSGPACK_SUBPROTOCOL
    binary = True

    def loads(self, payload: bytes) -> Any:
        try:
            return msgpack.unpackb(
                payload, raw=False, strict_map_key=True, max_ext_len=0, use_list=True
            )
        except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
            # ValueError covers ExtraData, FormatError, StackError, bad UTF-8 in
            # strings and the ext limit; TypeError covers non-string map keys.
            raise ProtocolError(CloseCode.INVALID_DATA, "payload is not valid msgpack") from exc

    def dumps(self, value: Any) -> bytes:
        result: bytes = _packers.packer.pack(value)
        return result

    def batch(self, parts: list[bytes]) -> bytes:
        header: bytes = _packers.packer.pack_array_header(len(parts))
        return header + b"".join(parts)

    def prepare(self, fields: dict[str, Any]) -> bytes:
        return self.dumps(fields)[_map_header_size(len(fields)) :]  # the pairs alone

    def splice(self, head: dict[str, Any], prepared: bytes, count: int) -> bytes:
        packer = _packers.packer
        header: bytes = packer.pack_map_header(len(head) + count)
        pairs: bytes = packer.pack(head)[_map_header_size(len(head)) :]
        return header + pairs + prepared


def _map_header_size(length: int) -> int:
    """Bytes of msgpack's header for a map of ``length`` pairs (fixmap, map 16, map 32)."""
    return 1 if length < 16 else 3 if length < 0x10000 else 5


class _Packers(threading.local):
    # A Packer made once is three times as fast per call as packb, which makes one per
    # call. Its buffer is its own state, and ``default`` is Python code, during which
    # another thread may run: one per thread.
    def __init__(self) -> None:
        self.packer = msgpack.Packer(use_bin_type=True, default=_extended)


_packers = _Packers()


class JsonCodecV2(JsonCodec):
    """JSON, protocol version 2."""

    subprotocol = JSON_V2_SUBPROTOCOL
    version = 2


class MsgpackCodecV2(MsgpackCodec):
    """msgpack, protocol version 2."""

    subprotocol = MSGPACK_V2_SUBPROTOCOL
    version = 2


#: The encodings, by their version-1 subprotocol name (:attr:`Codec.encoding`): a
#: publication's data is encoded once in each, for both versions.
CODECS: dict[str, type[Codec]] = {
    JSON_SUBPROTOCOL: JsonCodec,
    MSGPACK_SUBPROTOCOL: MsgpackCodec,
}
#: Every subprotocol the server speaks, with its codec.
SUBPROTOCOLS: dict[str, type[Codec]] = {
    **CODECS,
    JSON_V2_SUBPROTOCOL: JsonCodecV2,
    MSGPACK_V2_SUBPROTOCOL: MsgpackCodecV2,
}

_SHARED: dict[str, Codec] = {name: codec() for name, codec in SUBPROTOCOLS.items()}


def shared_codec(subprotocol: str) -> Codec:
    """The one instance of a subprotocol's codec that a process shares.

    Codecs keep no state between calls, so every connection and publication of a node
    uses the same one (a JSON codec's decoder and encoder are about 0.8 KiB, per
    connection otherwise: docs/benchmarks.md, "Idle").
    """
    return _SHARED[subprotocol]
