"""Helpers for tests over real sockets on 127.0.0.1."""

from __future__ import annotations

import trio


async def http_get(
    port: int, path: str, host: str = "127.0.0.1"
) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP/1.1 GET: ``(status, headers, body)``."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def metric(text: bytes, name: str) -> float:
    """The value of an unlabelled sample in a Prometheus exposition."""
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)
