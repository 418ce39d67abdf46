"""The JavaScript client (clients/js/wsgate.js, served as trio_wsgate/static/wsgate.js):
the edges of tests/test_client_edges.py, checked in the JavaScript client too, on the
package's own fakes (clients/js/test/fake.js) under Node. Without node, these skip."""

from __future__ import annotations

import subprocess

from .test_js_client import PACKAGE, tool

PRELUDE = """
import assert from "node:assert/strict";
import { sequenced, settle, setup } from "./test/fake.js";

const pub = (topic, offset, data, epoch = "e1") => ({ type: "pub", topic, offset, epoch, data });

async function cutAndReconnect(server, clock) {
  server.socket.serverClose(1006);
  await settle();
  await clock.advance(clock.pending()[0]);
  await settle();
}
"""


def run(script: str) -> None:
    done = subprocess.run(
        [tool("node"), "--input-type=module", "-e", PRELUDE + script],
        cwd=PACKAGE,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert done.stdout.strip().endswith("ok"), done.stdout[-4000:]


def test_v2_a_live_pub_before_a_late_first_sub_reply_does_not_hide_the_gap() -> None:
    # docs/protocol.md §14, "A sub's reply on a later connection": the first sub was
    # processed and the connection dropped before its reply; 1..4 were published
    # meanwhile. After the resume the live 5 comes before the resent reply (offset 0):
    # 5 must not become the position. Held; the reply places the topic at 0, the
    # recovery asks from there, and 1..5 are delivered once each, in order.
    run("""
const { client, server, clock, messages } = setup({ protocol: 2, server: { autoReply: false } });
await settle();
const subscribed = client.subscribe("room");
await settle();
const first = server.socket;
const sub = sequenced(first.take()).find((e) => e.type === "sub");
first.session.received = first.session.processed = sub.seq; // its reply never left
await cutAndReconnect(server, clock);
const second = server.socket;
assert.equal(client.state, "resumed");
second.deliver(pub("room", 5, 5)); // live, before the resent reply
server.reply(second, sub.seq, { data: { offset: 0, epoch: "e1" } });
await settle();
assert.deepEqual(await subscribed, { offset: 0, epoch: "e1" });
assert.deepEqual(messages.map((m) => m.data), []);
const again = sequenced(second.take()).filter((e) => e.type === "sub");
const asked = again.map((e) => [e.topic, e.since, e.recover]);
assert.deepEqual(asked, [["room", { offset: 0, epoch: "e1" }, true]]);
second.deliver([1, 2, 3, 4, 5].map((n) => pub("room", n, n)));
second.session.received = second.session.processed = again[0].seq;
server.reply(second, again[0].seq, { data: { offset: 5, epoch: "e1", recovered: true } });
await settle();
assert.deepEqual(messages.map((m) => m.data), [1, 2, 3, 4, 5]);
assert.equal(client.recovered.room, true);
second.deliver(pub("room", 6, 6));
await settle();
assert.deepEqual(messages.map((m) => m.data), [1, 2, 3, 4, 5, 6]);
console.log("ok");
""")


def test_v2_what_was_held_for_a_late_reply_answered_with_an_error_is_delivered() -> None:
    # The late reply is an error: nothing will place the topic, so what it held is
    # delivered (in order) rather than kept for ever.
    run("""
const { client, server, clock, messages } = setup({ protocol: 2, server: { autoReply: false } });
await settle();
const subscribed = client.subscribe("room").catch((error) => error);
await settle();
const sub = sequenced(server.socket.take()).find((e) => e.type === "sub");
server.socket.session.received = server.socket.session.processed = sub.seq;
await cutAndReconnect(server, clock);
const second = server.socket;
second.deliver([pub("room", 6, 6), pub("room", 5, 5)]);
server.reply(second, sub.seq, { error: { code: "unavailable", reason: "later" } });
await settle();
assert.equal((await subscribed).code, "unavailable");
assert.deepEqual(messages.map((m) => m.data), [5, 6]);
console.log("ok");
""")


def test_a_welcome_with_window_0_closes_with_1002() -> None:
    # Bug 3 of the Python client: the JavaScript one already refuses such a welcome
    # (a regression test, not a fix): 1002, then closed, nothing thrown.
    run("""
const { client, server, errors } = setup({ server: { autoWelcome: false } });
await settle();
const hello = server.socket.take().find((e) => e.type === "hello");
server.welcome(server.socket, hello, { window: 0 });
await settle();
assert.equal(client.state, "closed");
assert.equal(client.closeCode, 1002);
assert.equal(server.socket.closedBy.code, 1002);
assert.equal(errors.at(-1).code, 1002);
console.log("ok");
""")
