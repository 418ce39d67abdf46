"""Public helpers for testing applications built on trio-wsgate."""

from .client import Closed, RawClient, Refused
from .memory import memory_connector, open_memory_connection

__all__ = ["Closed", "RawClient", "Refused", "memory_connector", "open_memory_connection"]
