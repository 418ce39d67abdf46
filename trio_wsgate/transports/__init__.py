"""Adapters from concrete WebSockets to the calls a connection needs.

The default (``websockets``) lives here; ``trio_websocket`` and ``asgi`` are imported
when used, so their libraries load only then.
"""

from .base import Accept, Incoming, Refusal, Transport, TransportBroken, UpgradeRequest
from .websockets import Handshake, WebsocketsTransport, accept_websocket

__all__ = [
    "Accept",
    "Handshake",
    "Incoming",
    "Refusal",
    "Transport",
    "TransportBroken",
    "UpgradeRequest",
    "WebsocketsTransport",
    "accept_websocket",
]
