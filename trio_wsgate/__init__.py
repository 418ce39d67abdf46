"""trio-wsgate: a WebSocket gateway for trio, in which a connection is a nursery."""

from .auth import Identity, JwtAuthenticator
from .brokers import MemoryBroker, Publication
from .client import Backoff, Client, ClientState, Message, open_client
from .config import Config, SlowConsumerPolicy
from .connection import Connection
from .exceptions import (
    BrokerUnavailable,
    ClientClosed,
    HandlerError,
    ProtocolError,
    SessionClosed,
    SessionLost,
    SlowConsumer,
    Unauthorized,
    WsgateError,
)
from .gateway import Gateway
from .protocol import CloseCode, CloseReason
from .server import Server, serve
from .session import Session, SubscribeResult

__all__ = [
    "Backoff",
    "BrokerUnavailable",
    "Client",
    "ClientClosed",
    "ClientState",
    "CloseCode",
    "CloseReason",
    "Config",
    "Connection",
    "Gateway",
    "HandlerError",
    "Identity",
    "JwtAuthenticator",
    "MemoryBroker",
    "Message",
    "ProtocolError",
    "Publication",
    "Server",
    "Session",
    "SessionClosed",
    "SessionLost",
    "SlowConsumer",
    "SlowConsumerPolicy",
    "SubscribeResult",
    "Unauthorized",
    "WsgateError",
    "open_client",
    "serve",
]

__version__ = "0.1.0"
