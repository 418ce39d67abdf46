"""Scenario 6, the drain and reconnect herd: many clients of the project's client on node A;
A is drained (SIGTERM) and they all come back on node B (both nodes share Redis).

    python -m bench.herd --clients 5000 --node ws://A/ws --node ws://B/ws --drain-pid PID \\
        --admin http://B-admin --admin http://A-admin

The clients reach the nodes through a load balancer of one line (their ``connect``):
node A until it is drained, node B from then on, as a balancer that watches
``/readyz`` would route them. Every client follows the topic ``herd``, which a
publisher feeds through B's server API before, during and after the drain, and has one
request in flight when the drain starts. Counted: seconds from the drain until every
client is connected again, the peak reconnect rate, how many sessions resumed (against
lost, with the topic recovered from history instead), and messages lost or doubled:
publications missing, repeated or out of order at any client, and requests that got no
reply. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import signal
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import trio
import trio.lowlevel

from trio_wsgate import Client, HandlerError, SessionLost, open_client
from trio_wsgate.cli import tune_gc

TOPIC = "herd"


def publish(admin: str, number: int) -> bool:
    """POST /api/publish; False if the node refused it (503: it could not reach Redis in
    time), which is no loss: the publisher knows, as an application's would."""
    body = json.dumps({"topic": TOPIC, "data": {"i": number}}).encode()
    request = urllib.request.Request(
        f"{admin}/api/publish", body, {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 503:
            return False
        raise
    return True


class Herd:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.drained = False
        self.received: list[list[int]] = [[] for _ in range(args.clients)]
        self.reconnected_at: list[float | None] = [None] * args.clients
        self.replies: Counter[str] = Counter()
        self.clients: list[Client] = []
        self.published = 0
        self.accepted: list[int] = []  # the publications the API accepted
        self.refused = 0  # answered 503
        self.sub_retries = 0
        self.drained_at = 0.0
        self._changed = trio.Event()

    async def connect(self) -> trio.abc.Stream:
        node = urlsplit(self.args.node[1] if self.drained else self.args.node[0])
        return await trio.open_tcp_stream(node.hostname or "127.0.0.1", node.port or 80)

    async def run_client(self, index: int, ready: trio.Semaphore) -> None:
        async with open_client(
            self.args.node[0], connect=self.connect, seed=index, connect_timeout=30
        ) as client:
            self.clients.append(client)
            await client.wait_connected()
            await self.subscribe(client)
            ready.release()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.follow, index, client)
                nursery.start_soon(self.watch, index, client)
                await self.request_at_drain(index, client)
                await trio.sleep_forever()

    async def subscribe(self, client: Client) -> None:
        """As an application would: a node too busy to ask Redis in time says
        ``unavailable``, and the subscription is asked for again after a pause."""
        for attempt in range(20):
            try:
                await client.subscribe(TOPIC)
                return
            except HandlerError as exc:
                if exc.code != "unavailable" or attempt == 19:
                    raise
                self.sub_retries += 1
                await trio.sleep(0.5)

    async def follow(self, index: int, client: Client) -> None:
        async for message in client.messages():
            if message.topic == TOPIC:
                self.received[index].append(message.data["i"])
                self.changed()

    async def watch(self, index: int, client: Client) -> None:
        """When this client is connected again after the drain."""
        async for _ in client.state_changes():
            if self.drained and client.connected:
                self.reconnected_at[index] = time.monotonic()
                self.changed()
                return

    async def request_at_drain(self, index: int, client: Client) -> None:
        await self.drain_started.wait()
        try:
            answer = await client.request("echo", index)
            self.replies["right" if answer == index else "wrong"] += 1
        except SessionLost:
            self.replies["lost"] += 1
        self.changed()

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, done: Callable[[], bool], deadline: float) -> None:
        """Until ``done()``, checked at every change, or until ``deadline`` (monotonic)."""
        with trio.move_on_after(max(0.0, deadline - time.monotonic())):
            while not done():
                await self._changed.wait()

    async def publisher(self, stop: trio.Event) -> None:
        rate = self.args.publish_rate
        admin = self.args.admin[0]
        while not stop.is_set():
            self.published += 1
            if await trio.to_thread.run_sync(publish, admin, self.published):
                self.accepted.append(self.published)
            else:
                self.refused += 1
            await trio.sleep(1 / rate)

    async def main(self) -> dict[str, Any]:
        args = self.args
        self.drain_started = trio.Event()
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        ready = trio.Semaphore(args.clients, max_value=args.clients)
        for _ in range(args.clients):
            ready.acquire_nowait()
        result: dict[str, Any] = {"clients": args.clients}
        async with trio.open_nursery() as nursery:
            started = time.monotonic()
            for index in range(args.clients):
                nursery.start_soon(self.run_client, index, ready)
                if index % 100 == 99:
                    await trio.lowlevel.checkpoint()
            for _ in range(args.clients):
                await ready.acquire()
            result["connect_all_s"] = time.monotonic() - started
            stop = trio.Event()
            nursery.start_soon(self.publisher, stop)
            await trio.sleep(1.0)
            # The drain: A turns away new connections (the balancer stops sending them
            # there) and closes its own with 1001.
            self.drained = True
            self.drained_at = time.monotonic()
            cpu_at_drain = resource.getrusage(resource.RUSAGE_SELF)
            os.kill(args.drain_pid, signal.SIGTERM)
            self.drain_started.set()
            await self.wait_until(
                lambda: None not in self.reconnected_at,
                self.drained_at + args.drain_timeout + 10 + 20,
            )
            back = sorted(at - self.drained_at for at in self.reconnected_at if at is not None)
            result["reconnected"] = len(back)
            result["resumed_within_s"] = back[-1] if back else None
            for q in (50, 90, 99):
                result[f"resumed_p{q}_s"] = back[len(back) * q // 100] if back else None
            # The generator's own busy share from the drain until the last was back: near
            # 1, the clients (not the nodes) set the pace of the herd.
            usage = resource.getrusage(resource.RUSAGE_SELF)
            result["generator_busy_in_herd"] = (
                usage.ru_utime + usage.ru_stime - cpu_at_drain.ru_utime - cpu_at_drain.ru_stime
            ) / max(time.monotonic() - self.drained_at, 1e-9)
            await trio.sleep(1.0)
            stop.set()
            await trio.sleep(0.5)
            # Every publication the API accepted reaches every client.
            await self.wait_until(
                lambda: (
                    all(len(got) >= len(self.accepted) for got in self.received)
                    and sum(self.replies.values()) >= args.clients
                ),
                time.monotonic() + 20,
            )
            nursery.cancel_scope.cancel()
        expected = set(self.accepted)
        missing = sum(len(expected - set(got)) for got in self.received)
        doubled = sum(len(got) - len(set(got)) for got in self.received)
        disordered = sum(got != sorted(got) for got in self.received)
        buckets = Counter(int((at - self.drained_at) * 10) for at in self.reconnected_at if at)
        stats = [client.statistics() for client in self.clients]
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result.update(
            drain_timeout=args.drain_timeout,
            publications=len(self.accepted),
            publications_refused=self.refused,
            missing=missing,
            doubled=doubled,
            disordered=disordered,
            requests=dict(self.replies),
            lost=missing
            + doubled
            + disordered
            + self.replies["lost"]
            + self.replies["wrong"]
            + (args.clients - sum(self.replies.values())),
            peak_reconnects_per_s=max(buckets.values(), default=0) * 10,
            # Clients back in each second after the drain.
            reconnects_by_second=[
                sum(buckets[tenth] for tenth in range(10 * second, 10 * second + 10))
                for second in range(max(buckets, default=0) // 10 + 1)
            ],
            connects=sum(s.connects for s in stats),
            sub_retries=self.sub_retries,
            sessions_resumed=sum(s.resumes > 0 for s in stats),
            sessions_lost=sum(s.sessions_lost > 0 for s in stats),
            generator_cpu_s=usage.ru_utime + usage.ru_stime - cpu.ru_utime - cpu.ru_stime,
        )
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--node", action="append", required=True, help="A, then B")
    parser.add_argument("--admin", action="append", required=True, help="B's, then A's")
    parser.add_argument("--drain-pid", type=int, required=True)
    parser.add_argument("--drain-timeout", type=float, default=10.0)
    parser.add_argument("--publish-rate", type=float, default=20.0)
    args = parser.parse_args()
    # The generator's own time in the cyclic collector: 5,000 clients are a large heap.
    collecting = [0.0, 0.0]  # total, started at

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collecting[1] = time.perf_counter()
        else:
            collecting[0] += time.perf_counter() - collecting[1]

    gc.callbacks.append(timed)
    # As the node does: at the defaults the collector walked the 5,000 clients' objects
    # over and over, 70% of the generator's CPU in the herd (docs/benchmarks.md).
    tune_gc()
    result = trio.run(Herd(args).main)
    result["generator_gc_s"] = collecting[0]
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
