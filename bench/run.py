"""Run the benchmark: every scenario, the gateway and its peers in the same run.

    scripts/bench [--quick] [--only SCENARIO ...] [--no-write]

The server under test is pinned to CPU 0 and the load generator (bench/loadgen.py) to
CPU 1 with ``taskset``. Each scenario runs the gateway and the peers (bench/peers.py)
one after the other on the same machine, so that the ratios between them hold even
when the machine is noisy. The figures go to ``bench/results.json``, and the tables and
plots to ``docs/benchmarks.md`` and ``docs/img/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from trio_wsgate.testing import free_port, wait_for_port

from .loadgen import server_rss

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SERVER_CPU, GENERATOR_CPU = "0", "1"
ECHO_PEERS = ["raw", "websockets-trio", "trio-websocket", "hypercorn-trio", "websockets-asyncio"]
BROADCAST_PEERS = ["websockets-asyncio", "websockets-trio", "trio-websocket"]
GATEWAY = ["gateway-json", "gateway-msgpack"]
# The same gateway to clients of protocol version 2 (docs/protocol.md §14), where a
# publication is one unsequenced pub for every subscriber: the fan-out scenarios.
GATEWAY_V2 = ["gateway-json-v2", "gateway-msgpack-v2"]
# --quick measures the gateway against the peers its targets name, and nothing else.
QUICK_PEERS = ["trio-websocket", "websockets-asyncio"]
FANOUT_QUICK = ["gateway-json", "gateway-json-v2", "websockets-asyncio"]


def pinned(cpu: str, *command: str) -> list[str]:
    return ["taskset", "-c", cpu, *command] if shutil.which("taskset") else list(command)


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    proto: str
    admin: str | None = None
    version: int = 1  # the wsgate protocol version its clients speak

    @property
    def pid(self) -> int:
        return self.process.pid

    def metric(self, name: str) -> float:
        assert self.admin is not None
        with urllib.request.urlopen(f"{self.admin}/metrics", timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def tasks(self) -> float:
        """``wsgate_tasks``, the least of five reads: hypercorn's handling of the
        admin request itself adds a task to some reads (19 or 20 on an idle node)."""
        reads = []
        for _ in range(5):
            reads.append(self.metric("wsgate_tasks"))
            time.sleep(0.1)
        return min(reads)


def gateway_command(port: int, admin_port: int, *flags: str) -> list[str]:
    return [
        PYTHON,
        "-m",
        "trio_wsgate",
        "serve",
        "--app",
        "bench/app.py:gateway",
        "--port",
        str(port),
        "--admin-port",
        str(admin_port),
        "--open-api",
        "--log-level",
        "warning",
        "--max-handshakes",
        "100000",
        "--max-handshakes-per-ip",  # every storm comes from 127.0.0.1
        "100000",
        "--allow-subscribe",
        "bench",
        "--allow-subscribe",
        "bench.*",
        "--allow-subscribe",
        "herd",
        *flags,
    ]


@contextmanager
def server(name: str, *flags: str, log: Path | None = None) -> Iterator[Server]:
    """Start the gateway (``gateway-json``/``gateway-msgpack``) or a peer, pinned to CPU 0."""
    port = free_port()
    admin = None
    if name.startswith("gateway"):
        admin_port = free_port()
        command = gateway_command(port, admin_port, *flags)
        url, proto = f"ws://127.0.0.1:{port}/ws", name.split("-")[1]
        admin = f"http://127.0.0.1:{admin_port}"
    else:
        command = [PYTHON, "-m", "bench.peers", name, "--port", str(port)]
        url, proto = f"ws://127.0.0.1:{port}/", "echo"
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(pinned(SERVER_CPU, *command), cwd=ROOT, stdout=out, stderr=out)
    try:
        wait_for_port(port, 30, process)
        version = 2 if name.endswith("-v2") else 1
        yield Server(name, process, url, proto, admin, version)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log:
            out.close()  # type: ignore[union-attr]


@contextmanager
def redis_server() -> Iterator[tuple[str, int, subprocess.Popen[bytes]]]:
    """A redis-server on a free port of 127.0.0.1 that keeps nothing: (url, port, process)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("needs redis-server (scripts/bench, scripts/bench-scaling install it)")
    port = free_port()
    scratch = tempfile.mkdtemp(prefix="wsgate-bench-redis-")
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            scratch,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, 30, process)
        yield f"redis://127.0.0.1:{port}/0", port, process
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(scratch, ignore_errors=True)


def loadgen(scenario: str, target: Server, **options: Any) -> dict[str, Any]:
    command = [
        PYTHON,
        "-m",
        "bench.loadgen",
        scenario,
        "--url",
        target.url,
        "--proto",
        target.proto,
        "--protocol-version",
        str(target.version),
        "--server-pid",
        str(target.pid),
    ]
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        command += [flag] if value is True else [flag, str(value)]  # True: a bare flag
    done = subprocess.run(
        pinned(GENERATOR_CPU, *command), cwd=ROOT, capture_output=True, timeout=900, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"loadgen {scenario} on {target.name} failed:\n{done.stderr.decode()}")
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


def show(scenario: str, name: str, result: dict[str, Any], *keys: str) -> None:
    figures = ", ".join(
        f"{key}={result[key]:,.2f}" for key in keys if isinstance(result.get(key), int | float)
    )
    print(f"  {scenario:<8} {name:<20} {figures}", flush=True)


# -- the scenarios ---------------------------------------------------------------------------


def request_reply(quick: bool) -> dict[str, Any]:
    """Scenario 1: 100 connections, 8 in flight each, 64-byte payloads."""
    options = {"connections": 100, "inflight": 8, "warmup": 0.3 if quick else 1.0}
    options["duration"] = 1.0 if quick else 5.0
    results = {}
    for name in GATEWAY + (QUICK_PEERS if quick else ECHO_PEERS):
        with server(name) as target:
            results[name] = loadgen("rr", target, **options)
        show("rr", name, results[name], "requests_per_s", "server_cpu", "generator_busy")
    return results


def latency(quick: bool) -> dict[str, Any]:
    """Scenario 2: 5,000 requests/s over 100 connections; reply latency."""
    options = {"connections": 100, "rate": 5000, "warmup": 0.3 if quick else 1.0}
    options["duration"] = 1.0 if quick else 10.0
    results = {}
    for name in GATEWAY + (QUICK_PEERS[1:] if quick else ECHO_PEERS):
        with server(name) as target:
            results[name] = loadgen("latency", target, **options)
        show("latency", name, results[name], "p50_ms", "p99_ms", "p999_ms", "server_cpu")
    return results


def fanout(quick: bool) -> dict[str, Any]:
    """Scenario 3: 1,000 and 10,000 subscribers of one topic."""
    results: dict[str, Any] = {}
    for subscribers in [1000] if quick else [1000, 10000]:
        options = {"connections": subscribers, "warmup": 0.3 if quick else 1.0}
        options["duration"] = 1.0 if quick else 5.0
        names = FANOUT_QUICK if quick else GATEWAY + GATEWAY_V2 + BROADCAST_PEERS
        for name in names:
            key = f"{name}@{subscribers}"
            with server(name) as target:
                results[key] = loadgen("fanout", target, **options)
            show("fanout", key, results[key], "deliveries_per_s", "p99_ms", "generator_busy")
    return results


def burst(quick: bool) -> dict[str, Any]:
    """Scenario 3b: fan-out to 1,000 subscribers, the publisher keeping 200 publications
    undelivered (bursts: the node can coalesce what it writes to each subscriber)."""
    results: dict[str, Any] = {}
    options = {"connections": 1000, "outstanding": 200, "warmup": 0.3 if quick else 1.0}
    options["duration"] = 1.0 if quick else 5.0
    for name in FANOUT_QUICK if quick else GATEWAY + GATEWAY_V2 + BROADCAST_PEERS:
        with server(name) as target:
            results[name] = loadgen("fanout", target, **options)
        show("burst", name, results[name], "deliveries_per_s", "p99_ms", "generator_busy")
    return results


def connection_ceiling() -> int:
    """How many connections one process can hold here: the hard limit on open files."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return hard - 200  # the listener, the admin port, epoll, logs, Python's own


def idle(quick: bool) -> dict[str, Any]:
    """Scenario 4: 5,000 and 20,000 idle connections with heartbeats on."""
    results: dict[str, Any] = {}
    ceiling = connection_ceiling()
    counts = [500] if quick else [5000, min(20000, ceiling)]
    for count in counts:
        options = {"connections": count, "warmup": 0.5 if quick else 3.0}
        options["duration"] = 1.0 if quick else 30.0
        names = ["gateway-json", "websockets-asyncio"]
        for name in names if quick else [*names, "raw", "trio-websocket"]:
            key = f"{name}@{count}"
            with server(name) as target:
                results[key] = loadgen("idle", target, **options)
            show("idle", key, results[key], "kib_per_connection", "server_cpu", "open_seconds")
    return results


def churn(quick: bool) -> dict[str, Any]:
    """Scenario 5: connections opened and closed as fast as they go; the node's tasks and
    RSS before and after."""
    results: dict[str, Any] = {}
    duration = 1.0 if quick else 30.0
    names = ["gateway-json", "websockets-asyncio"]
    for name in names if quick else [*names, "raw", "trio-websocket"]:
        with server(name) as target:
            gateway = target.admin is not None
            if gateway:
                # One warm-up round, so that "before" is the node after its first
                # connections (imports, caches), as in production.
                loadgen("churn", target, connections=20, duration=0.5 if quick else 1.0)
                time.sleep(0.5 if quick else 1.0)
                tasks_before = target.tasks()
                rss_before = server_rss(target.pid)
            result = loadgen("churn", target, connections=50, duration=duration)
            if gateway:
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:  # closes are bounded by close_timeout
                    if target.metric("wsgate_connections_open") == 0:
                        break
                    time.sleep(0.2)
                time.sleep(1.0)
                result.update(
                    tasks_before=tasks_before,
                    tasks_after=target.tasks(),
                    sessions_after=target.metric("wsgate_sessions"),
                    rss_before=rss_before,
                    rss_after=server_rss(target.pid),
                )
            results[name] = result
        show("churn", name, result, "cycles_per_s", "tasks_before", "tasks_after", "failures")
    return results


def herd(quick: bool) -> dict[str, Any]:
    """Scenario 6: drain a node under clients of the project's client; they resume on a
    second node through Redis. Counted: time until all resumed, peak reconnect rate, lost."""
    clients = 100 if quick else 5000
    drain_timeout = 10.0
    with tempfile.TemporaryDirectory() as workdir, redis_server() as (redis_url, _, _):
        secret = os.urandom(16).hex()
        flags = [
            "--redis",
            redis_url,
            "--secret",
            secret,
            "--drain-timeout",
            str(drain_timeout),
        ]
        log = Path(workdir) / "nodes.log"
        with (
            server("gateway-json", *flags, "--node-id", "a", log=log) as a,
            server("gateway-json", *flags, "--node-id", "b", log=log) as b,
        ):
            command = [
                PYTHON,
                "-m",
                "bench.herd",
                "--clients",
                str(clients),
                "--node",
                a.url,
                "--node",
                b.url,
                "--drain-pid",
                str(a.pid),
                "--admin",
                b.admin or "",
                "--admin",
                a.admin or "",
                "--drain-timeout",
                str(drain_timeout),
            ]
            done = subprocess.run(
                pinned(GENERATOR_CPU, *command),
                cwd=ROOT,
                capture_output=True,
                timeout=600,
                check=False,
            )
        if done.returncode != 0:
            print(log.read_text()[-4000:], file=sys.stderr)
            raise RuntimeError(f"the herd failed:\n{done.stderr.decode()[-4000:]}")
        result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
        # Times a node declared Redis down: under the herd it never should be.
        result["redis_declared_down"] = log.read_text().count("Redis is unreachable")
    print(f"  herd     {json.dumps(result)}", flush=True)
    return {"gateway-json": result}


SCENARIOS = {
    "rr": request_reply,
    "latency": latency,
    "fanout": fanout,
    "burst": burst,
    "idle": idle,
    "churn": churn,
    "herd": herd,
}


def machine() -> dict[str, Any]:
    versions = {}
    for package in [
        "trio",
        "websockets",
        "trio-websocket",
        "hypercorn",
        "msgpack",
        "picows",
        "uvloop",
        "trio-wsgate",
    ]:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, check=False
        )
        .stdout.decode()
        .strip()
    )
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        "versions": versions,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, under a minute")
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), help="these scenarios")
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave results.json and docs"
    )
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results.json")
    args = parser.parse_args()
    started = time.monotonic()
    results: dict[str, Any] = {"quick": args.quick, "machine": machine(), "scenarios": {}}
    for name in args.only or list(SCENARIOS):
        print(f"{name}:", flush=True)
        results["scenarios"][name] = SCENARIOS[name](args.quick)
    results["seconds"] = time.monotonic() - started

    from .report import report, targets

    results["targets"] = targets(results["scenarios"])
    for target in results["targets"]:
        mark = "met" if target["met"] else "NOT MET"
        print(f"  {mark:<8} {target['target']}: {target['figure']}")
    if not args.no_write:
        args.results.write_text(json.dumps(results, indent=2) + "\n")
        report(results, ROOT / "docs")
        print(f"wrote {args.results.relative_to(ROOT)}, docs/benchmarks.md and docs/img/")
    print(f"{results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
