"""Public helpers for testing applications built on trio-wsgate."""

from .client import Closed, RawClient, Refused
from .faults import Fault, FaultProxy, FaultStatistics
from .memory import memory_connector, open_memory_connection

__all__ = [
    "Closed",
    "Fault",
    "FaultProxy",
    "FaultStatistics",
    "RawClient",
    "Refused",
    "memory_connector",
    "open_memory_connection",
]
