"""A connection's token, on a node that verifies tokens (docs/protocol.md §3, §8).

:func:`authenticate` says who the client of a ``hello`` is. :class:`TokenWatch` then
closes the connection with 4001 at the token's ``exp`` (an entry in the node's timers),
unless a ``refresh`` renews it first. A refresh is checked by a short task of the
connection's nursery, with a cancel scope of its own that the decision to close
cancels; the latest refresh received decides, and cancels the check of an earlier
one (a client sending refreshes as fast as it can keeps one check in flight, not one
per refresh).
"""

from __future__ import annotations

from typing import Protocol

import trio

from .auth import Authenticator, identify, refusal_reason
from .exceptions import Unauthorized
from .identity import ANONYMOUS, Identity
from .protocol import CloseCode, CloseReason
from .session import Session
from .timers import Timer, Timers

__all__ = ["TokenWatch", "Watched", "authenticate"]


async def authenticate(
    authenticator: Authenticator | None, token: str | None, verified: Identity | None
) -> Identity:
    """Who the client is: from ``hello.token``, else from the token the handshake
    carried (``verified``); anonymous on a node without an authenticator, where
    ``hello.token`` means nothing.

    Raises:
        Unauthorized: the token is refused (the connection closes with 4001).
    """
    if authenticator is None:
        return ANONYMOUS
    if token is None and verified is not None:
        return verified
    return await identify(authenticator, token)


class Watched(Protocol):
    """What the token's watch needs of its connection."""

    @property
    def closing(self) -> bool:
        """True from the decision to close on."""
        ...

    @property
    def session(self) -> Session | None:
        """The connection's session, once ``welcome`` is queued."""
        ...

    def close(self, code: int, reason: str = "", label: CloseReason | None = None) -> None:
        """Decide to close; return at once."""
        ...

    def crashed(self) -> None:
        """An unexpected error: log it and close with 1011."""
        ...


class TokenWatch:
    """The expiry and the refreshes of one connection's token.

    Args:
        authenticator: the node's, which checks each ``refresh`` token.
        timers: the timers the expiry is an entry in.
        connection: the connection it closes.
    """

    __slots__ = (
        "_authenticator",
        "_connection",
        "_expiry",
        "_latest",
        "_next",
        "_scopes",
        "_timers",
    )

    def __init__(self, authenticator: Authenticator, timers: Timers, connection: Watched) -> None:
        self._authenticator = authenticator
        self._timers = timers
        self._connection = connection
        self._expiry: Timer | None = None
        self._latest = 0  # refresh envelopes received: the latest one decides
        self._scopes: set[trio.CancelScope] | None = None  # the checks in flight
        self._next: str | None = None  # the latest refresh's token, until a check takes it

    def expire_at(self, deadline: float | None) -> None:
        """Close with 4001 at ``deadline`` (trio time; None: never), unless renewed."""
        self._timers.cancel(self._expiry)
        self._expiry = None
        if deadline is not None and not self._connection.closing:
            self._expiry = self._timers.call_at(deadline, self._expired)

    def refresh(self, nursery: trio.Nursery, token: str) -> None:
        """A ``refresh`` came: check its token in a task of ``nursery``; a check of an
        earlier one no longer decides, and is cancelled."""
        self._latest += 1
        for scope in self._scopes or ():
            scope.cancel()
        if self._next is None:  # else a check is started already, and takes this one
            nursery.start_soon(self._check)
        self._next = token

    def stop(self) -> None:
        """The connection is closing: no expiry, and the checks in flight are cancelled."""
        self._timers.cancel(self._expiry)
        self._expiry = None
        for scope in self._scopes or ():
            scope.cancel()

    def _expired(self) -> None:
        self._expiry = None
        self._connection.close(CloseCode.UNAUTHORIZED, "unauthorized: token expired")

    async def _check(self) -> None:
        token, refresh, self._next = self._next, self._latest, None
        assert token is not None
        scopes = self._scopes
        if scopes is None:
            scopes = self._scopes = set()
        with trio.CancelScope() as scope:
            scopes.add(scope)
            if self._connection.closing:  # decided between start_soon and now
                scope.cancel()
            try:
                await self._verify(token, refresh)
            except Exception:
                self._connection.crashed()
            finally:
                scopes.discard(scope)

    async def _verify(self, token: str, refresh: int) -> None:
        """Check a ``refresh`` token; if it is still the latest, renew or close (§8)."""
        connection = self._connection
        session = connection.session
        assert session is not None
        try:
            identity = await identify(self._authenticator, token)
        except Unauthorized as exc:
            if refresh == self._latest:
                connection.close(CloseCode.UNAUTHORIZED, refusal_reason(exc))
            return
        if refresh != self._latest:
            return  # a later refresh came meanwhile: it decides
        if identity.user != session.user:
            connection.close(CloseCode.UNAUTHORIZED, "unauthorized: a token for another user")
            return
        session.identity = identity
        self.expire_at(identity.deadline)
