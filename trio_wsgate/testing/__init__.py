"""Public helpers for testing applications built on trio-wsgate."""

from .client import Closed, RawClient, Refused
from .faults import Fault, FaultProxy, FaultStatistics
from .memory import memory_connector, open_memory_connection
from .ports import free_port, wait_for_port

__all__ = [
    "Closed",
    "Fault",
    "FaultProxy",
    "FaultStatistics",
    "RawClient",
    "Refused",
    "free_port",
    "memory_connector",
    "open_memory_connection",
    "wait_for_port",
]
