// Heartbeat, the silence watchdog, the connect timeout, and closing.

import assert from "node:assert/strict";
import { test } from "node:test";

import { ClientClosed, openClient } from "../wsgate.js";
import { FakeClock, FakeServer, sequenced, settle, setup } from "./fake.js";

test("a ping is answered at once with a pong echoing ts", async () => {
  const { server } = setup();
  await settle();
  const socket = server.socket;
  socket.take();
  socket.deliver({ type: "ping", ts: 123456 });
  await settle();
  socket.deliver({ type: "ping" });
  await settle();
  assert.deepEqual(socket.take(), [{ type: "pong", ts: 123456 }, { type: "pong" }]);
});

test("silence for interval + timeout after welcome means a dead connection: drop and reconnect", async () => {
  const { client, server, clock } = setup({ server: { heartbeat: { interval: 25, timeout: 10 } } });
  await settle();
  const first = server.socket;
  await clock.advance(30000);
  first.deliver({ type: "ping", ts: 1 }); // anything heard counts
  await settle();
  await clock.advance(34999);
  assert.equal(client.state, "connected");
  await clock.advance(1);
  assert.equal(client.state, "connecting");
  assert.equal(first.closedBy.code, 1000);
  assert.equal(server.sockets.length, 1);
  await clock.advance(clock.pending()[0]);
  assert.equal(client.state, "resumed");
});

test("the silence watchdog runs on the monotonic clock: the wall clock set forward is no silence", async () => {
  let wall = 1_700_000_000_000; // Date.now: set forward an hour below, by NTP or the user
  const { client, server, clock } = setup({ now: () => wall, monotonic: () => clock.time });
  await settle();
  await clock.advance(30000);
  server.socket.deliver({ type: "ping", ts: 1 });
  await settle();
  wall += 3600 * 1000;
  await clock.advance(34999); // 35 s of silence after the ping, by the monotonic clock
  assert.equal(client.state, "connected");
  await clock.advance(1);
  assert.equal(client.state, "connecting");
});

test("with the heartbeat off (interval 0) silence is not watched", async () => {
  const { client, clock } = setup({ server: { heartbeat: { interval: 0, timeout: 10 } } });
  await settle();
  await clock.advance(3600 * 1000);
  assert.equal(client.state, "connected");
});

test("the connect timeout bounds the socket and the welcome together", async () => {
  const { client, server, clock } = setup({ connectTimeout: 10000, server: { autoOpen: false } });
  await settle();
  await clock.advance(9999);
  assert.equal(server.sockets.length, 1);
  await clock.advance(1);
  assert.equal(server.sockets[0].closedBy.code, 1000);
  assert.equal(client.state, "connecting");
  // Next attempt: the socket opens, hello goes, no welcome comes.
  server.autoOpen = true;
  server.autoWelcome = false;
  await clock.advance(clock.pending()[0]);
  assert.equal(server.sockets.length, 2);
  assert.equal(server.socket.take()[0].type, "hello");
  await clock.advance(10000);
  assert.ok(server.sockets[1].closedBy);
  server.autoWelcome = true;
  await clock.advance(clock.pending()[0]);
  assert.equal(client.state, "connected");
});

test("close() waits for acks, sends bye, and ends with close 1000; storage is cleared", async () => {
  const storage = new Map();
  const webStorage = {
    getItem: (k) => storage.get(k) ?? null,
    setItem: (k, v) => storage.set(k, v),
    removeItem: (k) => storage.delete(k),
  };
  const { client, server, clock, states } = setup({ storage: webStorage, server: { autoReply: false } });
  await settle();
  const socket = server.socket;
  const sent = client.send("last words", 1);
  await settle();
  assert.equal(storage.size, 1);
  let closed = false;
  const closing = client.close().then(() => (closed = true));
  await assert.rejects(client.send("too late"), ClientClosed);
  await clock.advance(1000);
  assert.equal(closed, false);
  assert.ok(!socket.received.some((e) => e.type === "bye"));
  socket.deliver({ type: "ack", ack: 1 });
  await settle();
  await sent;
  await closing;
  assert.equal(socket.received.at(-1).type, "bye");
  assert.equal(client.state, "closed");
  assert.equal(client.closeCode, 1000);
  assert.deepEqual(states, ["connected", "closed"]);
  assert.equal(storage.size, 0);
  assert.deepEqual(clock.pending(), []);
  await client.closed;
  await client.close(); // again: nothing to do
});

test("close() gives up on acks after closeTimeout: what is unacknowledged rejects with ClientClosed", async () => {
  const { client, server, clock } = setup({ closeTimeout: 2000, server: { autoReply: false } });
  await settle();
  const sent = client.send("never acked").catch((e) => e);
  const asked = client.request("never answered").catch((e) => e);
  await settle();
  const closing = client.close();
  await clock.advance(2000);
  await closing;
  assert.equal(client.state, "closed");
  assert.ok((await sent) instanceof ClientClosed);
  assert.ok((await asked) instanceof ClientClosed);
  assert.equal(server.socket.received.at(-1).type, "bye"); // the session ends all the same
});

test("close() before any connection closes at once", async () => {
  const clock = new FakeClock();
  const server = new FakeServer({ autoOpen: false });
  const client = openClient("ws://test.invalid/ws", { WebSocket: server.WebSocket, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout, now: clock.now });
  await settle();
  await client.close();
  assert.equal(client.state, "closed");
  assert.equal(server.sockets[0].closedBy.code, 1000);
  assert.deepEqual(clock.pending(), []);
});

test("calls after close reject with ClientClosed; closed resolves once", async () => {
  const { client } = setup();
  await settle();
  await client.close();
  const error = await client.request("x").catch((e) => e);
  assert.ok(error instanceof ClientClosed);
  assert.equal(error.code, 1000);
  await assert.rejects(client.subscribe("t"), ClientClosed);
  await assert.rejects(client.publish("t", 1), ClientClosed);
  assert.equal(await client.closed, undefined);
});

test("stats count connections, resumes and what is pending", async () => {
  const { client, server, clock } = setup({ server: { autoReply: false } });
  await settle();
  client.send("a");
  client.send("b");
  await settle();
  assert.deepEqual(client.stats, { connects: 1, resumes: 0, sessionsLost: 0, lostSends: 0, pending: 2 });
  server.socket.serverClose(1001, "draining");
  await settle();
  await clock.advance(clock.pending()[0]);
  assert.deepEqual(client.stats, { connects: 2, resumes: 1, sessionsLost: 0, lostSends: 0, pending: 2 });
  assert.deepEqual(sequenced(server.socket.received).map((e) => e.seq), [1, 2]);
});
