// Calls and sequencing on one connection: requests, sends, the window, acks, batches.

import assert from "node:assert/strict";
import { test } from "node:test";

import { ClientClosed, SessionLost, WsgateError, openClient } from "../wsgate.js";
import { FakeServer, sequenced, settle, setup } from "./fake.js";

test("hello, welcome, then a request gets the handler's reply", async () => {
  const userTopic = { offset: 3, epoch: "e1" };
  const { client, server, states } = setup({ token: "abc", server: { user: "ada", userTopic } });
  assert.equal(client.state, "connecting");
  await settle();
  const socket = server.socket;
  assert.deepEqual(socket.protocols, ["wsgate.v1.json"]);
  assert.equal(socket.binaryType, "arraybuffer");
  assert.equal(socket.url, "ws://test.invalid/ws"); // the token never goes in the URL
  assert.deepEqual(socket.take()[0], { type: "hello", token: "abc" });
  assert.equal(client.state, "connected");
  assert.deepEqual(states, ["connected"]);
  assert.equal(client.session, "s1");
  assert.equal(client.user, "ada");
  const reply = await client.request("echo", { hello: "world" });
  assert.deepEqual(reply, { hello: "world" });
  assert.deepEqual(sequenced(socket.take()), [{ type: "msg", seq: 1, event: "echo", data: { hello: "world" } }]);
});

test("an error reply rejects with WsgateError (code, reason)", async () => {
  const handlers = {
    fail() {
      throw { code: "forbidden", reason: "not you" };
    },
  };
  const { client } = setup({ server: { handlers } });
  await settle();
  const error = await client.request("fail", 1).catch((e) => e);
  assert.ok(error instanceof WsgateError);
  assert.ok(!(error instanceof SessionLost) && !(error instanceof ClientClosed));
  assert.equal(error.code, "forbidden");
  assert.equal(error.reason, "not you");
  assert.equal(await client.request("echo"), undefined); // a reply without data
});

test("calls made before the welcome wait, then leave in order in one batch", async () => {
  const { client, server } = setup({ server: { autoWelcome: false } });
  const one = client.request("echo", 1);
  const two = client.send("note", 2);
  const three = client.request("echo", 3);
  await settle();
  const socket = server.socket;
  assert.equal(socket.frames.length, 1); // hello alone
  server.welcome(socket, socket.take()[0]);
  await settle();
  assert.equal(socket.frames.length, 2);
  const batch = JSON.parse(socket.frames[1]);
  assert.ok(Array.isArray(batch));
  assert.deepEqual(batch.map((e) => [e.seq, e.event]), [[1, "echo"], [2, "note"], [3, "echo"]]);
  assert.deepEqual([await one, await two, await three], [1, undefined, 3]);
});

test("send resolves when the server acknowledges it, not before", async () => {
  const { client, server } = setup({ server: { autoReply: false } });
  await settle();
  let done = false;
  const sent = client.send("note", "hi").then(() => (done = true));
  await settle();
  const socket = server.socket;
  assert.deepEqual(sequenced(socket.take()), [{ type: "msg", seq: 1, event: "note", data: "hi" }]);
  assert.equal(done, false);
  socket.deliver({ type: "ack", ack: 1 });
  await sent;
  assert.equal(done, true);
  assert.equal(client.stats.pending, 0);
});

test("an error reply to a send goes to the error event (its promise is settled by the ack)", async () => {
  const handlers = {
    bad() {
      throw { code: "unknown_event", reason: "no handler" };
    },
  };
  const { client, errors } = setup({ server: { handlers } });
  await settle();
  await client.send("bad", 1);
  await settle();
  assert.equal(errors.length, 1);
  assert.equal(errors[0].code, "unknown_event");
});

test("never more than window unacknowledged envelopes in flight", async () => {
  const { client, server } = setup({ server: { window: 4, autoReply: false } });
  await settle();
  const socket = server.socket;
  const sends = Array.from({ length: 10 }, (_, i) => client.send("n", i));
  await settle();
  assert.deepEqual(sequenced(socket.take()).map((e) => e.seq), [1, 2, 3, 4]);
  assert.equal(client.stats.pending, 10);
  socket.deliver({ type: "ack", ack: 2 });
  await settle();
  assert.deepEqual(sequenced(socket.take()).map((e) => e.seq), [5, 6]);
  socket.deliver({ type: "ack", ack: 6 });
  await settle();
  assert.deepEqual(sequenced(socket.take()).map((e) => e.seq), [7, 8, 9, 10]);
  socket.deliver({ type: "ack", ack: 10 });
  await Promise.all(sends);
  assert.equal(client.stats.pending, 0);
});

test("past maxPending, calls wait in order and are let in as acks make room", async () => {
  const { client, server } = setup({ maxPending: 2, server: { autoReply: false } });
  await settle();
  const socket = server.socket;
  const order = [];
  const calls = [1, 2, 3, 4].map((n) => client.send("n", n).then(() => order.push(n)));
  await settle();
  assert.deepEqual(sequenced(socket.take()).map((e) => e.data), [1, 2]);
  assert.equal(client.stats.pending, 4);
  socket.deliver({ type: "ack", ack: 1 });
  await settle();
  assert.deepEqual(sequenced(socket.take()).map((e) => [e.seq, e.data]), [[3, 3]]);
  socket.deliver({ type: "ack", ack: 3 });
  await settle();
  assert.deepEqual(sequenced(socket.take()).map((e) => [e.seq, e.data]), [[4, 4]]);
  socket.deliver({ type: "ack", ack: 4 });
  await Promise.all(calls);
  assert.deepEqual(order, [1, 2, 3, 4]);
  // A value the protocol cannot carry is refused at once, even while calls wait.
  client.send("n", 5);
  client.send("n", 6);
  client.send("n", 7);
  await assert.rejects(client.send("n", NaN), TypeError);
});

test("an ack within 100 ms of an unacknowledged arrival, piggybacked when something leaves", async () => {
  const { client, server, clock, messages } = setup({ server: { autoReply: false } });
  await settle();
  const socket = server.socket;
  socket.take();
  server.push(socket, { type: "msg", event: "e", data: 1 });
  await settle();
  assert.equal(messages.length, 1);
  await clock.advance(99);
  assert.deepEqual(socket.take(), []);
  await clock.advance(1);
  assert.deepEqual(socket.take(), [{ type: "ack", ack: 1 }]);
  // Another arrival, then a call: the ack rides on the call, nothing alone after it.
  server.push(socket, { type: "msg", event: "e", data: 2 });
  await settle();
  client.send("x");
  await settle();
  assert.deepEqual(socket.take(), [{ type: "msg", seq: 1, event: "x", ack: 2 }]);
  await clock.advance(200);
  assert.deepEqual(socket.take().filter((e) => e.type === "ack"), []);
});

test("an ack at once when half the window is unacknowledged", async () => {
  const { server } = setup({ server: { window: 8 } });
  await settle();
  const socket = server.socket;
  socket.take();
  for (let i = 0; i < 3; i++) server.push(socket, { type: "msg", data: i });
  await settle();
  assert.deepEqual(socket.take(), []);
  server.push(socket, { type: "msg", data: 3 });
  await settle();
  assert.deepEqual(socket.take(), [{ type: "ack", ack: 4 }]);
});

test("a duplicate is acked again at once and not delivered twice", async () => {
  const { server, clock, messages } = setup();
  await settle();
  const socket = server.socket;
  socket.take();
  const first = server.push(socket, { type: "msg", event: "e", data: "once" });
  await clock.advance(100);
  assert.deepEqual(socket.take(), [{ type: "ack", ack: 1 }]);
  socket.deliver(first);
  await settle();
  assert.deepEqual(socket.take(), [{ type: "ack", ack: 1 }]);
  assert.deepEqual(messages.map((m) => m.data), ["once"]);
});

test("a batch from the server is handled in order; messages carry their fields", async () => {
  const { client, server, messages } = setup({ server: { autoReply: false } });
  await settle();
  const socket = server.socket;
  const reply = client.request("r", 0);
  await settle();
  socket.deliver([
    server.number(socket, { type: "msg", event: "a", data: 1 }),
    server.number(socket, { type: "msg", event: "b", topic: "room", offset: 7, epoch: "e", data: [2] }),
    server.number(socket, { type: "reply", re: 1, data: "r", ack: 1 }),
    { type: "ping", ts: 42 },
  ]);
  assert.equal(await reply, "r");
  assert.deepEqual(messages, [
    { event: "a", data: 1, topic: undefined, offset: undefined, epoch: undefined },
    { event: "b", data: [2], topic: "room", offset: 7, epoch: "e" },
  ]);
  await settle();
  assert.deepEqual(socket.take().slice(-2), [{ type: "pong", ts: 42 }, { type: "ack", ack: 3 }]);
});

test("everything queued in one tick leaves as one message, within max_message_size", async () => {
  const { client, server } = setup({ server: { maxMessageSize: 120, autoReply: false } });
  await settle();
  const socket = server.socket;
  const before = socket.frames.length;
  client.send("one");
  await settle();
  assert.deepEqual(JSON.parse(socket.frames[before]), { type: "msg", seq: 1, event: "one" });
  for (let i = 0; i < 6; i++) client.send("x", i);
  await settle();
  const frames = socket.frames.slice(before + 1).map((f) => JSON.parse(f));
  assert.ok(frames.length > 1 && frames.length < 6, `${frames.length} frames`);
  for (const frame of socket.frames.slice(before + 1)) assert.ok(Buffer.byteLength(frame) <= 120);
  assert.deepEqual(frames.flat().map((e) => e.seq), [2, 3, 4, 5, 6, 7]);
});

test("values outside the domain are refused with a TypeError, and nothing is sent", async () => {
  const { client, server } = setup();
  await settle();
  const socket = server.socket;
  socket.take();
  await assert.rejects(client.request("x", NaN), TypeError);
  await assert.rejects(client.send("x", { n: 2 ** 53 }), TypeError);
  await assert.rejects(client.send("x", 10n), TypeError);
  await assert.rejects(client.publish("t", new Uint8Array(1)), TypeError);
  await assert.rejects(client.request("x", "\udfff"), TypeError);
  await assert.rejects(client.request(42, 1), TypeError);
  await assert.rejects(client.subscribe(7), TypeError);
  const deep = (n) => (n === 0 ? 0 : [deep(n - 1)]);
  await assert.rejects(client.request("x", deep(32)), TypeError); // data nests 31 deep at most
  assert.equal(await client.request("x", deep(31)).then(() => "ok"), "ok");
  await settle();
  assert.deepEqual(sequenced(socket.take()).map((e) => e.seq), [1]); // numbering went on as if nothing happened
  assert.equal(client.state, "connected");
});

test("msgpack: binary frames, the msgpack subprotocol, the same calls", async () => {
  const server = new FakeServer();
  const client = openClient("ws://test.invalid/ws", { WebSocket: server.WebSocket, encoding: "msgpack", random: () => 0.5 });
  await settle();
  const socket = server.socket;
  assert.deepEqual(socket.protocols, ["wsgate.v1.msgpack"]);
  assert.equal(socket.binaryType, "arraybuffer");
  assert.ok(socket.frames[0] instanceof Uint8Array);
  assert.deepEqual(await client.request("echo", { n: [1, -1, 2 ** 40, 0.5, "é"] }), { n: [1, -1, 2 ** 40, 0.5, "é"] });
  await assert.rejects(client.request("echo", new Uint8Array(2)), /base64/);
  assert.equal(client.state, "connected");
  await client.close();
});

test("a custom codec replaces the bundled msgpack one, held to the value domain", async () => {
  const { msgpack } = await import("../wsgate.js");
  let used = 0;
  const codec = {
    encode: (v) => (used++, msgpack.encode(v)),
    decode: (b) => msgpack.decode(b),
  };
  const server = new FakeServer();
  const client = openClient("ws://test.invalid/ws", { WebSocket: server.WebSocket, encoding: "msgpack", codec });
  await settle();
  assert.equal(await client.request("echo", 5), 5);
  assert.ok(used >= 2);
  await assert.rejects(client.request("echo", Infinity), TypeError);
  assert.throws(() => openClient("ws://x/ws", { WebSocket: server.WebSocket, codec }), TypeError);
  await client.close();
});

test("the server breaking the protocol ends the client: seq gap 1002, frame kind 1003, garbage 1007", async () => {
  const cases = [
    [(s) => s.deliver({ type: "msg", seq: 2, data: 1 }), 1002],
    [(s) => s.deliver({ type: "ack", ack: 5 }), 1002],
    [(s) => s.deliver({ type: "hello" }), 1002],
    [(s) => s.deliver({ type: "msg", seq: 1.5 }), 1002],
    [(s) => s.deliverRaw(new ArrayBuffer(1)), 1003],
    [(s) => s.deliverRaw("{not json"), 1007],
  ];
  for (const [breakIt, code] of cases) {
    const { client, server, errors } = setup();
    await settle();
    breakIt(server.socket);
    await settle();
    assert.equal(client.state, "closed", `${code}`);
    assert.equal(client.closeCode, code);
    assert.equal(server.socket.closedBy.code, code);
    assert.equal(errors.length, 1);
  }
});

test("a message listener that throws is reported; the message still counts as processed", async () => {
  const { client, server, clock, errors } = setup();
  client.on("message", () => {
    throw new Error("listener bug");
  });
  await settle();
  const socket = server.socket;
  socket.take();
  server.push(socket, { type: "msg", data: 1 });
  await clock.advance(100);
  assert.equal(errors[0].message, "listener bug");
  assert.deepEqual(socket.take(), [{ type: "ack", ack: 1 }]);
});

test("on() returns its remover; off() removes; unknown events are refused", async () => {
  const { client, server } = setup();
  const seen = [];
  const remove = client.on("message", (m) => seen.push(m.data));
  const other = (m) => seen.push(`other ${m.data}`);
  client.on("message", other);
  await settle();
  server.push(server.socket, { type: "msg", data: 1 });
  await settle();
  remove();
  client.off("message", other);
  server.push(server.socket, { type: "msg", data: 2 });
  await settle();
  assert.deepEqual(seen, [1, "other 1"]);
  assert.throws(() => client.on("close", () => {}), TypeError);
});

test("options are checked", () => {
  const server = new FakeServer();
  const WebSocket = server.WebSocket;
  assert.throws(() => openClient("ws://x/ws", { WebSocket, encoding: "xml" }), TypeError);
  assert.throws(() => openClient("ws://x/ws", { WebSocket, maxPending: 0 }), RangeError);
  assert.throws(() => openClient("ws://x/ws", { WebSocket, token: 5 }), TypeError);
  assert.throws(() => openClient("ws://x/ws", { WebSocket: undefined }), TypeError); // Node 20 has none
});

test("a pong takes a pending ack along (timers run late in background tabs)", async () => {
  const { server } = setup();
  await settle();
  const socket = server.socket;
  socket.take();
  server.push(socket, { type: "msg", data: 1 });
  await settle();
  socket.deliver({ type: "ping", ts: 7 });
  await settle();
  assert.deepEqual(socket.take(), [{ type: "pong", ts: 7 }, { type: "ack", ack: 1 }]);
});

/** Catch what the client's onmessage throws (a real WebSocket would leave it uncaught). */
function catchThrows(socket) {
  const caught = [];
  const onmessage = socket.onmessage;
  socket.onmessage = (event) => {
    try {
      onmessage(event);
    } catch (error) {
      caught.push(error);
    }
  };
  return caught;
}

test("a server value outside the domain ends the client with 1007, before any envelope of it is handled", async () => {
  const { client, server, messages, errors } = setup();
  await settle();
  const socket = server.socket;
  const thrown = catchThrows(socket);
  const msg = server.number(socket, { type: "msg", data: "after the ping" });
  socket.deliverRaw(`[{"type":"ping","ts":1e400},${JSON.stringify(msg)}]`); // 1e400 is Infinity
  await settle();
  assert.deepEqual(thrown, []);
  assert.equal(client.state, "closed");
  assert.equal(client.closeCode, 1007);
  assert.deepEqual(messages, []); // the batch is refused whole
  assert.equal(errors.length, 1);
  assert.match(errors[0].message, /outside the domain/);
});

/** A welcome as JSON text, for values the fake server's encoder (rightly) refuses. */
const WELCOME = JSON.stringify({ type: "welcome", session: "s1", resume_token: "t", resumed: false, ack: 0, heartbeat: { interval: 25, timeout: 10 }, window: 16, max_message_size: 65536 });

test("hostile values in server envelopes are protocol errors (1007, 1002), never an uncaught throw", async () => {
  const cases = [
    ["a ping ts with a lone surrogate", (s) => s.deliverRaw('{"type":"ping","ts":"\\ud800"}'), 1007],
    ["an integer past 2**53", (s) => s.deliverRaw('{"type":"ping","ts":9007199254740993}'), 1007],
    ["a welcome user with a lone surrogate", (s) => s.deliverRaw(`${WELCOME.slice(0, -1)},"user":"\\udc00"}`), 1007, true],
    ["a heartbeat that is not a number", (s, server) => server.welcome(s, s.take()[0], { heartbeat: { interval: { toString: 1 } } }), 1002, true],
    ["a heartbeat that is not a map", (s, server) => server.welcome(s, s.take()[0], { heartbeat: "25" }), 1002, true],
  ];
  for (const [name, breakIt, code, beforeWelcome] of cases) {
    const { client, server, errors } = setup({ server: { autoWelcome: !beforeWelcome } });
    await settle();
    const thrown = catchThrows(server.socket);
    breakIt(server.socket, server);
    await settle();
    assert.deepEqual(thrown, [], name);
    assert.equal(client.state, "closed", name);
    assert.equal(client.closeCode, code, name);
    assert.equal(errors.length, 1, name);
  }
});

test("an error reply whose code is not a string: 1002, and the request still settles", async () => {
  for (const error of ['{"code":{"toString":1},"reason":"x"}', '{"code":5}', '"oops"', "[1]"]) {
    const { client, server } = setup({ server: { autoReply: false } });
    await settle();
    const socket = server.socket;
    const outcome = client.request("r", 1).catch((e) => e);
    await settle();
    const thrown = catchThrows(socket);
    socket.deliverRaw(`{"type":"reply","seq":1,"re":1,"ack":1,"error":${error}}`);
    await settle();
    assert.deepEqual(thrown, [], error);
    assert.equal(client.closeCode, 1002, error);
    assert.ok((await outcome) instanceof ClientClosed, error);
  }
});

test("an error reply with a reason that is not a string rejects with an empty reason", async () => {
  const { client, server } = setup({ server: { autoReply: false } });
  await settle();
  const outcome = client.request("r", 1).catch((e) => e);
  await settle();
  server.reply(server.socket, 1, { error: { code: "nope", reason: { not: "text" } } });
  const error = await outcome;
  assert.ok(error instanceof WsgateError);
  assert.deepEqual([error.code, error.reason], ["nope", ""]);
  assert.equal(client.state, "connected");
});

test("an envelope larger than welcome.max_message_size is refused here with too_large: nothing is sent", async () => {
  const { client, server, errors } = setup({ server: { maxMessageSize: 200 } });
  await settle();
  const socket = server.socket;
  socket.take();
  const big = "x".repeat(300);
  for (const call of [() => client.request("r", big), () => client.send("s", big), () => client.publish("t", big), () => client.subscribe(big)]) {
    const error = await call().catch((e) => e);
    assert.ok(error instanceof WsgateError);
    assert.equal(error.code, "too_large");
    assert.match(error.reason, /at most 200/);
  }
  assert.equal(await client.request("r", "x".repeat(100)), "x".repeat(100)); // numbering goes on at 1
  assert.deepEqual(sequenced(socket.take()).map((e) => e.seq), [1]);
  assert.equal(client.state, "connected");
  assert.deepEqual(errors, []);
});

test("too_large before the first welcome: the protocol's default 64 KiB, then the server's own limit", async () => {
  const { client, server, errors } = setup({ server: { autoWelcome: false, maxMessageSize: 1000 } });
  const refused = await client.request("r", "x".repeat(70000)).catch((e) => e);
  assert.equal(refused.code, "too_large"); // over 65536 (docs/protocol.md §2.2)
  const queued = client.request("r", "x".repeat(2000)).catch((e) => e); // fits 64 KiB, not 1000
  client.send("s", "y".repeat(2000)); // fire and forget: its refusal goes to "error"
  const small = client.request("r", "small");
  await settle();
  const socket = server.socket;
  server.welcome(socket, socket.take()[0]);
  await settle();
  assert.equal((await queued).code, "too_large");
  assert.equal(errors.length, 1);
  assert.equal(errors[0].code, "too_large");
  assert.equal(await small, "small");
  assert.deepEqual(sequenced(socket.received).map((e) => [e.seq, e.data]), [[1, "small"]]);
});

test("too_large for a call waiting for room under maxPending", async () => {
  const { client, server } = setup({ maxPending: 1, server: { maxMessageSize: 200, autoReply: false } });
  await settle();
  client.send("first");
  await assert.rejects(client.request("r", "x".repeat(300)), (e) => e.code === "too_large");
  assert.equal(client.stats.pending, 1);
});

test("a welcome with window 0 closes with 1002, nothing thrown", async () => {
  const { client, server, errors } = setup({ server: { autoWelcome: false } });
  await settle();
  const hello = server.socket.take().find((e) => e.type === "hello");
  server.welcome(server.socket, hello, { window: 0 });
  await settle();
  assert.equal(client.state, "closed");
  assert.equal(client.closeCode, 1002);
  assert.equal(server.socket.closedBy.code, 1002);
  assert.equal(errors.at(-1).code, 1002);
});

test("a welcome with numbers no server sends closes with 1002 and stops, as the Python client does", async () => {
  const cases = {
    "max_message_size 0": { max_message_size: 0 },
    "max_message_size -1": { max_message_size: -1 },
    "max_message_size 1.5": { max_message_size: 1.5 },
    "max_message_size a string": { max_message_size: "big" },
    "max_message_size missing": { max_message_size: undefined },
    "a negative heartbeat interval": { heartbeat: { interval: -25, timeout: 10 } },
    "a negative heartbeat timeout": { heartbeat: { interval: 25, timeout: -1 } },
    "a new session with ack 7": { ack: 7 },
    "resumed not a boolean": { resumed: "no" },
  };
  for (const [name, extra] of Object.entries(cases)) {
    const { client, server, clock, errors } = setup({ server: { autoWelcome: false } });
    await settle();
    server.welcome(server.socket, server.socket.take()[0], extra);
    await settle();
    assert.equal(client.state, "closed", name);
    assert.equal(client.closeCode, 1002, name);
    assert.equal(server.socket.closedBy.code, 1002, name);
    assert.match(errors.at(-1).reason, /welcome/, name);
    await clock.advance(3600_000);
    assert.equal(server.sockets.length, 1, name); // no reconnection
    assert.deepEqual(clock.pending(), [], name);
  }
});
