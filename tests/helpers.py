"""Helpers for tests over real sockets on 127.0.0.1, and a count of task steps."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


async def http_get(
    port: int, path: str, host: str = "127.0.0.1"
) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP/1.1 GET: ``(status, headers, body)``."""
    return await http_request(port, "GET", path, host=host)


def metric(text: bytes, name: str) -> float:
    """The value of an unlabelled sample in a Prometheus exposition."""
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


async def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    host: str = "127.0.0.1",
) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP/1.1 request: ``(status, headers, body)``; ``headers`` as pairs
    may repeat a name."""
    payload = body.encode() if isinstance(body, str) else (body or b"")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    pairs = headers.items() if isinstance(headers, dict) else headers or []
    lines += [f"{key}: {value}" for key, value in pairs]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    parsed = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        parsed[key.strip().lower()] = value.strip()
    return int(status_line.split()[1]), parsed, rest


class _Scheduled(trio.abc.Instrument):
    """Counts the times tasks whose name ends with ``suffix`` are scheduled to run."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self.count = 0

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith(self.suffix):
            self.count += 1


@asynccontextmanager
async def scheduled(suffix: str) -> AsyncIterator[_Scheduled]:
    counter = _Scheduled(suffix)
    trio.lowlevel.add_instrument(counter)
    try:
        yield counter
    finally:
        trio.lowlevel.remove_instrument(counter)
