"""Files served on the WebSocket port: ``/wsgate.js`` and the application's pages.

A browser page needs the client and the socket from the same origin, so every node
serves the JavaScript client (``clients/js/wsgate.js`` in the repository, shipped in
the package as ``trio_wsgate/static/wsgate.js``) at ``GET /wsgate.js``, and an
application may add text files of its own with :meth:`Gateway.serve_file
<trio_wsgate.Gateway.serve_file>` (the chat example's page at ``/``). Each file is
read once, when it is registered, and kept in memory: a request costs no I/O, and
what is served cannot change under a running node.

Answers carry an ``ETag`` and ``Cache-Control: no-cache``: a browser asks again on
every load and gets ``304 Not Modified`` while the file is the same, so a new version
of the node is picked up at once.
"""

from __future__ import annotations

import hashlib
import mimetypes
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .transports.base import Refusal

__all__ = ["CLIENT_PATH", "StaticFile", "client_file"]

#: Where every node serves the JavaScript client.
CLIENT_PATH = "/wsgate.js"

#: Bytes a served file may have: they are held in memory for the node's life.
MAX_FILE_SIZE = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class StaticFile:
    """A text file answered at one path, with its type and validator."""

    text: str
    content_type: str
    etag: str
    #: Extra response headers (CORS for the client, which any origin may load).
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(
        cls,
        text: str,
        content_type: str,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> StaticFile:
        data = text.encode()
        if len(data) > MAX_FILE_SIZE:
            raise ValueError(f"a served file is at most {MAX_FILE_SIZE} bytes")
        etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
        return cls(text, content_type, etag, headers)

    @classmethod
    def read(cls, path: str | Path, content_type: str | None = None) -> StaticFile:
        """Read ``path`` (UTF-8 text) now; its type from its name unless given."""
        path = Path(path)
        if content_type is None:
            guessed, _ = mimetypes.guess_type(path.name)
            if guessed is None:
                raise ValueError(f"say the content type of {path.name}: it has no known suffix")
            content_type = guessed
        textual = content_type.startswith("text/") or content_type.endswith(("javascript", "json"))
        if textual and "charset" not in content_type:
            content_type += "; charset=utf-8"  # read as UTF-8, sent as UTF-8
        return cls.of(path.read_text(encoding="utf-8"), content_type)

    def answer(self, request_headers: Mapping[str, str]) -> Refusal:
        """The plain-HTTP answer: 200 with the file, or 304 if the client has it."""
        headers = {
            "Content-Type": self.content_type,
            "Cache-Control": "no-cache",
            "ETag": self.etag,
            "X-Content-Type-Options": "nosniff",
            **dict(self.headers),
        }
        if self.etag in _etags(request_headers.get("If-None-Match", "")):
            return Refusal(304, "", headers)
        return Refusal(200, self.text, headers)


def _etags(value: str) -> set[str]:
    """The validators of an ``If-None-Match`` header (weak ones compare as strong)."""
    tags = {tag.strip().removeprefix("W/") for tag in value.split(",")}
    return tags - {""}


def client_file() -> StaticFile:
    """The JavaScript client, as every node serves it at :data:`CLIENT_PATH`."""
    text = resources.files("trio_wsgate").joinpath("static", "wsgate.js").read_text("utf-8")
    # Any origin may import it (a page served elsewhere that talks to this node):
    # it is public code, and the socket's own checks (origin, token) still apply.
    cors = (("Access-Control-Allow-Origin", "*"),)
    return StaticFile.of(text, "text/javascript; charset=utf-8", cors)
