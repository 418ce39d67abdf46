"""Instructions per request, counted by valgrind: a measure that machine noise leaves alone.

    python -m bench.instructions [--server gateway|raw] [--connections N] [--inflight K]

On a shared machine, alternating rounds of ``bench.run`` can differ by 15%, more than
most single changes are worth. This counts the CPU instructions a request costs
instead, which do not depend on what else the machine runs: the node (``bench/app.py``'s
echo through the full protocol, or ``raw``, the node's transport with an echo in place
of the protocol) and a driver speaking to it over loopback TCP run in one trio run in
one process, under ``valgrind --tool=callgrind``, twice, with two request counts; the
difference, over the difference in requests, leaves start-up and connection out. The
driver is the same for every node, so differences between two trees are the node's.
Under valgrind a process runs about fifty times slower: reads then hold every request
in flight, which is the batching of request/reply under load.

Needs valgrind (Debian's ``valgrind``). ``--tree`` measures another checkout (a
``git worktree``) with this one's driver.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_HANDSHAKE = (
    "GET {path} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Protocol: wsgate.v1.json\r\n\r\n"
)
_DATA = json.dumps("x" * 64).encode()  # the 64-byte payload of bench/loadgen.py


def _frame(payload: bytes) -> bytes:
    """A client's text frame, masked with a zero key (the payload is unchanged)."""
    if len(payload) < 126:
        return bytes([0x81, 0x80 | len(payload), 0, 0, 0, 0]) + payload
    return bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big") + bytes(4) + payload


async def _client(port: int, path: str, answer: bytes, requests: int, inflight: int) -> None:
    import trio

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(_HANDSHAKE.format(path=path).encode())
    received = b""
    while b"\r\n\r\n" not in received:
        received += await stream.receive_some(65536)
    received = received.split(b"\r\n\r\n", 1)[1]
    await stream.send_all(_frame(b'{"type":"hello"}'))
    while b'"type":' not in received:  # welcome (or the raw echo's hello)
        received += await stream.receive_some(65536)
    sent = answered = last = 0
    while sent < requests:
        frames = []
        for _ in range(inflight):
            sent += 1
            frames.append(
                _frame(
                    b'{"type":"msg","seq":%d,"event":"echo","data":%s,"ack":%d}'
                    % (sent, _DATA, last)
                )
            )
        await stream.send_all(b"".join(frames))
        while answered < sent:
            chunk = await stream.receive_some(65536)
            answered += chunk.count(answer)
            seqs = re.findall(rb'"seq":(\d+)', chunk)
            if seqs:
                last = int(seqs[-1])  # acknowledged with the next requests
    await stream.aclose()


def _run(server: str, connections: int, inflight: int, requests: int) -> None:
    """In the measured process: serve and drive ``requests`` per connection."""
    import trio

    from trio_wsgate import Config, Server

    async def main() -> None:
        if server == "raw":
            from trio_wsgate.testing.raw_echo import RawEchoServer, raw_echo_config

            node: Server = RawEchoServer(raw_echo_config("websockets", port=0))
            path, answer = "/", b'"type":"msg"'  # the request, echoed
        else:
            from bench.app import gateway

            # Heartbeats on, as in production, but none due while valgrind runs it.
            settings = Config(port=0, host="127.0.0.1", admin_port=None, heartbeat_interval=3600)
            node = Server(gateway, settings)
            path, answer = "/ws", b'"re":'  # a reply
        async with trio.open_nursery() as nursery:
            await nursery.start(node.serve)
            port = node.listen_addresses[0][1]
            async with trio.open_nursery() as clients:
                for _ in range(connections):
                    clients.start_soon(_client, port, path, answer, requests, inflight)
            nursery.cancel_scope.cancel()

    trio.run(main)


def _count(tree: Path, server: str, connections: int, inflight: int, requests: int) -> int:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("bench.instructions needs valgrind (apt install valgrind)")
    with tempfile.TemporaryDirectory() as scratch:
        command = [
            valgrind,
            "--tool=callgrind",
            f"--callgrind-out-file={scratch}/callgrind.out",
            sys.executable,
            "-c",
            f"import sys; sys.path[:0] = [{str(tree)!r}, {str(ROOT)!r}]; "
            f"from bench.instructions import _run; "
            f"_run({server!r}, {connections}, {inflight}, {requests})",
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=scratch)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"the measured process failed:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=("gateway", "raw"), default="gateway")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--inflight", type=int, default=1)
    parser.add_argument("--requests", type=int, default=1000, help="per connection, measured")
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout to measure")
    args = parser.parse_args()
    base = max(1, args.requests // 4)
    counts = [
        _count(args.tree.resolve(), args.server, args.connections, args.inflight, n)
        for n in (base, base + args.requests)
    ]
    per = (counts[1] - counts[0]) / (args.requests * args.connections)
    print(
        f"{args.server} at {args.tree}: {per:,.0f} instructions per request "
        f"({args.connections} connection(s) x {args.inflight} in flight)"
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
