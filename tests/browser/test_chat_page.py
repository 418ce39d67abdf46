"""The chat example's page (``scripts/serve`` at http://127.0.0.1:8000/), in Chromium:
two users talk, one's connection is cut and resumes, and the page is photographed."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from examples.chat import gateway as chat_gateway
from trio_wsgate.files import StaticFile

from .conftest import LiveNode, token

pytestmark = pytest.mark.e2e

WAIT = 30_000
VIEWPORT = {"width": 1000, "height": 640}


@pytest.fixture
def chat() -> Iterator[LiveNode]:
    node = LiveNode(chat_gateway)
    node.start()
    yield node
    node.stop()


def open_page(chromium: Any, node: LiveNode, user: str) -> Any:
    page = chromium.new_context(viewport=VIEWPORT).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"http://127.0.0.1:{node.port}/#token={token(user)}")
    page.wait_for_function(
        "document.querySelector('#state').textContent === 'connected'", timeout=WAIT
    )
    page.wait_for_function(
        f"document.querySelector('#me').textContent === 'as {user}'", timeout=WAIT
    )
    page.errors = errors
    return page


def say(page: Any, text: str) -> None:
    page.fill("#say input", text)
    page.press("#say input", "Enter")


def lines(page: Any) -> list[list[str]]:
    """The room's messages as (from, text, offset) in the order shown."""
    return page.eval_on_selector_all(
        "#log .line:not(.notice)",
        "els => els.map(e => [e.children[0].textContent, e.childNodes[1].textContent,"
        " e.children[1].textContent])",
    )


def png_size_and_colours(png: bytes) -> tuple[int, int, int]:
    """Width, height, and how many distinct byte values the image data holds."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    data, at = b"", 8
    while at < len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        kind = png[at + 4 : at + 8]
        if kind == b"IDAT":
            data += png[at + 8 : at + 8 + length]
        at += 12 + length
    return width, height, len(set(zlib.decompress(data)))


def test_two_users_chat_through_a_cut_and_the_page_is_photographed(
    chromium: Any, chat: LiveNode, tmp_path: Path
) -> None:
    ada = open_page(chromium, chat, "ada")
    bob = open_page(chromium, chat, "bob")
    # Presence: each sees both in the lobby.
    for page in (ada, bob):
        page.wait_for_function(
            "[...document.querySelectorAll('#who li')].map(e => e.textContent).join() == 'ada,bob'",
            timeout=WAIT,
        )
    say(ada, "hello bob")
    bob.wait_for_function(
        "document.querySelectorAll('#log .line:not(.notice)').length === 1", timeout=WAIT
    )
    # Bob's wifi drops; ada speaks meanwhile; bob's page resumes and gets it once.
    bob.click("#cut")
    say(ada, "are you there?")
    bob.wait_for_function(
        "document.querySelector('#log').textContent.includes('session resumed')", timeout=WAIT
    )
    bob.wait_for_function(
        "document.querySelectorAll('#log .line:not(.notice)').length === 2", timeout=WAIT
    )
    say(bob, "back, nothing lost")
    for page in (ada, bob):  # each gets it through the room, in its own time
        page.wait_for_function(
            "document.querySelectorAll('#log .line:not(.notice)').length === 3", timeout=WAIT
        )
    shown = lines(bob)
    assert shown == lines(ada)
    assert [(who, text) for who, text, _ in shown] == [
        ("ada", "hello bob"),
        ("ada", "are you there?"),
        ("bob", "back, nothing lost"),
    ]
    offsets = [int(offset.lstrip("#")) for _, _, offset in shown]
    assert offsets == sorted(offsets)
    assert bob.eval_on_selector("#state", "e => e.textContent") == "resumed"
    # A room of one's own.
    ada.fill("#join input", "rust")
    ada.press("#join input", "Enter")
    ada.wait_for_function(
        "document.querySelector('#rooms .current').textContent === '# rust'", timeout=WAIT
    )
    shot = tmp_path / "chat.png"
    bob.screenshot(path=str(shot))
    width, height, colours = png_size_and_colours(shot.read_bytes())
    assert (width, height) == (VIEWPORT["width"], VIEWPORT["height"])
    assert colours > 20  # text, badges and borders, not a blank page
    assert not ada.errors, ada.errors
    assert not bob.errors, bob.errors


def test_the_readmes_browser_example_works_as_written(chromium: Any) -> None:
    # The README's "From a browser" page, served by an anonymous chat node as the README
    # says (the chat example answers "who"): it logs what the README says it logs.
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## From a browser") :]
    html = section.split("```html\n", 1)[1].split("```", 1)[0]
    node = LiveNode(chat_gateway, jwt_secret=None)
    node.start()
    try:
        node.server.files["/readme.html"] = StaticFile.of(html, "text/html; charset=utf-8")
        page = chromium.new_context().new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        # Keep what the page logs, as values.
        page.add_init_script(
            "window.logged = []; const log = console.log;"
            " console.log = (...args) => { window.logged.push(args); log(...args); };"
        )
        page.goto(f"http://127.0.0.1:{node.port}/readme.html")
        page.wait_for_function("() => logged.some((args) => Array.isArray(args[0]))", timeout=WAIT)
        logged = page.evaluate("() => logged")
        assert not errors, errors
        assert ["connected"] in logged
        assert [{"hello": "world"}] in logged  # the echo handler's reply
        (who,) = [args[0] for args in logged if isinstance(args[0], list)]
        assert len(who) == 1
        assert who[0].startswith("guest-")
        joined = [args for args in logged if args[0] == "joined"]
        assert joined[0][2:] == ["room:lobby", 1]  # event, data, topic, offset
    finally:
        node.stop()
