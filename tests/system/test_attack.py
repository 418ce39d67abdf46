"""A quick run of some of the attack battery's cases (examples/attack.py, issue 18).

Each attack starts a real node process and attacks it for a few seconds with well-behaved
clients beside; the battery's exit code says whether every "Done when" held. The full
battery and its figures are in docs/conformance.md (``scripts/attack``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
# Tokens with NaN times, the ping flood, the idle flood, values outside the domain,
# client close codes, /api/ without the key, and no ping before welcome: about 4 s each.
QUICK_ATTACKS = "jwt-times,ping-flood,idle-flood,bad-values,close-codes,api-paths,ping-before-hello"


def test_a_quick_run_of_the_attack_battery_passes() -> None:
    done = subprocess.run(
        [sys.executable, "examples/attack.py", "--quick", "--only", QUICK_ATTACKS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("| ok |") == len(QUICK_ATTACKS.split(",")) + 1  # and overall
