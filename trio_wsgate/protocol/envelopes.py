"""Envelope types of docs/protocol.md §2 and their validation.

Theory of operation: a codec turns bytes into plain Python values (dicts, lists,
str, int); :func:`parse_envelope` turns one such dict into a typed envelope or
raises :class:`~trio_wsgate.exceptions.ProtocolError` with close code 1002.
:meth:`Envelope.to_wire` goes the other way. Unknown fields are ignored
(docs/protocol.md §2); unknown types are a protocol error. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from ..exceptions import ProtocolError
from .closecodes import CloseCode

__all__ = [
    "SEQUENCED_TYPES",
    "Ack",
    "Bye",
    "Delivery",
    "Envelope",
    "ErrorInfo",
    "Hello",
    "Msg",
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
    "reply_wire",
]

# Every integer of the protocol is a JavaScript safe integer (protocol/values.py).
_MAX_INT = 2**53 - 1


def _fail(reason: str) -> ProtocolError:
    return ProtocolError(CloseCode.PROTOCOL_ERROR, reason)


def _int(obj: dict[str, Any], key: str, *, required: bool = True) -> int | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise _fail(f"{obj.get('type')}: missing integer field {key!r}")
        return None
    # bool is an int subclass in Python; true/false are not integers on the wire.
    if type(value) is not int or not 0 <= value <= _MAX_INT:
        raise _fail(f"{obj.get('type')}: field {key!r} must be an integer in [0, 2**53)")
    return value


def _str(obj: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise _fail(f"{obj.get('type')}: missing string field {key!r}")
        return None
    if not isinstance(value, str):
        raise _fail(f"{obj.get('type')}: field {key!r} must be a string")
    return value


def _map(obj: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _fail(f"{obj.get('type')}: field {key!r} must be a map")
    return value


def _put(wire: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        wire[key] = value


class Envelope:
    """Base of every envelope type."""

    __slots__ = ()
    type: ClassVar[str]
    sequenced: ClassVar[bool] = False

    def to_wire(self) -> dict[str, Any]:
        """Return the plain map sent on the wire (absent optional fields left out)."""
        raise NotImplementedError


class Sequenced(Envelope):
    """An envelope numbered by ``seq`` and acknowledged (docs/protocol.md §4)."""

    __slots__ = ()
    sequenced: ClassVar[bool] = True
    seq: int
    ack: int | None


@dataclass(slots=True)
class Resume:
    """The ``resume`` field of ``hello``."""

    session: str
    token: str
    ack: int


@dataclass(slots=True)
class Since:
    """The ``since`` field of ``sub``."""

    offset: int
    epoch: str


@dataclass(slots=True)
class ErrorInfo:
    """The ``error`` field of ``reply``."""

    code: str
    reason: str


@dataclass(slots=True)
class Hello(Envelope):
    type: ClassVar[str] = "hello"
    token: str | None = None
    resume: Resume | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"type": "hello"}
        _put(wire, "token", self.token)
        if self.resume is not None:
            r = self.resume
            wire["resume"] = {"session": r.session, "token": r.token, "ack": r.ack}
        return wire


@dataclass(slots=True)
class Welcome(Envelope):
    type: ClassVar[str] = "welcome"
    session: str
    resume_token: str
    resumed: bool
    ack: int
    heartbeat_interval: float
    heartbeat_timeout: float
    window: int
    max_message_size: int
    user: str | None = None
    #: On a new session of a user: where it began following ``user:<sub>``, as
    #: ``{"topic", "offset", "epoch"}`` (docs/protocol.md §2), so that a client can
    #: recover that topic after a later lost session without subscribing at start.
    user_topic: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "type": "welcome",
            "session": self.session,
            "resume_token": self.resume_token,
            "resumed": self.resumed,
            "ack": self.ack,
            "heartbeat": {"interval": self.heartbeat_interval, "timeout": self.heartbeat_timeout},
            "window": self.window,
            "max_message_size": self.max_message_size,
        }
        _put(wire, "user", self.user)
        _put(wire, "user_topic", self.user_topic)
        return wire


@dataclass(slots=True)
class Msg(Sequenced):
    type: ClassVar[str] = "msg"
    seq: int
    event: str | None = None
    topic: str | None = None
    offset: int | None = None
    epoch: str | None = None
    data: Any = None
    ack: int | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"type": "msg", "seq": self.seq}
        _put(wire, "event", self.event)
        _put(wire, "topic", self.topic)
        _put(wire, "offset", self.offset)
        _put(wire, "epoch", self.epoch)
        _put(wire, "data", self.data)
        _put(wire, "ack", self.ack)
        return wire


@dataclass(slots=True)
class Reply(Sequenced):
    type: ClassVar[str] = "reply"
    seq: int
    re: int
    data: Any = None
    error: ErrorInfo | None = None
    ack: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return reply_wire(self.seq, self.re, self.data, self.error, self.ack)


def reply_wire(
    seq: int, re: int, data: Any, error: ErrorInfo | None, ack: int | None
) -> dict[str, Any]:
    """:meth:`Reply.to_wire` without the :class:`Reply`: what a session's replies are
    encoded from (one per request: no object made only to be encoded)."""
    wire: dict[str, Any] = {"type": "reply", "seq": seq, "re": re}
    if error is not None:
        wire["error"] = {"code": error.code, "reason": error.reason}
    elif data is not None:
        wire["data"] = data
    if ack is not None:
        wire["ack"] = ack
    return wire


@dataclass(slots=True)
class Sub(Sequenced):
    type: ClassVar[str] = "sub"
    seq: int
    topic: str
    since: Since | None = None
    ack: int | None = None
    #: Only a topic the session follows already: a client's recovery of it
    #: (docs/protocol.md §14), which must not subscribe the session again.
    recover: bool | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"type": "sub", "seq": self.seq, "topic": self.topic}
        if self.since is not None:
            wire["since"] = {"offset": self.since.offset, "epoch": self.since.epoch}
        _put(wire, "ack", self.ack)
        if self.recover:
            wire["recover"] = True
        return wire


@dataclass(slots=True)
class Unsub(Sequenced):
    type: ClassVar[str] = "unsub"
    seq: int
    topic: str
    ack: int | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"type": "unsub", "seq": self.seq, "topic": self.topic}
        _put(wire, "ack", self.ack)
        return wire


@dataclass(slots=True)
class Pub(Sequenced):
    type: ClassVar[str] = "pub"
    seq: int
    topic: str
    data: Any = None
    ack: int | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"type": "pub", "seq": self.seq, "topic": self.topic}
        wire["data"] = self.data
        _put(wire, "ack", self.ack)
        return wire


@dataclass(slots=True)
class Delivery(Envelope):
    """A publication delivered to a subscriber in protocol version 2 (S→C ``pub``).

    Not sequenced: carried by its topic's ``offset`` and ``epoch`` alone, never
    acknowledged nor kept for a resume (docs/protocol.md, "Version 2").
    """

    type: ClassVar[str] = "pub"
    topic: str
    offset: int
    epoch: str
    data: Any = None
    event: str | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"type": "pub", "topic": self.topic}
        wire["offset"], wire["epoch"] = self.offset, self.epoch
        _put(wire, "event", self.event)
        wire["data"] = self.data
        return wire


@dataclass(slots=True)
class Ack(Envelope):
    type: ClassVar[str] = "ack"
    ack: int

    def to_wire(self) -> dict[str, Any]:
        return {"type": "ack", "ack": self.ack}


@dataclass(slots=True)
class Ping(Envelope):
    type: ClassVar[str] = "ping"
    ts: Any = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"type": "ping"}
        _put(wire, "ts", self.ts)
        return wire


@dataclass(slots=True)
class Pong(Envelope):
    type: ClassVar[str] = "pong"
    ts: Any = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"type": "pong"}
        _put(wire, "ts", self.ts)
        return wire


@dataclass(slots=True)
class Refresh(Envelope):
    type: ClassVar[str] = "refresh"
    token: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": "refresh", "token": self.token}


@dataclass(slots=True)
class Bye(Envelope):
    type: ClassVar[str] = "bye"

    def to_wire(self) -> dict[str, Any]:
        return {"type": "bye"}


# -- parsing ---------------------------------------------------------------------


def _hello(o: dict[str, Any]) -> Hello:
    resume = _map(o, "resume")
    parsed: Resume | None = None
    if resume is not None:
        resume.setdefault("type", "hello.resume")
        session, token = _str(resume, "session"), _str(resume, "token")
        ack = _int(resume, "ack")
        assert session is not None
        assert token is not None
        assert ack is not None
        parsed = Resume(session, token, ack)
    return Hello(token=_str(o, "token", required=False), resume=parsed)


def _welcome(o: dict[str, Any]) -> Welcome:
    hb = _map(o, "heartbeat") or {}
    interval, timeout = hb.get("interval"), hb.get("timeout")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (interval, timeout)):
        raise _fail("welcome: heartbeat needs numeric interval and timeout")
    resumed = o.get("resumed")
    if not isinstance(resumed, bool):
        raise _fail("welcome: field 'resumed' must be a boolean")
    return Welcome(
        session=_str(o, "session"),  # type: ignore[arg-type]
        resume_token=_str(o, "resume_token"),  # type: ignore[arg-type]
        resumed=resumed,
        ack=_int(o, "ack"),  # type: ignore[arg-type]
        heartbeat_interval=interval,  # type: ignore[arg-type]
        heartbeat_timeout=timeout,  # type: ignore[arg-type]
        window=_int(o, "window"),  # type: ignore[arg-type]
        max_message_size=_int(o, "max_message_size"),  # type: ignore[arg-type]
        user=_str(o, "user", required=False),
        user_topic=_map(o, "user_topic"),
    )


def _msg(o: dict[str, Any]) -> Msg:
    return Msg(
        seq=_int(o, "seq"),  # type: ignore[arg-type]
        event=_str(o, "event", required=False),
        topic=_str(o, "topic", required=False),
        offset=_int(o, "offset", required=False),
        epoch=_str(o, "epoch", required=False),
        data=o.get("data"),
        ack=_int(o, "ack", required=False),
    )


def _reply(o: dict[str, Any]) -> Reply:
    error = _map(o, "error")
    info: ErrorInfo | None = None
    if error is not None:
        error.setdefault("type", "reply.error")
        info = ErrorInfo(_str(error, "code"), _str(error, "reason", required=False) or "")  # type: ignore[arg-type]
    return Reply(
        seq=_int(o, "seq"),  # type: ignore[arg-type]
        re=_int(o, "re"),  # type: ignore[arg-type]
        data=o.get("data"),
        error=info,
        ack=_int(o, "ack", required=False),
    )


def _sub(o: dict[str, Any]) -> Sub:
    since = _map(o, "since")
    parsed: Since | None = None
    if since is not None:
        since.setdefault("type", "sub.since")
        parsed = Since(_int(since, "offset"), _str(since, "epoch"))  # type: ignore[arg-type]
    # Version 2 (docs/protocol.md §14); version 1 ignores the value. Not a boolean is
    # 1002 in both, as any field of the wrong type: taken as false, it would subscribe
    # again a topic the application unsubscribed the session from.
    recover = o.get("recover")
    if recover is not None and not isinstance(recover, bool):
        raise _fail("sub: field 'recover' must be a boolean")
    return Sub(
        seq=_int(o, "seq"),  # type: ignore[arg-type]
        topic=_str(o, "topic"),  # type: ignore[arg-type]
        since=parsed,
        ack=_int(o, "ack", required=False),
        recover=recover or None,
    )


def _unsub(o: dict[str, Any]) -> Unsub:
    return Unsub(
        seq=_int(o, "seq"),  # type: ignore[arg-type]
        topic=_str(o, "topic"),  # type: ignore[arg-type]
        ack=_int(o, "ack", required=False),
    )


def _pub(o: dict[str, Any]) -> Pub | Delivery:
    if "data" not in o:
        raise _fail("pub: missing field 'data'")
    if "seq" not in o and ("offset" in o or "epoch" in o):  # a server's delivery (v2)
        return Delivery(
            topic=_str(o, "topic"),  # type: ignore[arg-type]
            offset=_int(o, "offset"),  # type: ignore[arg-type]
            epoch=_str(o, "epoch"),  # type: ignore[arg-type]
            data=o["data"],
            event=_str(o, "event", required=False),
        )
    return Pub(
        seq=_int(o, "seq"),  # type: ignore[arg-type]
        topic=_str(o, "topic"),  # type: ignore[arg-type]
        data=o["data"],
        ack=_int(o, "ack", required=False),
    )


_PARSERS: dict[str, Callable[[dict[str, Any]], Envelope]] = {
    "hello": _hello,
    "welcome": _welcome,
    "msg": _msg,
    "reply": _reply,
    "sub": _sub,
    "unsub": _unsub,
    "pub": _pub,
    "ack": lambda o: Ack(_int(o, "ack")),  # type: ignore[arg-type]
    "ping": lambda o: Ping(o.get("ts")),
    "pong": lambda o: Pong(o.get("ts")),
    "refresh": lambda o: Refresh(_str(o, "token")),  # type: ignore[arg-type]
    "bye": lambda o: Bye(),
}

SEQUENCED_TYPES = frozenset({"msg", "reply", "sub", "unsub", "pub"})


def parse_envelope(obj: object) -> Envelope:
    """Validate one decoded envelope and return its typed form.

    Raises:
        ProtocolError: with close code 1002 when ``obj`` is not a valid envelope.
    """
    if not isinstance(obj, dict):
        raise _fail("an envelope must be a map")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise _fail("an envelope needs a string field 'type'")
    parser = _PARSERS.get(kind)
    if parser is None:
        raise _fail(f"unknown envelope type {kind[:40]!r}")
    return parser(obj)
