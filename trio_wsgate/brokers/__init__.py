"""Brokers move publications between the nodes of a gateway (docs/architecture.md, layer 5)."""

from .base import Broker, History, Publication
from .memory import MemoryBroker

__all__ = ["Broker", "History", "MemoryBroker", "Publication"]
