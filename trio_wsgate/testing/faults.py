"""A TCP fault proxy: put it between a client and a server and break the wire.

::

    proxy = FaultProxy("127.0.0.1", server_port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)          # proxy.port is now listening
        nursery.start_soon(proxy.chaos)           # a fault every 0.2 to 0.6 s
        ...                                       # clients connect to proxy.port

Every accepted connection is forwarded to the target through two pumps (one per
direction), each with a reader and a writer, so that ``latency`` delays every chunk
without slowing the stream down. Faults apply to the connections open at the time:

* ``cut()``: both sockets are reset (RST, via ``SO_LINGER`` 0): the peers see
  ECONNRESET, as when a NAT forgets the flow;
* ``close()``: both sockets are closed cleanly (FIN), as a dying middlebox would;
* ``blackhole(duration)``: nothing more is forwarded in either direction while both
  sockets stay open: each peer sees a half-open connection, and only its heartbeat can
  tell. After ``duration`` the proxy resets them, to bound what it holds.

New connections are forwarded normally. Everything runs in the proxy's nursery, so
cancelling :meth:`FaultProxy.serve` releases every socket.
"""

from __future__ import annotations

import contextlib
import enum
import math
import random
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

__all__ = ["Fault", "FaultProxy", "FaultStatistics"]

_RECEIVE_SIZE = 65536


class Fault(enum.StrEnum):
    """The faults the proxy can inject."""

    CUT = "cut"
    CLOSE = "close"
    BLACKHOLE = "blackhole"
    LATENCY = "latency"  # a burst of added latency


@dataclass(slots=True)
class FaultStatistics:
    """What the proxy did."""

    connections: int = 0
    bytes_forwarded: int = 0
    faults: dict[str, int] = field(default_factory=dict)


class _Pair:
    """One proxied connection: the accepted socket and the one to the target."""

    def __init__(self, downstream: trio.SocketStream, upstream: trio.SocketStream) -> None:
        self.streams = (downstream, upstream)
        self.scope = trio.CancelScope()
        self.blackholed = trio.Event()
        self.reset = False

    def set_reset(self) -> None:
        self.reset = True
        for stream in self.streams:
            with contextlib.suppress(OSError):  # already closed
                stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )


class FaultProxy:
    """Forward TCP from ``host:port`` to ``target_host:target_port``, with faults.

    Args:
        target_host: where to forward.
        target_port: where to forward.
        host: the address to listen on.
        port: the port to listen on (0 picks a free one; read :attr:`port`).
        latency: seconds added to every chunk, both ways.
        seed: seeds :meth:`chaos`, for a repeatable schedule.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = port
        self.latency = latency
        self.stats = FaultStatistics()
        self._pairs: set[_Pair] = set()
        self._rng = random.Random(seed)
        self._nursery: trio.Nursery | None = None

    @property
    def connections(self) -> int:
        """Connections being forwarded now."""
        return len(self._pairs)

    # -- faults -----------------------------------------------------------------------

    def _count(self, fault: Fault) -> None:
        self.stats.faults[fault] = self.stats.faults.get(fault, 0) + 1

    def cut(self) -> None:
        """Reset every open connection (RST both ways)."""
        self._count(Fault.CUT)
        for pair in list(self._pairs):
            pair.set_reset()
            pair.scope.cancel()

    def close(self) -> None:
        """Close every open connection cleanly (FIN both ways)."""
        self._count(Fault.CLOSE)
        for pair in list(self._pairs):
            pair.scope.cancel()

    def blackhole(self, duration: float = 30.0) -> None:
        """Stop forwarding on every open connection; reset them after ``duration``."""
        self._count(Fault.BLACKHOLE)
        deadline = trio.current_time() + duration
        for pair in list(self._pairs):
            pair.blackholed.set()
            pair.scope.deadline = min(pair.scope.deadline, deadline)

    async def chaos(
        self,
        *,
        interval: tuple[float, float] = (0.2, 0.6),
        faults: Sequence[Fault] = (Fault.CUT, Fault.CLOSE, Fault.BLACKHOLE, Fault.LATENCY),
        blackhole_for: float = 5.0,
        burst: tuple[float, float] = (0.05, 0.3),
    ) -> None:
        """Inject a random fault every ``interval`` seconds (uniform), until cancelled.

        A latency fault adds ``burst`` seconds (uniform) of latency for one interval.
        """
        base_latency = self.latency
        while True:
            await trio.sleep(self._rng.uniform(*interval))
            self.latency = base_latency
            if not self._pairs:
                continue
            fault = self._rng.choice(list(faults))
            if fault is Fault.CUT:
                self.cut()
            elif fault is Fault.CLOSE:
                self.close()
            elif fault is Fault.BLACKHOLE:
                self.blackhole(blackhole_for)
            else:
                self._count(Fault.LATENCY)
                self.latency = base_latency + self._rng.uniform(*burst)

    # -- forwarding -------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and forward until cancelled."""
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, downstream: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream(*self.target)
        except OSError:
            await trio.aclose_forcefully(downstream)
            return
        self.stats.connections += 1
        pair = _Pair(downstream, upstream)
        self._pairs.add(pair)
        try:
            with pair.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, pair, downstream, upstream)
                    nursery.start_soon(self._pump, pair, upstream, downstream)
        finally:
            self._pairs.discard(pair)
            if pair.scope.cancelled_caught and not pair.reset and pair.blackholed.is_set():
                pair.set_reset()  # a blackhole ends like a vanished peer
            # Shielded: under cancellation the first close would raise and skip the rest.
            with trio.CancelScope(shield=True):
                for stream in pair.streams:
                    await trio.aclose_forcefully(stream)

    async def _pump(self, pair: _Pair, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        send, receive = trio.open_memory_channel[tuple[float, bytes]](math.inf)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._deliver, pair, receive, sink)
            async with send:
                while not pair.blackholed.is_set():
                    try:
                        data = await source.receive_some(_RECEIVE_SIZE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        # A reset on one side is passed on as a reset to the other.
                        pair.set_reset()
                        pair.scope.cancel()
                        return
                    if not data:
                        break
                    await send.send((trio.current_time() + self.latency, data))
                else:
                    await trio.sleep_forever()

    async def _deliver(
        self,
        pair: _Pair,
        receive: trio.MemoryReceiveChannel[tuple[float, bytes]],
        sink: trio.SocketStream,
    ) -> None:
        async with receive:
            async for due, data in receive:
                await trio.sleep_until(due)
                if pair.blackholed.is_set():
                    await trio.sleep_forever()
                try:
                    await sink.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pair.scope.cancel()
                    return
                self.stats.bytes_forwarded += len(data)
        # The source ended: pass the end on (half-close), as TCP would.
        try:
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pair.scope.cancel()
