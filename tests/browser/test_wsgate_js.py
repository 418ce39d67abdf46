"""wsgate.js in headless Chromium, loaded from a live node: every guarantee of the
Python client, end to end (docs/protocol.md, "The JavaScript client").

Each test drives a page that imported ``/wsgate.js`` from the node; faults come from
the project's fault proxy between the page and the node, and the node's handlers say
what they processed.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio

from trio_wsgate.protocol import CloseCode, CloseReason
from trio_wsgate.testing.faults import Fault

from .conftest import LiveNode, token

pytestmark = pytest.mark.e2e

#: The test's wait for the browser, in milliseconds (a bound, not a pace).
WAIT = 30_000

OPEN = """async ([url, options]) => {
  const client = wsgate.openClient(url, options);
  window.client = client;
  window.got = [];
  window.states = [];
  window.recoveredEvents = [];
  client.on("message", (m) => got.push(m));
  client.on("state", (s) => states.push(s));
  client.on("recovered", (topic, ok) => recoveredEvents.push([topic, ok]));
  await new Promise((resolve, reject) => {
    const off = client.on("state", (s) => {
      if (s === "connected" || s === "resumed" || s === "session_lost") {
        off();
        resolve();
      }
      if (s === "closed") {
        off();
        reject(new Error(`closed ${client.closeCode} ${client.closeReason}`));
      }
    });
  });
  return { session: client.session, user: client.user, state: client.state };
}"""


def open_client(page: Any, url: str, **options: Any) -> dict[str, Any]:
    return page.evaluate(OPEN, [url, {"backoff": {"base": 50, "cap": 500}, **options}])


def data_of(page: Any, event: str) -> list[Any]:
    return page.evaluate(
        "(event) => got.filter((m) => m.event === event).map((m) => m.data)", event
    )


def wait_count(page: Any, event: str, count: int) -> None:
    page.wait_for_function(
        "([event, count]) => got.filter((m) => m.event === event).length >= count",
        arg=[event, count],
        timeout=WAIT,
    )


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_request_reply_send_and_topics(page: Any, live: LiveNode, encoding: str) -> None:
    welcome = open_client(page, live.url, token=token("ada"), encoding=encoding)
    assert (welcome["user"], welcome["state"]) == ("ada", "connected")
    result = page.evaluate(
        """async () => {
          const value = { hello: "world", n: 2 ** 53 - 1, x: -1.5, s: "é😀" };
          const echoed = await client.request("echo", value);
          let refused;
          try {
            await client.request("refuse", null);
          } catch (e) {
            refused = [e.name, e.code, e.reason];
          }
          await client.send("record", "sent once");
          const sub = await client.subscribe("room:lobby");
          const pub = await client.publish("room:lobby", { text: "hi" });
          while (!got.length) await new Promise((r) => setTimeout(r, 10));
          let unsafe;
          try { await client.request("echo", 2 ** 53); } catch (e) { unsafe = e.name; }
          return { echoed, refused, sub, pub, message: got[0], unsafe, state: client.state };
        }"""
    )
    assert result["echoed"] == {"hello": "world", "n": 2**53 - 1, "x": -1.5, "s": "é😀"}
    assert result["refused"] == ["WsgateError", "not_allowed", "no, thanks"]
    assert live.received["ada"] == ["sent once"]  # resolved only once the node acked it
    assert result["sub"]["offset"] == 0
    assert result["pub"]["offset"] == 1
    message = result["message"]
    assert (message["topic"], message["offset"], message["data"]) == (
        "room:lobby",
        1,
        {"text": "hi"},
    )
    assert message["epoch"] == result["pub"]["epoch"]
    # A value the node would refuse (past 2**53) is refused by the client before sending,
    # and the connection lives on.
    assert result["unsafe"] == "TypeError"
    assert result["state"] == "connected"


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_exactly_once_both_ways_through_many_cuts(page: Any, live: LiveNode, encoding: str) -> None:
    count = 300
    open_client(page, live.proxy_url, token=token("ada"), encoding=encoding)
    proxy = live.proxy
    assert proxy is not None

    async def chaos() -> None:
        # A cut or a clean close every 60 to 180 ms while both sides send.
        await proxy.chaos(interval=(0.06, 0.18), faults=[Fault.CUT, Fault.CLOSE])

    async def push() -> None:
        for i in range(count):
            await live.gateway.send_to_user("ada", i, event="n")
            await trio.sleep(0.004)

    live.start_soon(chaos)
    live.start_soon(push)
    page.evaluate(
        """async (count) => {
          const sends = [];
          for (let i = 0; i < count; i++) {
            sends.push(client.send("record", i));
            if (i % 10 === 9) await new Promise((r) => setTimeout(r, 10));
          }
          await Promise.all(sends);
        }""",
        count,
    )
    wait_count(page, "n", count)
    cuts = dict(proxy.stats.faults)
    stats = page.evaluate("() => ({ ...client.stats, states: states })")
    assert live.received["ada"] == list(range(count))  # client to node: once, in order
    assert data_of(page, "n") == list(range(count))  # node to client: once, in order
    assert sum(cuts.values()) >= 10, cuts
    assert stats["resumes"] >= 5, stats
    assert stats["sessionsLost"] == 0
    assert "session_lost" not in stats["states"]


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_version_2_topics_exactly_once_in_order_through_many_cuts(
    page: Any, live: LiveNode, encoding: str
) -> None:
    # Protocol version 2 (docs/protocol.md §14): the publications are not kept for the
    # session; after each cut the page asks the topics' histories for what it missed.
    count = 300
    open_client(page, live.proxy_url, token=token("ada"), encoding=encoding, protocol=2)
    page.evaluate("() => client.subscribe('room:news')")
    proxy = live.proxy
    assert proxy is not None

    async def chaos() -> None:
        await proxy.chaos(interval=(0.06, 0.18), faults=[Fault.CUT, Fault.CLOSE])

    async def publish() -> None:
        for i in range(count):
            await live.gateway.send_to_user("ada", i, event="n")
            await live.gateway.publish("room:news", i, "news")
            await trio.sleep(0.004)

    live.start_soon(chaos)
    live.start_soon(publish)
    wait_count(page, "n", count)
    wait_count(page, "news", count)
    cuts = dict(proxy.stats.faults)
    stats = page.evaluate("() => ({ ...client.stats, states: states })")
    assert data_of(page, "n") == list(range(count))
    assert data_of(page, "news") == list(range(count))
    assert sum(cuts.values()) >= 5, cuts
    assert stats["resumes"] >= 3, stats
    assert stats["sessionsLost"] == 0


def test_a_lost_session_is_recovered_by_offset(page: Any, live: LiveNode) -> None:
    open_client(page, live.url, token=token("ada"))
    page.evaluate("() => client.subscribe('room:news')")
    for i in range(3):
        live.run(live.gateway.publish, "room:news", i, "news")
        live.run(live.gateway.send_to_user, "ada", f"dm{i}", "dm")
    wait_count(page, "news", 3)
    wait_count(page, "dm", 3)
    session_id = page.evaluate("() => client.session")

    async def lose_the_session_and_publish() -> None:
        # The node loses the session (as a node that died would), and publications
        # follow while the client is away: it must get them back by offset.
        hub = live.server.hub
        session = hub.sessions[session_id]
        session.close(CloseCode.INTERNAL_ERROR, "lost")  # 1011: the client comes back
        hub.end(session, CloseCode.INTERNAL_ERROR, CloseReason.INTERNAL_ERROR, why="test")
        for i in range(3, 6):
            await live.gateway.publish("room:news", i, "news")
            await live.gateway.send_to_user("ada", f"dm{i}", "dm")

    live.run(lose_the_session_and_publish)
    page.wait_for_function("() => recoveredEvents.length >= 2", timeout=WAIT)
    wait_count(page, "news", 6)
    wait_count(page, "dm", 6)
    result = page.evaluate(
        "() => ({ states, recovered: client.recovered, session: client.session })"
    )
    assert "session_lost" in result["states"]
    assert result["session"] != session_id
    # Both the room and the user's own topic (whose starting point came with the
    # first welcome) were asked again with since, and nothing was missed.
    assert result["recovered"] == {"room:news": True, "user:ada": True}
    assert data_of(page, "news") == list(range(6))
    assert data_of(page, "dm") == [f"dm{i}" for i in range(6)]


def test_a_page_reload_resumes_the_session(page: Any, live: LiveNode) -> None:
    options = "{ token: TOKEN, storage: sessionStorage, backoff: { base: 50, cap: 500 } }"
    script = OPEN.replace("async ([url, options])", "async ([url, TOKEN])").replace(
        "openClient(url, options)", f"openClient(url, {options})"
    )
    welcome = page.evaluate(script, [live.url, token("ada")])
    page.evaluate("() => client.send('record', 'before')")
    page.reload()
    page.wait_for_function("window.wsgateReady === true", timeout=WAIT)
    for i in range(3):  # while the page is gone or coming back
        live.run(live.gateway.send_to_user, "ada", i, "n")
    again = page.evaluate(script, [live.url, token("ada")])
    assert (again["session"], again["state"]) == (welcome["session"], "resumed")
    page.evaluate("() => client.send('record', 'after')")
    wait_count(page, "n", 3)
    assert data_of(page, "n") == [0, 1, 2]
    assert live.received["ada"] == ["before", "after"]
    # close() ends the session for good and forgets it.
    page.evaluate("() => client.close()")
    assert page.evaluate("() => Object.keys(sessionStorage).length") == 0


def test_the_token_is_refreshed_before_it_expires(page: Any, live: LiveNode) -> None:
    minted: list[float] = []

    def mint() -> str:
        minted.append(time.monotonic())
        return token("ada", ttl=3.0)

    page.expose_function("mintToken", mint)
    page.evaluate("() => { window.tokens = 0; }")
    getter = "async () => { tokens++; return await mintToken(); }"
    script = OPEN.replace(
        "openClient(url, options)", f"openClient(url, {{ ...options, getToken: {getter} }})"
    )
    page.evaluate(script, [live.url, {"backoff": {"base": 50, "cap": 500}}])
    session = page.evaluate("() => client.session")
    # Past two token lifetimes: the token is refreshed each time, the connection is
    # never closed with 4001 (nor lost at all).
    page.wait_for_function("() => tokens >= 4", timeout=WAIT)
    result = page.evaluate(
        "async () => ({ echo: await client.request('echo', 1), states, session: client.session })"
    )
    assert (result["echo"], result["session"]) == (1, session)
    assert not {"closed", "resumed", "session_lost"} & set(result["states"]), result["states"]
    assert minted[-1] - minted[0] > 3.0  # the first token has expired by now
    assert live.server.hub.sessions[session].identity.user == "ada"


def test_a_bad_token_in_hello_is_a_readable_4001(page: Any, live: LiveNode) -> None:
    result = page.evaluate(
        """async (url) => {
          const client = wsgate.openClient(url, { token: "not-a-jwt", backoff: { base: 50 } });
          await client.closed;
          return [client.state, client.closeCode, client.closeReason];
        }""",
        live.url,
    )
    assert result[:2] == ["closed", 4001]
    assert result[2].startswith("unauthorized: invalid token")
