"""End to end: the real server, the fault proxy, the client, and a wire that keeps breaking.

The same run as ``python examples/chaos.py --duration 60``, shorter. It checks the
promise of docs/protocol.md §4 and §5 in both directions: no envelope lost, doubled or
reordered, and every request's handler run exactly once, across many cuts, resets,
clean closes and blackholes.
"""

from __future__ import annotations

import trio

from examples.chaos import run_chaos


async def test_nothing_is_lost_doubled_or_reordered_while_the_wire_keeps_breaking() -> None:
    # Counts, not time: a slow machine runs longer (bounded) rather than test less.
    with trio.fail_after(300):
        report = await run_chaos(
            5.0, tasks=4, seed=3, blackhole_for=3.0, min_requests=2000, min_breaks=15
        )
    print(report)
    assert report.ok, str(report)
    assert report.sessions_lost == 0
    assert report.requests >= 2000
    assert report.pushes == report.requests
    assert report.notes >= 2000
    breaks = sum(report.faults.get(kind, 0) for kind in ("cut", "close", "blackhole"))
    assert breaks >= 15
    assert report.resumes >= 5
