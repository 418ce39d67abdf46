"""A lone request's critical path in the node: from the read that brings it to its answer.

    python -m bench.critical [--server gateway|raw] [--requests N] [--phases]

p50 latency at a light load is mostly what the node does between the read of a request
and the write of its answer: what it does after the write (and before its next read)
delays no reply of a connection that waits alone. This drives the node
(``bench/app.py``'s echo through the full protocol, or ``raw``, the node's transport
with an echo in place of the protocol) over loopback TCP from a driver in the same trio
run (``bench/instructions.py``'s), one connection and one request in flight, and prints
the median time from the read that returned the request to the write of its answer.
``--phases`` splits it at the node's own steps, by wrapping them (each wrapper adds a
few tenths of a microsecond). Wall time, so the figures move with the machine: compare
``gateway`` and ``raw`` in one sitting.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from . import instructions

# The node's steps between the read and the write, in the order a lone request takes
# them: (module, class, method, label).
_STEPS = [
    ("trio_wsgate.transports.websockets", "WebsocketsTransport", "_handle_events", "events"),
    ("trio_wsgate.connection", "Connection", "_decode", "decode"),
    ("trio_wsgate.connection", "Connection", "_on_envelope", "envelope"),
    ("trio_wsgate.dispatch", "Dispatcher", "run_now", "run_now"),
    ("trio_wsgate.session", "Session", "reply", "reply"),
    ("trio_wsgate.connection", "Connection", "write_queued", "write_queued"),
    ("trio_wsgate.transports.websockets", "WebsocketsTransport", "send_message", "frame"),
]


def _marked(function: Callable[..., Any], label: str, marks: list[tuple[str, int]]) -> Any:
    clock = time.perf_counter_ns

    def marked(*args: Any, **kwargs: Any) -> Any:
        marks.append((f"{label} in", clock()))
        try:
            return function(*args, **kwargs)
        finally:
            marks.append((f"{label} out", clock()))

    return marked


def measure(server: str, requests: int, phases: bool) -> dict[str, float]:
    """Median microseconds of the critical path (``total``), and of each step between
    two marks if ``phases``."""
    import importlib

    import trio_wsgate.transports.websockets as transport

    marks: list[tuple[str, int]] = []
    read_now, write_now = transport._read_now, transport._write_now
    clock = time.perf_counter_ns

    def reading(sock: Any) -> bytes | None:
        data = read_now(sock)
        if data:
            marks.append(("read", clock()))
        return data

    def writing(sock: Any, payload: bytes) -> int:
        marks.append(("write", clock()))
        return write_now(sock, payload)

    transport._read_now, transport._write_now = reading, writing
    if phases and server == "gateway":
        for module, cls, method, label in _STEPS:
            owner = getattr(importlib.import_module(module), cls)
            setattr(owner, method, _marked(getattr(owner, method), label, marks))
    instructions._run(server, 1, 1, requests)
    spans: dict[str, list[int]] = defaultdict(list)
    order: list[str] = []  # the steps of the last request, in order
    start = previous = None
    before = ""
    for label, at in marks:
        if label == "read":
            start = previous = at
            before = label
            order = []
            continue
        if start is None or previous is None:
            continue
        name = f"{before} -> {label}"
        spans[name].append(at - previous)
        order.append(name)
        previous, before = at, label
        if label == "write":
            spans["total"].append(at - start)
            start = None
    skip = requests // 4  # start-up: connection, first allocations
    figures = {"total": statistics.median(spans["total"][skip:]) / 1000}
    if phases:
        figures.update((name, statistics.median(spans[name][skip:]) / 1000) for name in order)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=("gateway", "raw"), default="gateway")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--phases", action="store_true", help="split it at the node's steps")
    args = parser.parse_args()
    figures = measure(args.server, args.requests, args.phases)
    total = figures.pop("total")
    print(f"{args.server}: {total:.1f} µs from the read of a lone request to its answer's write")
    for name, value in figures.items():
        print(f"  {name:34s} {value:6.2f} µs")


if __name__ == "__main__":
    main()
