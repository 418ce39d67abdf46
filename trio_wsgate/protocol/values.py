"""The one value domain of the protocol: what may travel in any message, either way.

Theory of operation. A value the server accepts is kept (a session's outbox, a topic's
history), re-encoded (a resume in the other encoding), moved (a hand-over, as msgpack)
and delivered to every subscriber of a topic, browsers included, whose numbers are
doubles. Each of those steps must succeed for every value that got in, so the domain
is decided once, here, and checked on the way in: by the codecs for everything a
client sends (a message outside it is 1007), and by the hub and the connection for
what the application sends (docs/protocol.md, "Values"). Inside it, both encoders
encode everything, and decoding gives the same value back.

The domain:

* ``null``, booleans, and integers in ``[-(2**53 - 1), 2**53 - 1]`` (JavaScript's safe
  integers: a browser reads every one of them exactly);
* finite floats (no NaN, no infinities: JSON has neither);
* strings of valid Unicode (no lone surrogates: UTF-8 cannot carry them), map keys
  included;
* arrays, and maps whose keys are strings, nested at most :data:`MAX_DEPTH` deep;
* no bytes (JSON has none; send base64 in a string).

Values of the application's own (a UUID, an enum member, a tuple) are accepted where the
encoders turn them into values of the domain (docs/protocol.md, "Numbers and values").
"""

from __future__ import annotations

import enum
import math
import uuid
from typing import Any

__all__ = [
    "MAX_DEPTH",
    "MAX_SAFE_INTEGER",
    "check_value",
    "value_error",
    "weigh",
    "weigh_request",
]

#: The largest integer a JavaScript number holds exactly (``Number.MAX_SAFE_INTEGER``).
MAX_SAFE_INTEGER = 2**53 - 1
#: How deep arrays and maps may nest in one envelope, the envelope's own map counted
#: as the first level (so ``data`` may nest 31 deep).
MAX_DEPTH = 32


def _text_ok(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_TOO_DEEP = f"arrays and maps nest more than {MAX_DEPTH} deep"
_BAD_TEXT = "a string is not valid Unicode (a lone surrogate)"
_BAD_INTEGER = "an integer is outside [-(2**53 - 1), 2**53 - 1]"


def value_error(value: Any, depth: int = MAX_DEPTH) -> str | None:
    """Why ``value`` is outside the domain, or None if it is inside.

    ``depth`` is how many levels of arrays and maps it may still open. The fast check
    is :func:`weigh`; this one says why, once something is refused.
    """
    kind = type(value)
    if kind is dict:
        if depth <= 0:
            return _TOO_DEEP
        for key, item in value.items():
            if not isinstance(key, str):
                return "a map key is not a string"
            if not _text_ok(key):
                return "a map key is not valid Unicode (a lone surrogate)"
            why = value_error(item, depth - 1)
            if why is not None:
                return why
        return None
    if kind is list or kind is tuple:
        if depth <= 0:
            return _TOO_DEEP
        for item in value:
            why = value_error(item, depth - 1)
            if why is not None:
                return why
        return None
    if kind is str:
        return None if _text_ok(value) else _BAD_TEXT
    if kind is int:
        return None if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER else _BAD_INTEGER
    if kind is float:
        return None if math.isfinite(value) else "a number is NaN or infinite"
    if value is None or kind is bool:
        return None
    if kind is bytes or kind is bytearray or kind is memoryview:
        return "bytes cannot travel in JSON (send them as a base64 string)"
    # The application's own types, as the encoders send them.
    if isinstance(value, uuid.UUID):
        return None
    if isinstance(value, enum.Enum):
        return value_error(value.value, depth)
    base: type[Any]
    for base in (int, float, str, dict, list, tuple):
        if isinstance(value, base):
            return value_error(base(value), depth)  # a subclass: as its base
    return f"a value of type {kind.__name__} cannot be encoded"


# What a decoded value holds in this process, roughly (CPython, 64 bits): a container
# and each of its slots, a string and its characters, any other scalar. A message's
# weight, not its size on the wire, is what the node counts while it waits to be
# processed: 64 KiB of msgpack's one-byte empty arrays decode to over 4 MB.
_CONTAINER, _SLOT, _TEXT, _SCALAR = 64, 16, 50, 32


def weigh(value: Any, depth: int = MAX_DEPTH) -> int:
    """The bytes ``value`` holds once decoded, roughly; -1 if it is outside the domain
    (then :func:`value_error` says why). One walk for both: every envelope a client
    sends, and every reply, goes through here, so the common items of a map or an
    array (strings, integers, null) are looked at inline, without a call each."""
    kind = type(value)
    if kind is dict:
        if depth <= 0:
            return -1
        total = _CONTAINER
        for key, item in value.items():
            if type(key) is not str:  # a str subclass of the application's, at most
                if not isinstance(key, str) or not _text_ok(key):
                    return -1
            elif not key.isascii() and not _text_ok(key):
                return -1
            total += _SLOT + _TEXT + len(key)
            kind = type(item)
            if kind is str:
                if item.isascii() or _text_ok(item):
                    total += _TEXT + len(item)
                    continue
                return -1
            if kind is int:
                if -MAX_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER:
                    total += _SCALAR
                    continue
                return -1
            if item is None or kind is bool:
                continue
            weight = weigh(item, depth - 1)
            if weight < 0:
                return -1
            total += weight
        return total
    if kind is list or kind is tuple:
        if depth <= 0:
            return -1
        total = _CONTAINER + _SLOT * len(value)
        for item in value:
            kind = type(item)
            if kind is int:
                if -MAX_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER:
                    total += _SCALAR
                    continue
                return -1
            if kind is str:
                if item.isascii() or _text_ok(item):
                    total += _TEXT + len(item)
                    continue
                return -1
            if item is None or kind is bool:
                continue
            weight = weigh(item, depth - 1)
            if weight < 0:
                return -1
            total += weight
        return total
    if kind is str:
        return _TEXT + len(value) if _text_ok(value) else -1
    if value is None or kind is bool:
        return 0
    if kind is int:
        return _SCALAR if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER else -1
    if kind is float:
        return _SCALAR if math.isfinite(value) else -1
    # Not what a decoder makes (the application's types): ask value_error.
    return -1 if value_error(value, depth) is not None else _SCALAR


def weigh_request(envelope: dict[str, Any], ack: Any, event: Any, data: Any) -> int:
    """:func:`weigh` of ``envelope``, a msg whose fields the caller has checked are
    among type ("msg"), seq, ack and event (integers of the domain, an ASCII string, or
    null: ``ack`` and ``event`` are their values) and data (``data``, any value):
    the same weight, with one look at each field instead of a walk; -1 if ``data``
    is outside the domain."""
    if type(data) is str and data.isascii():
        weight = _TEXT + len(data)
    else:
        weight = weigh(data, MAX_DEPTH - 1)
        if weight < 0:
            return -1
    # The map, a slot and a key per field; "type" and "msg", "seq" and its integer.
    weight += _CONTAINER + (_SLOT + _TEXT) * len(envelope) + 4 + _TEXT + 3 + 3 + _SCALAR
    if "ack" in envelope:
        weight += 3 if ack is None else 3 + _SCALAR
    if "event" in envelope:
        weight += 5 if event is None else 5 + _TEXT + len(event)
    if "data" in envelope:
        weight += 4
    return weight


def check_value(value: Any, depth: int = MAX_DEPTH) -> Any:
    """Return ``value`` if it is inside the domain; else raise ValueError saying why."""
    if weigh(value, depth) < 0:
        raise ValueError(value_error(value, depth) or "outside the value domain")
    return value
