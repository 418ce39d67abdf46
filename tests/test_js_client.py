"""The JavaScript client as a package: its unit tests on Node's test runner, what
``npm pack`` ships, the copy the nodes serve, and its msgpack codec against Python's.

Node.js and npm come from ``scripts/test`` (Debian's packages where missing); without
them these tests skip, unless ``WSGATE_REQUIRE_BROWSER=1`` (CI) makes them fail.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_wsgate.files import client_file
from trio_wsgate.protocol.values import MAX_SAFE_INTEGER

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clients" / "js"


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        reason = f"no {name} is installed (apt-get install {'nodejs' if name == 'node' else name})"
        if os.environ.get("WSGATE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"WSGATE_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return found


def test_the_unit_tests_pass_on_nodes_test_runner() -> None:
    done = subprocess.run(
        [tool("node"), "--test", "test/"],
        cwd=PACKAGE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    passed = int(re.search(r"^# pass (\d+)$", done.stdout, re.MULTILINE).group(1))  # type: ignore[union-attr]
    failed = int(re.search(r"^# fail (\d+)$", done.stdout, re.MULTILINE).group(1))  # type: ignore[union-attr]
    skipped = re.search(r"^# skipped (\d+)$", done.stdout, re.MULTILINE)
    assert passed >= 40
    assert failed == 0
    assert skipped is None or skipped.group(1) == "0"


def test_npm_pack_ships_the_module_its_types_and_readme() -> None:
    done = subprocess.run(
        [tool("npm"), "pack", "--dry-run", "--json", "--ignore-scripts"],
        cwd=PACKAGE,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "npm_config_update_notifier": "false", "npm_config_offline": "true"},
    )
    assert done.returncode == 0, done.stderr
    (packed,) = json.loads(done.stdout)
    files = {entry["path"] for entry in packed["files"]}
    assert files == {"package.json", "README.md", "wsgate.js", "wsgate.d.ts"}
    manifest = json.loads((PACKAGE / "package.json").read_text())
    assert (manifest["type"], manifest["types"]) == ("module", "wsgate.d.ts")
    assert not manifest.get("dependencies")  # one file a node can serve as it is


def test_the_nodes_serve_the_packages_file() -> None:
    assert client_file().text == (PACKAGE / "wsgate.js").read_text(encoding="utf-8")
    declared = (PACKAGE / "wsgate.d.ts").read_text()
    for name in ("openClient", "WsgateError", "SessionLost", "ClientClosed", "Backoff"):
        assert re.search(rf"export (declare )?(function|class|const) {name}\b", declared), name


#: The protocol's value domain (docs/protocol.md, "Values"), as both encodings carry it.
leaves = (
    st.none()
    | st.booleans()
    | st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)

ROUND_TRIP = """
import { msgpack } from "./wsgate.js";
let input = "";
process.stdin.on("data", (chunk) => { input += chunk; });
process.stdin.on("end", () => {
  const out = JSON.parse(input).map((b64) => {
    const value = msgpack.decode(new Uint8Array(Buffer.from(b64, "base64")));
    return Buffer.from(msgpack.encode(value)).toString("base64");
  });
  process.stdout.write(JSON.stringify(out));
});
"""


@settings(max_examples=1, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(values, min_size=300, max_size=300))
def test_the_bundled_msgpack_codec_agrees_with_pythons(batch: list[Any]) -> None:
    # One node process for a batch: Python packs, wsgate.js decodes and packs again,
    # Python unpacks; every value comes back equal (1.0 may come back as 1: JavaScript
    # has one number type, and the value is the same).
    sent = [base64.b64encode(msgpack.packb(value)).decode() for value in batch]
    done = subprocess.run(
        [tool("node"), "--input-type=module", "-e", ROUND_TRIP],
        cwd=PACKAGE,
        input=json.dumps(sent),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    back = [msgpack.unpackb(base64.b64decode(b64)) for b64 in json.loads(done.stdout)]
    assert back == batch
