"""Prometheus metrics, named ``wsgate_*``.

Each node has its own :class:`Metrics` with its own registry, so that several nodes
(or tests) in one process never share counters. ``wsgate_tasks`` walks trio's task
tree on every scrape: a leak of tasks is visible from outside the process.

No label takes a value a client chooses freely: each series costs memory in the node
and in Prometheus, so a client must not be able to make one per request. The close
code of ``wsgate_closes_total`` is the peer's own when the peer closed, so it is
bounded (:meth:`Metrics.close_code_label`).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Mapping, Sequence

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["CLOSE_CODE_LABELS", "CloseCounter", "Metrics", "Tally", "Timings", "count_tasks"]

#: The close codes ``wsgate_closes_total`` names; any other is counted as ``other``.
#: 1000-1015: the codes RFC 6455 (§7.4.1) and the IANA registry define, 1013 among
#: them (docs/protocol.md, "Closing"); 4000-4009: this protocol's range (4001-4006 and
#: 4009 in use, the rest kept for it). Client codes (3000-3999, 4010-4999) and the application's
#: own codes outside that range all count as ``other``: at most 27 series per reason.
CLOSE_CODE_LABELS = frozenset(range(1000, 1016)) | frozenset(range(4000, 4010))


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


# The request path's metrics. prometheus_client's metrics take a threading lock on
# every update; a node runs in one thread (trio's), so for the few updated per
# envelope that lock was pure cost: 6% of the gateway's time under request/reply
# (docs/benchmarks.md, "Optimisation log"). These count in plain numbers and hand
# prometheus_client a metric family at each scrape, which runs in the same thread.


class Tally:
    """A counter updated from the trio thread only (see above)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class Timings:
    """One child of a histogram, observed from the trio thread only (see above)."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # one per bucket, then the rest (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self._bounds, value)] += 1
        self.sum += value


class _Family(Collector):
    """Tallies, or Timings by one label (None: one child, keyed "", and no label),
    exposed as one counter or histogram."""

    def __init__(
        self,
        name: str,
        documentation: str,
        tally: Tally | None = None,
        timings: tuple[str | None, Sequence[float], dict[str, Timings]] | None = None,
    ) -> None:
        self._name, self._documentation = name, documentation
        self._tally, self._timings = tally, timings

    def collect(self) -> Iterator[Metric]:
        if self._tally is not None:
            yield CounterMetricFamily(self._name, self._documentation, value=self._tally.value)
        if self._timings is not None:
            label, bounds, children = self._timings
            labels = [] if label is None else [label]
            family = HistogramMetricFamily(self._name, self._documentation, labels=labels)
            for value, child in children.items():
                cumulative, buckets = 0, []
                for bound, count in zip([*bounds, float("inf")], child.counts, strict=True):
                    cumulative += count
                    le = floatToGoString(bound)  # type: ignore[no-untyped-call]
                    buckets.append((le, cumulative))
                family.add_metric([value] if labels else [], buckets, child.sum)
            yield family


class _BrokerUp(Collector):
    """``wsgate_broker_up``: one sample, or one per shard of a sharded broker."""

    def __init__(self, health: Callable[[], Mapping[str, bool]]) -> None:
        self._health = health

    def collect(self) -> Iterator[Metric]:
        health = self._health()
        sharded = list(health) != [""]
        family = GaugeMetricFamily(
            "wsgate_broker_up",
            "1 while the broker (Redis; each shard of a sharded one) can be reached, else 0.",
            labels=["shard"] if sharded else None,
        )
        for shard, up in health.items():
            family.add_metric([shard] if sharded else [], 1.0 if up else 0.0)
        yield family


class CloseCounter:
    """``wsgate_closes_total{code,reason}``, its ``code`` label bounded.

    Use like a labelled counter: ``closes.labels(code, reason).inc()``; the code is
    mapped by :meth:`Metrics.close_code_label` on the way.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._counter = Counter(
            "wsgate_closes",
            "Connections ended, by close code (other: outside 1000-1015 and 4000-4009)"
            " and classified reason.",
            ["code", "reason"],
            registry=registry,
        )

    def labels(self, code: int | str, reason: str) -> Counter:
        """The child counter for a close code and a :class:`~trio_wsgate.CloseReason`."""
        return self._counter.labels(Metrics.close_code_label(code), str(reason))


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
        #: Maps the close code to a bounded label: a client picks its own close code.
        self.closes = CloseCounter(r)
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
        self.messages_in = self._tally("wsgate_messages_in", "Envelopes received from clients.")
        self.messages_out = self._tally("wsgate_messages_out", "Envelopes sent to clients.")
        self.bytes_in = self._tally("wsgate_bytes_in", "WebSocket payload bytes received.")
        self.bytes_out = self._tally("wsgate_bytes_out", "WebSocket payload bytes sent.")
        self.queue_depth = Gauge(
            "wsgate_queue_depth", "Envelopes queued for writing, all connections.", registry=r
        )
        self.queue_depth.set_function(lambda: float(queue_depth()))
        # Observed at every pong: plain numbers, as the request path's (see above).
        rtt_bounds = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
        self.heartbeat_rtt = Timings(rtt_bounds)
        r.register(
            _Family(
                "wsgate_heartbeat_rtt_seconds",
                "Round trip of heartbeat pings.",
                timings=(None, rtt_bounds, {"": self.heartbeat_rtt}),
            )
        )
        bounds = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
        #: ``wsgate_handler_seconds``'s child per outcome.
        self.handler_outcome = {
            outcome: Timings(bounds) for outcome in ("ok", "error", "exception", "closed")
        }
        r.register(
            _Family(
                "wsgate_handler_seconds",
                "Time spent in application handlers, by outcome.",
                timings=("outcome", bounds, self.handler_outcome),
            )
        )
        self.sessions = Gauge("wsgate_sessions", "Sessions held, attached or detached.", registry=r)
        self.sessions_detached = Gauge(
            "wsgate_sessions_detached", "Sessions waiting for their client to resume.", registry=r
        )
        self.detached_bytes = Gauge(
            "wsgate_detached_bytes",
            "Bytes of unacknowledged envelopes that detached sessions hold.",
            registry=r,
        )
        self.history_bytes = Gauge(
            "wsgate_history_bytes",
            "Bytes the in-memory broker's topic history holds (0 with Redis).",
            registry=r,
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
        #: Whether the broker can be reached: ``{"": up}``, or for a sharded broker
        #: ``{shard: up}`` (``wsgate_broker_up``, unlabelled or by ``shard``).
        self.broker_health: Callable[[], Mapping[str, bool]] = lambda: {"": True}
        r.register(_BrokerUp(lambda: self.broker_health()))
        self.sessions_migrated = Counter(
            "wsgate_sessions_migrated",
            "Sessions moved between nodes, by direction (in, out, parked by a draining node).",
            ["direction"],
            registry=r,
        )
        self.tasks = Gauge("wsgate_tasks", "Live trio tasks in this process.", registry=r)
        self.tasks.set_function(lambda: float(count_tasks()))

    @staticmethod
    def close_code_label(code: int | str | None) -> str:
        """The ``code`` label for a close code: itself if in :data:`CLOSE_CODE_LABELS`,
        else ``"other"`` (3000-3999, 4010-4999, anything malformed)."""
        if code is None:
            return "other"
        try:
            value = int(code)
        except ValueError:
            return "other"
        return str(value) if value in CLOSE_CODE_LABELS else "other"

    def _tally(self, name: str, documentation: str) -> Tally:
        tally = Tally()
        self.registry.register(_Family(name, documentation, tally=tally))
        return tally

    def render(self) -> bytes:
        """The Prometheus text exposition. Call it from the trio thread."""
        result: bytes = generate_latest(self.registry)
        return result
