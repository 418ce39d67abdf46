"""Adapters from concrete WebSockets to the calls a connection needs."""

from .base import Incoming, Transport, TransportBroken
from .websockets import Handshake, WebsocketsTransport, accept_websocket

__all__ = [
    "Handshake",
    "Incoming",
    "Transport",
    "TransportBroken",
    "WebsocketsTransport",
    "accept_websocket",
]
