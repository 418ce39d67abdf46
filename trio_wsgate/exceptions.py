"""Errors raised by trio-wsgate.

Every error the package raises on purpose derives from one root::

    WsgateError
    ├── ProtocolError          a peer broke docs/protocol.md; carries its close code
    ├── HandlerError           an error reply: raised by handlers, and by the client's
    │                          request() when the answer is one
    ├── Unauthorized           a bad or expired token (HTTP 401 or close 4001)
    ├── ClientClosed           the client has stopped for good (see trio_wsgate.client)
    ├── SessionLost            the server dropped the client's session: a request's
    │                          outcome is unknown
    ├── BrokerUnavailable      the broker (Redis) could not be reached: nothing was
    │                          published or subscribed
    └── SessionClosed          the session ended; nothing more can be sent on it
        └── SlowConsumer       ... because its queue overflowed (close 4004)

"We closed it" and "the peer broke it" are told apart by :attr:`SessionClosed.code`
and :attr:`SessionClosed.reason`, the close code and reason label recorded when the
connection ended.

Four exceptions do not derive from it, because they never reach an application: each
is caught and turned into something above inside the package.
``transports.base.TransportBroken`` (a transport tells its connection that the peer
broke the wire: a close reason), ``transports.websockets.HandshakeRefused`` (the
client's handshake got plain HTTP: a reconnection, or :class:`ClientClosed`),
``admin.ApiError`` (an HTTP error answer of the server API), and the raw test client's
``testing.client.Closed`` and ``Refused`` (what a test asserts on, not raised by the
package to anyone else).
"""

from __future__ import annotations

__all__ = [
    "BrokerUnavailable",
    "ClientClosed",
    "HandlerError",
    "ProtocolError",
    "SessionClosed",
    "SessionLost",
    "SlowConsumer",
    "Unauthorized",
    "WsgateError",
]


class WsgateError(Exception):
    """The root of every error that trio-wsgate raises on purpose."""


class ProtocolError(WsgateError):
    """A peer sent something docs/protocol.md does not allow.

    Like wsproto's ``ParseFailed``, it carries the WebSocket close code that the
    connection must be closed with (docs/protocol.md §8).

    Args:
        code: the close code, e.g. 1002, 1003, 1007 or 1009.
        reason: a short human-readable text, sent as the close reason.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{reason} (close {code})")
        self.code = code
        self.reason = reason


class HandlerError(WsgateError):
    """Raise from a handler to answer with an error reply instead of data.

    The client receives ``{"type": "reply", "error": {"code": code, "reason": reason}}``.
    Any other exception from a handler becomes the error code ``"internal"``.

    Args:
        code: a short machine-readable code, e.g. ``"not_found"``.
        reason: a human-readable explanation.
    """

    def __init__(self, code: str, reason: str = "") -> None:
        super().__init__(f"{code}: {reason}" if reason else code)
        self.code = code
        self.reason = reason


class Unauthorized(WsgateError):
    """A token was missing, malformed, badly signed or expired (docs/protocol.md §3).

    Raised by an authenticator; the connection is refused with HTTP 401 or closed
    with 4001. The message must not contain the token.
    """


class ClientClosed(WsgateError):
    """The client stopped for good: closed by the application, by a close code that
    does not reconnect (docs/protocol.md §8), or after its last reconnection attempt.

    Args:
        code: the last close code received (1006 if none).
        reason: the close reason text, or what went wrong.
    """

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"client closed (code {code}): {reason}")
        self.code = code
        self.reason = reason


class SessionLost(WsgateError):
    """The server no longer held the session: this request's outcome is unknown.

    The client carries on with a new session (``resumed: false``); a request that was
    written but not acknowledged may or may not have run.
    """


class BrokerUnavailable(WsgateError):
    """The broker could not be reached: the operation did not happen.

    A publication refused this way was not delivered to anyone; the caller may retry.
    Clients get the error code ``unavailable``; the server API answers 503.
    """


class SessionClosed(WsgateError):
    """The session has ended; :meth:`Session.send` cannot queue anything more.

    Args:
        code: the WebSocket close code the connection ended with.
        reason: the classified reason (``"clean"``, ``"reset"``, ``"heartbeat_timeout"``...).
    """

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"session closed (code {code}, reason {reason})")
        self.code = code
        self.reason = reason


class SlowConsumer(SessionClosed):
    """The session overflowed ``max_buffered`` while it had no live connection (4004)."""
