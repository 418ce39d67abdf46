"""Close codes of docs/protocol.md §8 and the reasons a connection ends."""

from __future__ import annotations

import enum

__all__ = ["ENDS_SESSION", "CloseCode", "CloseReason", "ends_session", "reason_for"]


class CloseCode(enum.IntEnum):
    """WebSocket close codes used by the wsgate protocol (docs/protocol.md §8)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    ABNORMAL = 1006  # never sent: no close frame was received
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    UNAUTHORIZED = 4001
    HEARTBEAT_TIMEOUT = 4002
    HELLO_TIMEOUT = 4003
    SLOW_CONSUMER = 4004
    KICKED = 4005
    TAKEN_OVER = 4006
    RATE_LIMITED = 4009


class CloseReason(enum.StrEnum):
    """Why a connection ended: the ``reason`` label of ``wsgate_closes_total``.

    Every end of a connection is counted under exactly one of these
    (docs/architecture.md, "Close classification").
    """

    CLEAN = "clean"  # the peer sent a close frame; the code says which
    BYE = "bye"  # the client ended its session with `bye`
    RESET = "reset"  # ECONNRESET
    TIMEOUT = "timeout"  # ETIMEDOUT (TCP keepalive gave up)
    BROKEN_PIPE = "broken_pipe"  # EPIPE while writing
    EOF = "eof"  # the peer closed TCP without a close frame
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    HELLO_TIMEOUT = "hello_timeout"
    PROTOCOL_ERROR = "protocol_error"  # 1002, 1003, 1007, 1009
    POLICY = "policy"
    UNAUTHORIZED = "unauthorized"  # 4001
    SLOW_CONSUMER = "slow_consumer"
    KICK = "kick"
    DRAIN = "drain"
    TAKE_OVER = "take_over"
    INTERNAL_ERROR = "internal_error"
    BROKER_UNAVAILABLE = "broker_unavailable"  # 1011: a resume the broker could not answer
    RATE_LIMIT = "rate_limit"  # 4009: the session is kept
    SERVER_CLOSE = "server_close"  # the application closed the session


# The one table of what each close code the server sends means for the session
# (docs/protocol.md §8): the reason it is counted under, and whether it ends the session.
_REASON_BY_CODE: dict[int, CloseReason] = {
    CloseCode.PROTOCOL_ERROR: CloseReason.PROTOCOL_ERROR,
    CloseCode.UNSUPPORTED_DATA: CloseReason.PROTOCOL_ERROR,
    CloseCode.INVALID_DATA: CloseReason.PROTOCOL_ERROR,
    CloseCode.MESSAGE_TOO_BIG: CloseReason.PROTOCOL_ERROR,
    CloseCode.POLICY_VIOLATION: CloseReason.POLICY,
    CloseCode.UNAUTHORIZED: CloseReason.UNAUTHORIZED,
    CloseCode.INTERNAL_ERROR: CloseReason.INTERNAL_ERROR,
    CloseCode.GOING_AWAY: CloseReason.DRAIN,
    CloseCode.SLOW_CONSUMER: CloseReason.SLOW_CONSUMER,
    CloseCode.KICKED: CloseReason.KICK,
    CloseCode.TAKEN_OVER: CloseReason.TAKE_OVER,
    CloseCode.RATE_LIMITED: CloseReason.RATE_LIMIT,
}

#: Connection ends after which nothing is kept to resume (docs/protocol.md §8).
ENDS_SESSION = frozenset(
    {
        CloseReason.BYE,
        CloseReason.KICK,
        CloseReason.UNAUTHORIZED,
        CloseReason.PROTOCOL_ERROR,
        CloseReason.POLICY,
    }
)


def reason_for(code: int, default: CloseReason = CloseReason.SERVER_CLOSE) -> CloseReason:
    """The reason a close with ``code`` that the server decided is counted under."""
    return _REASON_BY_CODE.get(code, default)


def ends_session(reason: CloseReason | None) -> bool:
    """True if a connection that ended this way ends its session (docs/protocol.md §8)."""
    return reason in ENDS_SESSION
