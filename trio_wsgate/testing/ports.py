"""Ports on 127.0.0.1, for tests, examples and benchmarks that start real servers."""

from __future__ import annotations

import socket
import subprocess
import time

__all__ = ["free_port", "wait_for_port"]


def free_port() -> int:
    """A port nothing listens on right now (the OS's pick; another process may take it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(
    port: int, timeout: float = 20, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until something accepts on ``127.0.0.1:port`` (for scripts, not trio code).

    Raises:
        RuntimeError: ``timeout`` seconds passed, or ``process`` (the server expected
            to listen) exited first.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")
