"""Break the wire for a minute and count: nothing lost, doubled or reordered.

    python examples/chaos.py --duration 60

This starts a gateway on a free port and puts a FaultProxy in front of it. The proxy
cuts (RST), closes (FIN), blackholes (half-open) or slows the connection every
0.2 to 0.6 s. One client goes through the proxy, with four traffic streams:

* client to server: numbered ``note`` sends (fire-and-forget) and numbered
  ``work`` requests, from several tasks at once;
* server to client: the reply to each request, and one pushed ``done`` message
  per request.

At the end the two sides' ledgers are compared: every note processed once, in the
order sent; every request's handler run exactly once and answered with its own
number; every push received once, in the order the server sent them. The handlers
sleep a little, so that drops cancel some of them half-way; those run again when the
client resends.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import trio

from trio_wsgate import Backoff, Config, Gateway, Session, open_client, serve
from trio_wsgate.testing import FaultProxy


@dataclass
class Ledger:
    """What each side saw."""

    notes_sent: list[int] = field(default_factory=list)
    notes_seen: list[int] = field(default_factory=list)
    runs: list[tuple[int, int]] = field(default_factory=list)  # (task, n) per completed run
    replies: list[tuple[int, int, Any]] = field(default_factory=list)  # (task, n, data)
    pushes_sent: list[list[int]] = field(default_factory=list)
    pushes_seen: list[list[int]] = field(default_factory=list)


@dataclass
class Report:
    """The verdict, one number per way to fail. All zero is a pass."""

    duration: float
    notes: int
    requests: int
    pushes: int
    faults: dict[str, int]
    connections: int
    resumes: int
    sessions_lost: int
    lost: int
    duplicated: int
    reordered: int
    wrong_replies: int

    @property
    def ok(self) -> bool:
        """True if nothing was lost, doubled, reordered or mismatched."""
        return not (self.lost or self.duplicated or self.reordered or self.wrong_replies)

    def __str__(self) -> str:
        faults = ", ".join(f"{n} {kind}" for kind, n in sorted(self.faults.items()))
        return (
            f"{self.duration:.0f} s through the fault proxy ({faults}; "
            f"{self.connections} connections, {self.resumes} resumes, "
            f"{self.sessions_lost} sessions lost)\n"
            f"  client to server: {self.notes} notes, {self.requests} requests\n"
            f"  server to client: {self.requests} replies, {self.pushes} pushes\n"
            f"  lost {self.lost}, duplicated {self.duplicated}, reordered {self.reordered}, "
            f"wrong replies {self.wrong_replies}"
        )


def make_gateway(ledger: Ledger, rng: random.Random) -> Gateway:
    """The server side: handlers that write into the ledger."""
    gateway = Gateway()

    @gateway.on("note")
    async def note(session: Session, data: int) -> None:
        ledger.notes_seen.append(data)

    @gateway.on("work")
    async def work(session: Session, data: list[int]) -> list[int]:
        task, n = data
        # A checkpoint, now and then a short wait: a drop may cancel us here.
        await trio.sleep(rng.uniform(0, 0.002) if n % 8 == 0 else 0)
        ledger.runs.append((task, n))
        ledger.pushes_sent.append([task, n])
        session.send("done", [task, n])
        return data

    return gateway


def _reordered(seen: list[Any]) -> int:
    return sum(1 for a, b in itertools.pairwise(seen) if b < a)


def _compare(sent: list[Any], seen: list[Any]) -> tuple[int, int, int]:
    """(lost, duplicated, reordered) of a stream that should arrive as sent."""
    counts = Counter(map(tuple, seen) if seen and isinstance(seen[0], list) else seen)
    wanted = Counter(map(tuple, sent) if sent and isinstance(sent[0], list) else sent)
    lost = sum((wanted - counts).values())
    duplicated = sum((counts - wanted).values())
    reordered = (
        0 if lost or duplicated else sum(1 for a, b in zip(sent, seen, strict=True) if a != b)
    )
    return lost, duplicated, reordered


async def run_chaos(
    duration: float = 60.0,
    *,
    tasks: int = 4,
    seed: int = 1,
    blackhole_for: float = 3.0,
    min_requests: int = 0,
    min_breaks: int = 0,
) -> Report:
    """Run server, proxy and client; return the report.

    The traffic goes on for at least ``duration`` seconds, and until ``min_requests``
    requests were answered and the proxy broke the wire ``min_breaks`` times (cut,
    close or blackhole): a slow machine runs longer rather than test less.
    """
    rng = random.Random(seed)
    ledger = Ledger()
    config = Config(
        port=0,
        admin_port=None,
        heartbeat_interval=0.5,
        heartbeat_timeout=0.5,
        close_timeout=0.5,
        hello_timeout=2.0,
    )
    stats: dict[str, Any] = {}
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve, make_gateway(ledger, rng), config)
        host, port = server.listen_addresses[0]
        proxy = FaultProxy(host, port, seed=seed)
        await nursery.start(proxy.serve)
        nursery.start_soon(lambda: proxy.chaos(blackhole_for=blackhole_for))
        backoff = Backoff(base=0.05, cap=0.5, reset_after=1.0)
        url = f"ws://127.0.0.1:{proxy.port}/ws"
        async with open_client(url, backoff=backoff, seed=seed, close_timeout=30) as client:
            stop = trio.current_time() + duration

            def going() -> bool:
                breaks = sum(
                    proxy.stats.faults.get(kind, 0) for kind in ("cut", "close", "blackhole")
                )
                return (
                    trio.current_time() < stop
                    or len(ledger.replies) < min_requests
                    or breaks < min_breaks
                )

            async def noter() -> None:
                n = 0
                while going():
                    ledger.notes_sent.append(n)
                    await client.send("note", n)
                    n += 1
                    if n % 10 == 0:
                        await trio.sleep(0.01)  # leave room for the requests

            async def requester(task: int) -> None:
                n = 0
                while going():
                    reply = await client.request("work", [task, n])
                    ledger.replies.append((task, n, reply))
                    n += 1

            all_pushed = trio.Event()
            expected: list[int] = []  # the number of pushes, once the producers stop

            async def reader() -> None:
                async for message in client.messages():
                    ledger.pushes_seen.append(message.data)
                    if expected and len(ledger.pushes_seen) >= expected[0]:
                        all_pushed.set()

            async with trio.open_nursery() as inner:
                inner.start_soon(reader)
                async with trio.open_nursery() as producers:
                    producers.start_soon(noter)
                    for task in range(tasks):
                        producers.start_soon(requester, task)
                # Every request was answered; the pushes that go with them follow.
                expected.append(len(ledger.replies))
                if len(ledger.pushes_seen) < expected[0]:
                    with trio.move_on_after(60):
                        await all_pushed.wait()
                inner.cancel_scope.cancel()
            statistics = client.statistics()
            stats = {"resumes": statistics.resumes, "sessions_lost": statistics.sessions_lost}
        # Leaving the client block flushed every note (aclose); stop the rest.
        nursery.cancel_scope.cancel()

    lost, duplicated, reordered = _compare(ledger.notes_sent, ledger.notes_seen)
    runs = Counter(ledger.runs)
    wanted_runs = Counter((task, n) for task, n, _ in ledger.replies)
    lost += sum((wanted_runs - runs).values())
    duplicated += sum((runs - wanted_runs).values())
    for task in range(tasks):
        mine = [n for t, n in ledger.runs if t == task]
        reordered += _reordered(mine)
    push_lost, push_dup, push_reordered = _compare(ledger.pushes_sent, ledger.pushes_seen)
    wrong = sum(1 for task, n, data in ledger.replies if data != [task, n])
    return Report(
        duration=trio.current_time() - started,
        notes=len(ledger.notes_sent),
        requests=len(ledger.replies),
        pushes=len(ledger.pushes_seen),
        faults=dict(proxy.stats.faults),
        connections=proxy.stats.connections,
        resumes=stats["resumes"],
        sessions_lost=stats["sessions_lost"],
        lost=lost + push_lost,
        duplicated=duplicated + push_dup,
        reordered=reordered + push_reordered,
        wrong_replies=wrong,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of chaos")
    parser.add_argument("--tasks", type=int, default=4, help="concurrent requesters")
    parser.add_argument("--seed", type=int, default=1, help="seeds the faults and the jitter")
    args = parser.parse_args()
    report = trio.run(lambda: run_chaos(args.duration, tasks=args.tasks, seed=args.seed))
    print(report)
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
