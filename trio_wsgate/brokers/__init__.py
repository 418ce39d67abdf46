"""Brokers move publications between the nodes of a gateway (DESIGN.md, layer 5)."""

from .base import Broker, History, Publication
from .memory import MemoryBroker

__all__ = ["Broker", "History", "MemoryBroker", "Publication"]
