"""Keep secrets out of the logs.

The gateway never logs a token, an API key or a resume token itself (the tests
check this at DEBUG level). :class:`RedactingFilter` is the second line: installed on
the log handlers (``trio-wsgate serve`` does it), it blanks anything shaped like a
secret in every record, whoever logged it: a JWT, ``token=...`` in a URL, a
``Bearer`` or ``apikey`` credential, a password in a URL (``redis://`` and the others), the
``token`` fields of an envelope, and the node's own configured secrets verbatim.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

__all__ = ["RedactingFilter", "install_redaction", "redact"]

REDACTED = "[redacted]"

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # A JWT: three base64url parts, the first a JSON object ("eyJ").
    (re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), REDACTED),
    # token=..., resume_token=..., api_key=... in a URL or a form.
    (
        re.compile(r"(?i)\b((?:resume_)?token|api_?key|secret|password)=[^&\s\"',;]+"),
        rf"\1={REDACTED}",
    ),
    # Authorization: Bearer ... / apikey ...
    (re.compile(r"(?i)\b(bearer|apikey)\s+[^\s\"',;]+"), rf"\1 {REDACTED}"),
    # "token": "...", "resume_token": "..." in JSON (a hello, a refresh, a welcome).
    (re.compile(r"(?i)(\"(?:resume_)?token\"\s*:\s*\")[^\"]*"), rf"\1{REDACTED}"),
    (re.compile(r"(?i)('(?:resume_)?token'\s*:\s*')[^']*"), rf"\1{REDACTED}"),
    # redis://user:password@host, and the other schemes of --redis (sentinel, cluster,
    # a Unix socket) and of any URL with credentials
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s/]+@"), rf"\1{REDACTED}@"),
]


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret-shaped part, and each of ``secrets``, blanked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """A handler filter that redacts each record's message and traceback.

    Args:
        secrets: values blanked wherever they appear (the node's keys).
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg = redact(message, self._secrets)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self._secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self._secrets)
        return True


def install_redaction(secrets: Iterable[str] = (), logger: logging.Logger | None = None) -> None:
    """Add a :class:`RedactingFilter` to every handler of ``logger`` (the root one)."""
    redacting = RedactingFilter(secrets)
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(redacting)
