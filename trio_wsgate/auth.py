"""Who a client is: JWTs verified with PyJWT, and the identity they carry (docs/protocol.md §3).

A token may arrive at the handshake (``Authorization: Bearer ...`` or ``?token=...``) or
in ``hello.token``; whichever way, one :class:`Authenticator` turns it into an
:class:`Identity` or raises :class:`~trio_wsgate.Unauthorized`. The gateway's own is
:class:`JwtAuthenticator`: HS256 with a shared secret, or RS256/ES256 with a public key.
An application may register its own with :meth:`Gateway.authenticate
<trio_wsgate.Gateway.authenticate>` instead.

Tokens are bearer secrets: no message here, and no log line anywhere, contains one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
import trio
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .exceptions import Unauthorized
from .identity import Identity
from .protocol.topics import check_topic, user_topic

__all__ = ["Authenticator", "Identity", "JwtAuthenticator", "token_from_request"]


#: Turns a token (None if the client sent none) into an :class:`Identity`, a user id,
#: or None (anonymous); raises :class:`~trio_wsgate.Unauthorized` to refuse.
Authenticator = Callable[[str | None], Awaitable["Identity | str | None"]]


def refusal_reason(exc: Unauthorized) -> str:
    """What the client is told of ``exc`` (the 401's body, the 4001's reason): its
    message in printable ASCII, at most 100 characters. A message may carry text the
    token chose (PyJWT names an unknown ``crit`` entry, a lone surrogate included):
    printed as it is, it could not be encoded as UTF-8, nor split lines."""
    text = "".join(c if c.isascii() and c.isprintable() else "?" for c in str(exc)[:100])
    return f"unauthorized: {text}"


async def identify(authenticator: Authenticator, token: str | None) -> Identity:
    """Run an authenticator and normalise its answer to an :class:`Identity`.

    The deadline is what the node's timers will wait for, so it is checked whatever
    set it: a NaN would break their heap, and trio refuses it as a deadline. So is the
    user id, which must name the user's topic ``user:<sub>`` (docs/protocol.md §6.6).

    Raises:
        Unauthorized: the authenticator refused the token, its deadline is NaN or
            minus infinity (as a deadline taken from a token's bad claims may be), or
            its user id is empty, too long or has control characters.
        TypeError: the authenticator answered something else than an Identity, a
            str or None, or a deadline that is not a number.
    """
    answer = await authenticator(token)
    if answer is None or isinstance(answer, str):
        return _checked(Identity(answer))
    if not isinstance(answer, Identity):
        raise TypeError(f"an authenticator returns an Identity, a str or None, not {answer!r}")
    deadline = answer.deadline
    if deadline is None or (type(deadline) is float and math.isfinite(deadline)):
        return _checked(answer)
    if isinstance(deadline, bool) or not isinstance(deadline, int | float):
        raise TypeError(f"Identity.deadline is trio time in seconds or None, not {deadline!r}")
    try:
        when = float(deadline)
    except OverflowError:  # an int past the floats: trio could not take it either
        when = math.inf if deadline > 0 else -math.inf
    if when == math.inf:
        return _checked(dataclasses.replace(answer, deadline=None))  # never, as None says
    if not math.isfinite(when):  # NaN, -inf
        raise Unauthorized("invalid token: its expiry is not a valid time")
    return _checked(dataclasses.replace(answer, deadline=when))


def _checked(identity: Identity) -> Identity:
    """The identity, if its user id can name a user topic; else Unauthorized."""
    if identity.user is not None:
        try:
            check_topic(user_topic(identity.user))
        except ValueError:
            raise Unauthorized("the user id is empty, too long or has control characters") from None
    return identity


def token_from_request(headers: Mapping[str, str], path: str) -> str | None:
    """The token of an upgrade request: the Bearer header first, then ``?token=``."""
    header = headers.get("Authorization")
    if header is not None:
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    _, _, query = path.partition("?")
    if query:
        values = parse_qs(query).get("token")
        if values and values[0]:
            return values[0]
    return None


#: The largest time claim taken (``exp``, ``nbf``, ``iat``; Unix seconds, excluded): 2**53,
#: about 285 million years. Up to there every integer is exact as a float (the JSON
#: numbers of JavaScript issuers are floats), so the comparisons and the deadline
#: derived from ``exp`` are exact and finite. Times before 1970 are refused too.
MAX_TIME = 2**53


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """The claim ``name`` as Unix seconds, None if absent; Unauthorized if not a valid time.

    RFC 7519 §2 NumericDate: a JSON number, which may have a fraction. Refused: NaN,
    the infinities (Python's JSON reads ``NaN``, ``Infinity`` and ``1e400``), values
    out of ``0 <= t < MAX_TIME``, booleans (``true`` is an int in Python), strings and
    null.
    """
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unauthorized(f"invalid token: {name} is not a valid time")
    # Comparing first: float() of a huge int would overflow; NaN fails every comparison.
    if not 0 <= value < MAX_TIME:
        raise Unauthorized(f"invalid token: {name} is not a valid time")
    return float(value)


def _algorithms_for(key: Any) -> list[str]:
    if isinstance(key, rsa.RSAPublicKey):
        return ["RS256"]
    if isinstance(key, ec.EllipticCurvePublicKey):
        by_curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        algorithm = by_curve.get(key.curve.name)
        if algorithm is not None:
            return [algorithm]
    raise ValueError(f"an RSA or EC (P-256) public key is needed, not {type(key).__name__}")


class JwtAuthenticator:
    """Verify JWTs with PyJWT (docs/protocol.md §3).

    Exactly one of ``secret`` (HS256) and ``public_key`` (PEM: RSA for RS256, EC P-256
    for ES256) is given. Only the algorithm of the key is accepted, so ``alg: none``
    and algorithm-confusion tokens are refused. ``sub`` is required and is the user;
    ``exp``, ``nbf`` and ``iat``, if present, must be valid times (:data:`MAX_TIME`);
    ``exp`` must be in the future and sets :attr:`Identity.deadline`, ``nbf`` and
    ``iat`` must not be in the future; ``topics``, if present, must be a list of
    strings.

    Args:
        secret: the HS256 shared secret.
        public_key: the PEM text of the public key.
        audience: if set, the ``aud`` claim must name it.
        issuer: if set, the ``iss`` claim must equal it.
        leeway: seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat``.
        clock: the wall clock, Unix seconds (tests pass one tied to trio's clock);
            ``exp``, ``nbf`` and ``iat`` are all checked against it.

    Raises:
        ValueError: not exactly one key, an empty secret, a key that is not a PEM
            public key of a kind supported, or a leeway that is not a finite number
            of seconds, zero or more.
    """

    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key: str | bytes | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (secret is None) == (public_key is None):
            raise ValueError("give exactly one of a JWT secret and a JWT public key")
        if not 0 <= leeway < math.inf:  # NaN too
            raise ValueError(f"the leeway is a finite number of seconds, zero or more: {leeway}")
        self._key: Any
        if secret is not None:
            if not secret:
                raise ValueError("the JWT secret must not be empty")
            self._key, self.algorithms = secret, ["HS256"]
        else:
            assert public_key is not None
            pem = public_key.encode() if isinstance(public_key, str) else public_key
            try:
                self._key = load_pem_public_key(pem)
            except ValueError as exc:
                raise ValueError("the JWT public key is not a PEM public key") from exc
            self.algorithms = _algorithms_for(self._key)
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self.clock = clock

    @classmethod
    def from_key_file(cls, path: str | Path, **options: Any) -> JwtAuthenticator:
        """Read the public key from a PEM file (``--jwt-public-key FILE``)."""
        return cls(public_key=Path(path).read_bytes(), **options)

    def __repr__(self) -> str:  # the key stays out of logs and tracebacks
        return f"<JwtAuthenticator {'/'.join(self.algorithms)}>"

    def verify(self, token: str) -> Identity:
        """Verify a token now; return its identity or raise Unauthorized (no I/O)."""
        now = self.clock()
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                # The times are checked below (_numeric_date), against self.clock
                # (which tests move), whatever the PyJWT version: PyJWT takes int() of
                # whatever it gets (true, "123"), and the older versions pyproject.toml
                # allows let int()'s OverflowError (Infinity, 1e400) and TypeError ([1])
                # out of decode(): a 500 at the handshake, 1011 in hello.
                options={
                    "require": ["sub"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidTokenError as exc:
            # PyJWT's messages name the failed check, never the token's signature or
            # claims; the header's crit entries they may name (refusal_reason).
            raise Unauthorized(f"invalid token: {exc}") from None
        user = claims["sub"]
        if not isinstance(user, str) or not user:
            raise Unauthorized("invalid token: sub must be a non-empty string")
        exp, nbf, iat = (_numeric_date(claims, name) for name in ("exp", "nbf", "iat"))
        for name, value in (("nbf", nbf), ("iat", iat)):
            if value is not None and value - self.leeway > now:
                raise Unauthorized(f"invalid token: not valid yet ({name})")
        deadline: float | None = None
        if exp is not None:
            left = exp + self.leeway - now
            if left <= 0:
                raise Unauthorized("token expired")
            deadline = trio.current_time() + left
        topics = claims.get("topics", [])
        if not isinstance(topics, Sequence) or isinstance(topics, str):
            raise Unauthorized("invalid token: topics must be a list of strings")
        if not all(isinstance(pattern, str) for pattern in topics):
            raise Unauthorized("invalid token: topics must be a list of strings")
        return Identity(user, deadline, tuple(topics), claims)

    async def __call__(self, token: str | None) -> Identity:
        """The :data:`Authenticator` interface: a token is required."""
        if token is None:
            raise Unauthorized("a token is required")
        return self.verify(token)


def authenticator_from_settings(
    *,
    jwt_secret: str | None,
    jwt_public_key: str | None,
    jwt_audience: str | None = None,
    jwt_issuer: str | None = None,
) -> JwtAuthenticator | None:
    """The node's JWT verifier from its settings, or None when no key is configured."""
    options: dict[str, Any] = {"audience": jwt_audience, "issuer": jwt_issuer}
    if jwt_secret is not None:
        return JwtAuthenticator(secret=jwt_secret, **options)
    if jwt_public_key is not None:
        return JwtAuthenticator.from_key_file(jwt_public_key, **options)
    return None
