"""A live node in a thread, the fault proxy in front of it, and headless Chromium.

The node runs in its own trio loop in a thread of the test process, so that a test
can look at what its handlers processed and break the wire with the project's fault
proxy while Playwright's synchronous API drives Debian's ``chromium`` (never a
browser of Playwright's own: nothing is downloaded). Without chromium or Playwright
these tests skip, unless ``WSGATE_REQUIRE_BROWSER=1`` (CI) makes them fail.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import jwt
import pytest
import trio

from trio_wsgate import Config, Gateway, Server
from trio_wsgate.testing.faults import FaultProxy

from .app import make_app

SECRET = "a-browser-test-secret-of-32-bytes!!"
#: Chromium's flags for a closed network (no background requests) and a root user.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def token(user: str, ttl: float = 3600.0) -> str:
    """A token for ``user`` on the wall clock (the browser's and the node's)."""
    now = time.time()
    return jwt.encode({"sub": user, "iat": now, "exp": now + ttl}, SECRET, "HS256")


def require(reason: str) -> None:
    if os.environ.get("WSGATE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"WSGATE_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


class LiveNode:
    """A node and a fault proxy, served by a trio loop in a thread.

    ``port`` serves the pages and ``/wsgate.js``; ``proxy_url`` reaches the same node
    through the proxy, whose faults the test calls with :meth:`call`.
    """

    def __init__(self, gateway: Gateway | None = None, **settings: Any) -> None:
        self.gateway, self.received = make_app()
        if gateway is not None:
            self.gateway = gateway
        settings = {
            "host": "127.0.0.1",
            "port": 0,
            "admin_port": None,
            "jwt_secret": SECRET,
            "allow_publish": ("room:*",),
            **settings,
        }
        self.server = Server(self.gateway, Config(**settings))
        self.proxy: FaultProxy | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="live-node", daemon=True)

    @property
    def port(self) -> int:
        return self.server.listen_addresses[0][1]

    @property
    def page_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/test.html"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def proxy_url(self) -> str:
        assert self.proxy is not None
        return f"ws://127.0.0.1:{self.proxy.port}/ws"

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(30), "the node did not start"
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by start() or stop()
            self._failure = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.server.serve)
            self.proxy = FaultProxy("127.0.0.1", self.port, seed=19)
            await nursery.start(self.proxy.serve)
            self._ready.set()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a plain function in the node's loop (a fault, a look at the hub)."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def run(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Await ``fn(*args)`` in the node's loop, from the test's thread."""
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start ``fn(*args)`` as a task of the node's loop, ended with the node."""
        assert self._nursery is not None
        self.call(self._nursery.start_soon, fn, *args)

    def stop(self) -> None:
        if self._nursery is not None and self._thread.is_alive():
            self.call(self._nursery.cancel_scope.cancel)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the node did not stop"
        if self._failure is not None:
            raise self._failure


@pytest.fixture
def live() -> Iterator[LiveNode]:
    node = LiveNode()
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Debian's chromium, headless, launched once per test module.

    Not once per session: Playwright's synchronous API keeps an asyncio loop marked as
    running in this thread until it stops, and later tests call ``asyncio.run``.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require("Playwright is not installed (pip install playwright)")
    executable = shutil.which("chromium")
    if executable is None:
        require("no chromium is installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium: Any, live: LiveNode) -> Iterator[Any]:
    """A fresh page of the live node's test page, with wsgate.js loaded from the node."""
    context = chromium.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(live.page_url)
    page.wait_for_function("window.wsgateReady === true", timeout=10_000)
    yield page
    context.close()
    assert not errors, errors
