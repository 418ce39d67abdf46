"""A short hostile-input run against the real server process (examples/hostile.py).

Bounded in time (a few seconds of attack) and count; the few-minute runs are in
docs/conformance.md.
"""

from __future__ import annotations

import pytest

from examples.hostile import run_hostile

pytestmark = pytest.mark.e2e


async def test_a_hostile_run_leaves_the_node_serving_with_nothing_leaked() -> None:
    report = await run_hostile(duration=6, workers=20, seed=7, max_attacks=2000)
    print(report)
    assert report.still_serving
    assert report.canary_calls > 10
    assert report.canary_failures == 0
    assert report.connections_after == 0
    assert report.sessions_after == 0
    assert report.tasks_after <= report.tasks_before
    assert report.internal_errors == 0
    assert report.rss_after_mib - report.rss_before_mib < 24
    # The run did what it says: every kind of attack, every kind of ending.
    assert set(report.attacks) == {
        "garbage",
        "drip",
        "big-head",
        "frames",
        "envelopes",
        "burst",
        "resume",
        "idle",
    }
    assert {"close", "fin", "reset", "linger"} <= set(report.endings)
