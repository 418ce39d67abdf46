"""Who a client is, once its token is verified: plain data, no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["ANONYMOUS", "Identity"]


@dataclass(frozen=True, slots=True)
class Identity:
    """The verified identity behind a token.

    Attributes:
        user: the user id (the ``sub`` claim), or None for an anonymous client.
        deadline: trio time at which the token expires (None or ``math.inf``: never).
            The connection is closed with 4001 then, unless a ``refresh`` brought a
            fresh token. NaN and ``-math.inf`` are refused as invalid tokens, and
            anything but a number as a bug of the authenticator (:func:`identify`).
        topics: glob patterns of the topics the user may subscribe to (the ``topics``
            claim, matched with :func:`fnmatch.fnmatchcase`).
        claims: every claim of the token, for the application's own use.
    """

    user: str | None
    deadline: float | None = None
    topics: tuple[str, ...] = ()
    claims: Mapping[str, Any] = field(default_factory=dict)


#: Every anonymous client's identity (on a node without an authenticator, and a new
#: session's until its connection says who it is): one object, shared, read-only.
ANONYMOUS = Identity(None, claims=MappingProxyType({}))
