"""Prometheus metrics, named ``wsgate_*``.

Each node has its own :class:`Metrics` with its own registry, so that several nodes
(or tests) in one process never share counters. ``wsgate_tasks`` walks trio's task
tree on every scrape: a leak of tasks is visible from outside the process.
"""

from __future__ import annotations

from collections.abc import Callable

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics", "count_tasks"]


def count_tasks() -> int:
    """Count the live trio tasks of the current run, the root task included."""
    root = trio.lowlevel.current_root_task()
    if root is None:  # pragma: no cover - only outside a run
        return 0
    count, stack = 0, [root]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


class Metrics:
    """The metrics of one node.

    Args:
        queue_depth: returns the envelopes queued on all connections, read at scrape.
    """

    def __init__(self, queue_depth: Callable[[], int] = lambda: 0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections_open = Gauge(
            "wsgate_connections_open", "WebSocket connections open now.", registry=r
        )
        self.connections_total = Counter(
            "wsgate_connections", "WebSocket connections accepted.", registry=r
        )
        self.closes = Counter(
            "wsgate_closes",
            "Connections ended, by close code and classified reason.",
            ["code", "reason"],
            registry=r,
        )
        self.internal_errors = Counter(
            "wsgate_internal_errors",
            "Unexpected errors contained to one connection (logged with its id).",
            registry=r,
        )
        self.rate_limited = Counter(
            "wsgate_rate_limited",
            "Connections closed with 4009 for going over the inbound rate limit.",
            registry=r,
        )
        self.handshakes_refused = Counter(
            "wsgate_handshakes_refused",
            "Upgrades answered with HTTP, by status.",
            ["status"],
            registry=r,
        )
        self.messages_in = Counter(
            "wsgate_messages_in", "Envelopes received from clients.", registry=r
        )
        self.messages_out = Counter("wsgate_messages_out", "Envelopes sent to clients.", registry=r)
        self.bytes_in = Counter("wsgate_bytes_in", "WebSocket payload bytes received.", registry=r)
        self.bytes_out = Counter("wsgate_bytes_out", "WebSocket payload bytes sent.", registry=r)
        self.queue_depth = Gauge(
            "wsgate_queue_depth", "Envelopes queued for writing, all connections.", registry=r
        )
        self.queue_depth.set_function(lambda: float(queue_depth()))
        self.heartbeat_rtt = Histogram(
            "wsgate_heartbeat_rtt_seconds",
            "Round trip of heartbeat pings.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.handler_latency = Histogram(
            "wsgate_handler_seconds",
            "Time spent in application handlers, by outcome.",
            ["outcome"],
            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
            registry=r,
        )
        #: The histogram's child per outcome, looked up once (``labels()`` costs a lock
        #: and a dict lookup on every call, on the request path).
        self.handler_outcome = {
            outcome: self.handler_latency.labels(outcome)
            for outcome in ("ok", "error", "exception", "closed")
        }
        self.sessions = Gauge("wsgate_sessions", "Sessions held, attached or detached.", registry=r)
        self.sessions_detached = Gauge(
            "wsgate_sessions_detached", "Sessions waiting for their client to resume.", registry=r
        )
        self.sessions_opened = Counter("wsgate_sessions_opened", "Sessions started.", registry=r)
        self.resumes = Counter(
            "wsgate_resumes",
            "hello with resume, by result (resumed, taken_over, unknown, expired, bad_token).",
            ["result"],
            registry=r,
        )
        self.sessions_ended = Counter(
            "wsgate_sessions_ended",
            "Sessions ended for good, by why (bye, kick, expired, overflow...).",
            ["why"],
            registry=r,
        )
        self.topics = Gauge(
            "wsgate_topics", "Topics with at least one subscriber on this node.", registry=r
        )
        self.publications = Counter(
            "wsgate_publications", "Publications made through this node.", registry=r
        )
        self.fanout = Histogram(
            "wsgate_fanout_subscribers",
            "Local subscribers each received publication was fanned out to.",
            buckets=(1, 10, 100, 1000, 10000, 100000),
            registry=r,
        )
        self.recoveries = Counter(
            "wsgate_recoveries",
            "Subscriptions with since, by result (recovered, lost).",
            ["result"],
            registry=r,
        )
        self.broker_up = Gauge(
            "wsgate_broker_up", "1 while the broker (Redis) can be reached, else 0.", registry=r
        )
        self.sessions_migrated = Counter(
            "wsgate_sessions_migrated",
            "Sessions moved between nodes, by direction (in, out, parked by a draining node).",
            ["direction"],
            registry=r,
        )
        self.tasks = Gauge("wsgate_tasks", "Live trio tasks in this process.", registry=r)
        self.tasks.set_function(lambda: float(count_tasks()))

    def render(self) -> bytes:
        """The Prometheus text exposition. Call it from the trio thread."""
        result: bytes = generate_latest(self.registry)
        return result
