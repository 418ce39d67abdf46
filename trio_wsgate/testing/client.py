"""A protocol-level WebSocket client for tests, written from docs/protocol.md alone.

It drives websockets' sans-I/O :class:`~websockets.client.ClientProtocol` over any
trio stream (a socket or one half of :func:`trio.testing.memory_stream_pair`) and is
*pull-based*: nothing is read until the test asks, so a test can play a peer that
stops reading, never answers the close handshake or vanishes. It sends and receives
plain dicts, exactly as a client author in another language would.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Any

import trio
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from ..protocol.codecs import JSON_SUBPROTOCOL, SUBPROTOCOLS, Codec
from ..transports.websockets import HandshakeRefused, client_handshake

__all__ = ["Closed", "RawClient", "Refused"]


class Refused(Exception):
    """The server answered the upgrade with plain HTTP."""

    def __init__(self, response: Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.status = response.status_code
        self.response = response


class Closed(Exception):
    """The connection closed; :attr:`code` is what the server sent (1006 if nothing)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed {code} {reason}")
        self.code = code
        self.reason = reason


class RawClient:
    """A pull-based client. Use :meth:`connect` to make one."""

    def __init__(self, stream: trio.abc.Stream, protocol: ClientProtocol, codec: Codec) -> None:
        self.stream = stream
        self.protocol = protocol
        self.codec = codec
        self.received: deque[dict[str, Any]] = deque()
        self._fragments: list[bytes] = []
        self.close_code: int | None = None
        self.close_reason = ""
        self.eof = False

    @classmethod
    async def connect(
        cls,
        stream: trio.abc.Stream,
        *,
        path: str = "/ws",
        subprotocols: Sequence[str] | None = (JSON_SUBPROTOCOL,),
        headers: dict[str, str] | None = None,
        max_size: int | None = 2**24,
    ) -> RawClient:
        """Do the opening handshake on ``stream``.

        Raises:
            Refused: the server answered with HTTP instead of upgrading.
        """
        try:
            protocol, response, pending = await client_handshake(
                stream,
                parse_uri(f"ws://127.0.0.1{path}"),
                subprotocols=subprotocols,
                headers=headers,
                max_message_size=max_size,
            )
        except HandshakeRefused as exc:
            raise Refused(exc.response) from None
        chosen = response.headers.get("Sec-WebSocket-Protocol") or JSON_SUBPROTOCOL
        client = cls(stream, protocol, SUBPROTOCOLS[chosen]())
        client._handle(pending)
        return client

    # -- sending --------------------------------------------------------------------

    async def send(self, *envelopes: dict[str, Any]) -> None:
        """Send one envelope, or several as one batch message."""
        codec = self.codec
        if len(envelopes) == 1:
            payload = codec.dumps(envelopes[0])
        else:
            payload = codec.batch([codec.dumps(e) for e in envelopes])
        await self.send_raw(payload, binary=codec.binary)

    async def send_raw(self, payload: bytes, *, binary: bool) -> None:
        """Send one message of the given frame kind, whatever it holds.

        Raises:
            Closed: the server's close frame has come (nothing more can be sent).
        """
        if self.close_code is not None:
            raise Closed(self.close_code, self.close_reason)
        if binary:
            self.protocol.send_binary(payload)
        else:
            self.protocol.send_text(payload)
        await self.flush()

    async def flush(self) -> None:
        """Write what the protocol has queued (pongs, close frames, EOF)."""
        for chunk in self.protocol.data_to_send():
            if chunk:
                await self.stream.send_all(chunk)
            else:
                await self.stream.aclose()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake."""
        self.protocol.send_close(code, reason)
        await self.flush()

    # -- receiving ------------------------------------------------------------------

    def _handle(self, events: list[Any]) -> None:
        for event in events:
            if not isinstance(event, Frame):
                continue
            if event.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                self._fragments.append(bytes(event.data))
                if event.fin:
                    value = self.codec.loads(b"".join(self._fragments))
                    self._fragments = []
                    self.received.extend(value if isinstance(value, list) else [value])
            elif event.opcode is Opcode.CLOSE and self.protocol.close_rcvd is not None:
                self.close_code = self.protocol.close_rcvd.code
                self.close_reason = self.protocol.close_rcvd.reason

    async def receive_some(self) -> bool:
        """Read once from the stream; return False at end of stream."""
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if data:
            self.protocol.receive_data(data)
        else:
            self.eof = True
            self.protocol.receive_eof()
        self._handle(self.protocol.events_received())
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.flush()
        return not self.eof

    async def recv(self) -> dict[str, Any]:
        """The next envelope from the server (batches are flattened).

        Raises:
            Closed: the connection closed first.
        """
        while not self.received:
            if self.close_code is not None or self.eof:
                raise Closed(self.close_code or 1006, self.close_reason)
            await self.receive_some()
        return self.received.popleft()

    async def recv_type(self, kind: str) -> dict[str, Any]:
        """The next envelope of this type, answering server pings on the way."""
        while True:
            envelope = await self.recv()
            if envelope.get("type") == kind:
                return envelope
            if envelope.get("type") == "ping":
                await self.send({"type": "pong", "ts": envelope.get("ts")})

    async def wait_closed(self) -> tuple[int, str]:
        """Read until the server ends the connection; return the close code and reason."""
        while await self.receive_some():
            pass
        return (self.close_code or 1006, self.close_reason)

    async def hello(self, **fields: Any) -> dict[str, Any]:
        """Send ``hello`` and return the ``welcome``."""
        await self.send({"type": "hello", **fields})
        return await self.recv_type("welcome")
