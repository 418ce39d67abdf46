"""The figures of docs/scaling.md: what Redis does per unit of gateway work, and a
scaled-down run of the road to a million (2 workers and 2 Redis shards against 1 and 1).

    scripts/bench-scaling [--quick] [--no-write]

Part 1, **Redis per unit of work**: one node in this process over a private
redis-server; ``INFO commandstats`` and ``INFO cpu`` read before and after each
phase: connects (JWT users: hello, session claimed, user topic followed), a
subscription to a topic, publications to a topic with subscribers, resumes on the same
node and on another node (the session handed over through Redis), and a sustained
stream of publications for Redis's CPU per publication.

Part 2, **the scaled-down run**: ``trio-wsgate serve`` with ``--workers 1 --redis A``
and then ``--workers 2 --redis A --redis B`` (private redis-servers), each under the
benchmark's fan-out (1,000 subscribers of one topic) and idle (5,000 connections)
scenarios, the load generator pinned to CPU 1 as in bench/run.py. The workers are not
pinned: with two, they take both cores, the load generator's included, which is where
this machine and the model part (docs/scaling.md says by how much).

Part 3, **the model** of docs/scaling.md (:func:`model`): cores and Redis CPU for a
million connections and 500,000 deliveries/s, computed from parts 1 and 2.

Writes ``bench/scaling.json`` (``--no-write``: print only).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from typing import Any

import coredis
import jwt
import trio

from trio_wsgate import Config, Gateway, JwtAuthenticator, Server
from trio_wsgate.testing import free_port, open_memory_connection, wait_for_port

from . import run
from .loadgen import server_cpu
from .run import PYTHON, ROOT, gateway_command, pinned, redis_server

SECRET = "a-benchmark-secret-of-32-bytes-at-least"


async def redis_stats(port: int) -> tuple[dict[str, int], float]:
    """Calls per command (scripts' inner commands included) and Redis's CPU seconds."""
    async with coredis.Redis(port=port) as redis:
        stats = await redis.info("commandstats", "cpu")
    calls = {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name.startswith("cmdstat_") and isinstance(value, dict)
    }
    cpu = float(stats["used_cpu_sys"]) + float(stats["used_cpu_user"])
    return calls, cpu


def per(before: dict[str, int], after: dict[str, int], units: int) -> dict[str, float]:
    """Calls per unit of each command that ran (the stats' own INFO calls left out)."""
    diff = {
        name: (after.get(name, 0) - before.get(name, 0)) / units
        for name in after
        # Not the stats' own INFO, nor coredis's opening of connections (HELLO).
        if name not in ("info", "ping", "hello", "client", "select")
        and after.get(name, 0) != before.get(name, 0)
    }
    return dict(sorted(diff.items()))


def token(user: str) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


def node(url: str, name: str) -> Server:
    gateway = Gateway()
    gateway.authenticate(JwtAuthenticator(secret=SECRET))
    config = Config(
        port=0,
        node_id=name,
        redis_url=url,
        secret="s" * 32,
        admin_port=None,
        heartbeat_interval=None,
        allow_subscribe=("room:*",),
    )
    return Server(gateway, config)


# -- part 1: Redis per unit of work -------------------------------------------------------


class Phase:
    """Redis's command calls and CPU over a block, per unit of work."""

    def __init__(self, port: int, result: dict[str, Any], name: str) -> None:
        self.port, self.result, self.name = port, result, name

    async def __aenter__(self) -> Phase:
        self.calls, self.cpu = await redis_stats(self.port)
        return self

    async def done(self, units: int) -> None:
        calls, cpu = await redis_stats(self.port)
        self.result[self.name] = {
            "commands": per(self.calls, calls, units),
            "redis_cpu_us": (cpu - self.cpu) / units * 1e6,
        }

    async def __aexit__(self, *exc: object) -> None:
        pass


async def redis_costs(quick: bool) -> dict[str, Any]:
    units = 50 if quick else 500
    stream = 2_000 if quick else 20_000
    result: dict[str, Any] = {}
    with redis_server() as (url, port, _):
        a, b = node(url, "a"), node(url, "b")
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            await nursery.start(a.serve)
            await nursery.start(b.serve)
            clients, welcomes = [], []
            async with Phase(port, result, "connect") as phase:
                # hello with a JWT: the session claimed, its user topic followed.
                for i in range(units):
                    client = await stack.enter_async_context(open_memory_connection(a, nursery))
                    welcomes.append(await client.hello(token=token(f"user-{i}")))
                    clients.append(client)
                await phase.done(units)
            async with Phase(port, result, "first_subscription") as phase:
                # Topics the node follows for the first time: one of its own each.
                for i, client in enumerate(clients):
                    await client.send({"type": "sub", "seq": 1, "topic": f"room:own-{i}"})
                    await client.recv_type("reply")
                await phase.done(units)
            async with Phase(port, result, "further_subscription") as phase:
                # A topic the node already follows, by one session more each time.
                for client in clients:
                    await client.send({"type": "sub", "seq": 2, "topic": "room:first"})
                    await client.recv_type("reply")
                await phase.done(units)
            async with Phase(port, result, "publication") as phase:
                # Each delivered to every subscriber (one node): Redis's work is per
                # publication and per node listening, never per delivery.
                publications = 20
                for n in range(publications):
                    await a.gateway.publish("room:first", n)
                for client in clients:
                    for _ in range(publications):
                        await client.recv_type("msg")
                await phase.done(publications)
            async with Phase(port, result, "resume_same_node") as phase:
                for welcome in welcomes[: units // 2]:
                    await resume(a, nursery, welcome)
                await phase.done(units // 2)
            async with Phase(port, result, "resume_other_node") as phase:
                # The session handed over through Redis from the node that holds it.
                for welcome in welcomes:
                    await resume(b, nursery, welcome)
                await phase.done(units)
            nursery.cancel_scope.cancel()
        # A sustained stream, 8 publishers at once: Redis's CPU per publication with no
        # node listening, and with 4 nodes listening to every topic.
        for listening in (0, 4):
            result[f"stream_{listening}_nodes_listening"] = await publish_stream(
                url, port, stream, listening
            )
    return result


async def resume(server: Server, nursery: trio.Nursery, welcome: dict[str, Any]) -> None:
    resume = {"session": welcome["session"], "token": welcome["resume_token"], "ack": 0}
    async with open_memory_connection(server, nursery) as client:
        back = await client.hello(token=token(welcome["user"]), resume=resume)
        assert back["resumed"] is True, back


async def publish_stream(url: str, port: int, count: int, listening: int) -> dict[str, Any]:
    topics = [f"room:{k}" for k in range(8)]
    c = node(url, "c")
    listeners = [node(url, f"listener-{i}") for i in range(listening)]
    async with trio.open_nursery() as nursery:
        for server in [c, *listeners]:
            await nursery.start(server.serve)
        # Each listening node subscribed to every topic (its broker, with no session:
        # Redis's work is the same, and no client of this process has to keep up).
        for server in listeners:
            for topic in topics:
                await server.hub.broker.subscribe(topic)
        _, cpu_before = await redis_stats(port)
        started = time.monotonic()

        async def publisher(topic: str) -> None:
            for n in range(count // len(topics)):
                await c.gateway.publish(topic, n)

        async with trio.open_nursery() as publishers:
            for topic in topics:
                publishers.start_soon(publisher, topic)
        seconds = time.monotonic() - started
        _, cpu_after = await redis_stats(port)
        nursery.cancel_scope.cancel()
    used = cpu_after - cpu_before
    return {
        "publications": count,
        "nodes_listening": listening,
        "seconds": seconds,
        "publications_per_s": count / seconds,
        "redis_cpu_us_per_publication": used / count * 1e6,
        "redis_cpu_per_10k_publications_per_s": used / count * 10_000,
    }


# -- part 2: the scaled-down run ----------------------------------------------------------


@contextmanager
def gateway(workers: int, urls: list[str]) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port, admin = free_port(), free_port()
    flags = ["--workers", str(workers)]
    for url in urls:
        flags += ["--redis", url]
    env = {**os.environ, "WSGATE_SECRET": "s" * 32}
    process = subprocess.Popen(
        gateway_command(port, admin, *flags),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, 60, process)
        deadline = time.monotonic() + 60
        while True:  # every worker ready
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=5) as r:
                    if r.status == 200 and b"degraded" not in r.read():
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not become ready")
            time.sleep(0.2)
        yield f"ws://127.0.0.1:{port}/ws", process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def loadgen(
    scenario: str, url: str, process: subprocess.Popen[bytes], **options: Any
) -> dict[str, Any]:
    """bench/run.py's load generator against ``trio-wsgate serve`` at ``url``, measuring
    the process and its workers (``--server-tree``)."""
    target = run.Server("gateway-json", process, url, "json")
    return run.loadgen(scenario, target, server_tree=True, **options)


#: The configurations of the scaled-down run: (workers, Redis instances); 0 Redis is
#: the in-memory broker, one process.
CONFIGURATIONS = [(1, 0), (1, 1), (2, 2)]


def scaled_run(quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    idle_count = 1000 if quick else 5000
    timing = {"warmup": 0.5 if quick else 1.0, "duration": 1.0 if quick else 5.0}
    fanouts = {
        # One topic of 1,000 subscribers; and 100 topics of 10 (Centrifugo's group
        # channels), the publisher going round them, 100 publications in flight (within
        # the protocol window of its connection).
        "fanout_one_topic": {"connections": 1000, **timing},
        "fanout_groups_of_10": {"connections": 1000, "group": 10, "outstanding": 100, **timing},
    }
    for workers, redises in CONFIGURATIONS:
        with redis_server() as first, redis_server() as second:
            shards = [first, second][:redises]
            urls = [url for url, _, _ in shards]
            key = f"{workers} worker(s), " + (f"{redises} Redis" if redises else "in memory")
            entry: dict[str, Any] = {}
            for scenario, options in fanouts.items():
                with gateway(workers, urls) as (url, process):
                    redis_cpu = sum(server_cpu(redis.pid) for _, _, redis in shards)
                    started = time.monotonic()
                    entry[scenario] = loadgen("fanout", url, process, **options)
                    wall = time.monotonic() - started  # connecting and warming up too
                    used = sum(server_cpu(redis.pid) for _, _, redis in shards) - redis_cpu
                    entry[scenario]["redis_cpu_whole_run"] = used / wall
            with gateway(workers, urls) as (url, process):
                # Connections opened, said hello to and closed, as fast as they go.
                entry["churn"] = loadgen(
                    "churn",
                    url,
                    process,
                    connections=50,
                    duration=1.0 if quick else 5.0,
                )
            with gateway(workers, urls) as (url, process):
                entry["idle"] = loadgen(
                    "idle",
                    url,
                    process,
                    connections=idle_count,
                    warmup=1.0 if quick else 3.0,
                    duration=1.0 if quick else 5.0,
                )
            results[key] = entry
            one, groups, idle = (
                entry[k] for k in ("fanout_one_topic", "fanout_groups_of_10", "idle")
            )
            print(
                f"  {key}: deliveries/s {one['deliveries_per_s']:,.0f} (one topic, gateway "
                f"CPU {one['server_cpu']:.2f}), {groups['deliveries_per_s']:,.0f} (groups of "
                f"10, gateway CPU {groups['server_cpu']:.2f}, p99 {groups['p99_ms']:.0f} ms); "
                f"generator busy {one['generator_busy']:.2f}/{groups['generator_busy']:.2f}; "
                f"idle {idle['still_open']:,} held, {idle['kib_per_connection']:.1f} KiB each; "
                f"churn {entry['churn']['cycles_per_s']:,.0f} connects/s",
                flush=True,
            )
    return results


# -- part 3: the model of docs/scaling.md -------------------------------------------------

#: Centrifugo's published run: connections, deliveries/s in groups of GROUP, connects/s.
CONNECTIONS, DELIVERIES, GROUP, CONNECTS = 1_000_000, 500_000, 10, 200_000 / 60
#: Of the extra CPU a publication costs a worker through Redis, the shares of the
#: publishing side (its Redis command) and of each receiving worker (reading it back
#: from pub/sub): 30 % and 8 % of a worker in a py-spy profile of the groups-of-10
#: run through Redis (taken while writing this; not part of the script).
PUBLISH_SHARE, RECEIVE_SHARE = 30 / 38, 8 / 38
#: The CPU 19,800 idle connections with heartbeats took (docs/benchmarks.md).
IDLE_CPU_PER_CONNECTION = 0.04 / 19_800
#: Estimated, not measured: Redis CPU per key write of the 20-second refresh of
#: session ownership (one per session) and presence (one per subscription).
REFRESH_US_PER_WRITE, REFRESH_SECONDS = 1.5, 20


def model(results: dict[str, Any]) -> dict[str, Any]:
    """Cores and Redis CPU for :data:`CONNECTIONS` and :data:`DELIVERIES`, from the
    figures of this run (docs/scaling.md explains each step)."""
    runs = results["scaled_run"]
    memory, redis = runs["1 worker(s), in memory"], runs["1 worker(s), 1 Redis"]
    publications = DELIVERIES / GROUP
    # A publication's CPU on one worker, all its subscribers there: in memory, and
    # through Redis; the difference is the Redis path, split publish/receive.
    in_memory = GROUP / memory["fanout_groups_of_10"]["deliveries_per_s"]
    through_redis = GROUP / redis["fanout_groups_of_10"]["deliveries_per_s"]
    publish = (through_redis - in_memory) * PUBLISH_SHARE
    receive = (through_redis - in_memory) * RECEIVE_SHARE
    workers = 100.0  # a first guess; the receivers per publication depend on it
    for _ in range(20):
        receivers = workers * (1 - (1 - 1 / workers) ** GROUP)
        per_publication = in_memory + publish + receivers * receive
        delivery_cores = publications * per_publication
        connect_cores = CONNECTS / redis["churn"]["cycles_per_s"]
        idle_cores = CONNECTIONS * IDLE_CPU_PER_CONNECTION
        workers = delivery_cores + connect_cores + idle_cores
    costs = results["redis_costs"]
    quiet, busy = costs["stream_0_nodes_listening"], costs["stream_4_nodes_listening"]
    base_us = quiet["redis_cpu_us_per_publication"]
    per_node_us = max(0.0, (busy["redis_cpu_us_per_publication"] - base_us) / 4)
    publication_cpu = publications * (base_us + receivers * per_node_us) / 1e6
    # A connection follows its user topic (in the connect) and its group topic: the
    # first follower of it on its worker for as many of a group's members as there
    # are workers among them.
    first = receivers / GROUP
    subscribe_us = (
        first * costs["first_subscription"]["redis_cpu_us"]
        + (1 - first) * costs["further_subscription"]["redis_cpu_us"]
    )
    connect_cpu = CONNECTS * (costs["connect"]["redis_cpu_us"] + subscribe_us) / 1e6
    refresh_cpu = 3 * CONNECTIONS / REFRESH_SECONDS * REFRESH_US_PER_WRITE / 1e6
    resume_wave_cpu = CONNECTS * costs["resume_other_node"]["redis_cpu_us"] / 1e6
    rss = redis["idle"]["rss_before"]
    return {
        "us_per_publication_in_memory": in_memory * 1e6,
        "us_per_publication_through_redis": through_redis * 1e6,
        "us_publish_side": publish * 1e6,
        "us_per_receiving_worker": receive * 1e6,
        "workers_receiving_each_publication": receivers,
        "us_per_publication_at_scale": per_publication * 1e6,
        "delivery_cores": delivery_cores,
        "connect_cores": connect_cores,
        "idle_cores": idle_cores,
        "workers": workers,
        "memory_gib": (CONNECTIONS * redis["idle"]["kib_per_connection"] * 1024 + workers * rss)
        / 2**30,
        "redis_us_per_publication": base_us,
        "redis_us_per_listening_node": per_node_us,
        "redis_publication_cpu": publication_cpu,
        "redis_connect_cpu": connect_cpu,
        "redis_refresh_cpu_estimate": refresh_cpu,
        "redis_cpu": publication_cpu + connect_cpu + refresh_cpu,
        "redis_resume_wave_cpu": resume_wave_cpu,
    }


_SPIN = """
import time
n, end = 0, time.perf_counter() + 3
while time.perf_counter() < end:
    for _ in range(10000):
        n += 1
print(n)
"""


def machine_parallelism() -> dict[str, float]:
    """How much more a second busy core adds here: a CPU-bound loop alone on CPU 0, then
    one on each CPU at once (a VM's two vCPUs may share a physical core)."""

    def spin(cpu: str) -> subprocess.Popen[str]:
        command = pinned(cpu, PYTHON, "-c", _SPIN)
        return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)

    alone = int(spin("0").communicate()[0])
    pair = [spin("0"), spin("1")]
    together = sum(int(process.communicate()[0]) for process in pair)
    return {"one_core": alone, "two_cores": together, "ratio": together / alone}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--only", choices=["costs", "scaled"], help="one part")
    args = parser.parse_args()
    results: dict[str, Any] = {"machine_parallelism": machine_parallelism()}
    print(f"two busy cores do {results['machine_parallelism']['ratio']:.2f}x one", flush=True)
    if args.only in (None, "costs"):
        results["redis_costs"] = trio.run(redis_costs, args.quick)
        print(json.dumps(results["redis_costs"], indent=2), flush=True)
    if args.only in (None, "scaled"):
        results["scaled_run"] = scaled_run(args.quick)
    if args.only is None:
        results["model"] = model(results)
        print(json.dumps(results["model"], indent=2), flush=True)
    if not args.no_write:
        path = ROOT / "bench" / "scaling.json"
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
