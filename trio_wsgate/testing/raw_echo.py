"""The raw-echo profile: each transport echoing WebSocket messages, for conformance only.

    trio-wsgate raw-echo --transport websockets --port 9001

The Autobahn test suite (run by ``kosoku``, ``scripts/conformance``) checks a
WebSocket implementation by having it echo. This profile runs the node's own accept
loop, handshake and transport (the code the gateway uses), with the protocol layer
replaced by an echo: every message goes back as it came, text or binary. It listens on
127.0.0.1 only and has no sessions, no auth and no limits beyond the frame ones: it is
not a server to expose.
"""

from __future__ import annotations

import ipaddress

import trio

from ..config import Config
from ..gateway import Gateway
from ..server import Admission, Server
from ..transports.base import Transport

__all__ = ["RawEchoServer", "raw_echo_config"]


def raw_echo_config(transport: str, port: int = 9001, host: str = "127.0.0.1") -> Config:
    """Settings of the profile: loopback only; Autobahn's message sizes (up to 16 MiB)."""
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError("the raw-echo profile listens on a loopback address only")
    return Config(
        host=host,
        port=port,
        path="/",
        transport=transport,  # type: ignore[arg-type]
        admin_port=None,
        max_message_size=16 * 2**20,
        max_fragments=2**20,
        max_request_head=65536,
        compression=transport == "websockets",
        hello_timeout=None,
        heartbeat_interval=None,
        # Every peer of this loopback-only profile is 127.0.0.1: the per-address share
        # of the handshake slots would hold a benchmark's connection storm to 32.
        max_handshakes_per_ip=1000,
    )


class RawEchoServer(Server):
    """A node whose connections echo instead of speaking the wsgate protocol."""

    def __init__(self, config: Config) -> None:
        super().__init__(Gateway(), config)

    async def run_connection(
        self, transport: Transport, admission: Admission, remote_address: str = ""
    ) -> None:
        """Echo every message until the WebSocket closes; release everything."""
        try:
            while True:
                incoming = await transport.receive()
                for payload, binary in incoming.messages:
                    transport.send_message(payload, binary)
                if transport.wants_flush() and await transport.flush():
                    break  # this side's close is complete
                if incoming.eof:
                    break
        except Exception:  # a broken peer ends its own echo only
            pass
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self.config.close_timeout):
                await transport.aclose()
            self.release(admission)
