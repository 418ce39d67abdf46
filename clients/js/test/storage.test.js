// Persistence: a reloaded page (a new client on the same storage) resumes the session,
// and storage is written before any ack or seq that it must cover leaves.

import assert from "node:assert/strict";
import { test } from "node:test";

import { FakeServer, FakeStorage, sequenced, settle, setup } from "./fake.js";

const KEY = "wsgate:ws://test.invalid/ws";

/**
 * A page in a session: a room followed up to offset 3, the user topic known, a send
 * processed by the server but not acknowledged, a request written and unanswered. Then
 * the page goes away (its socket dies; its clock never runs again).
 */
async function pageThatReloads({ log = [], topics = {} } = {}) {
  const storage = new FakeStorage(log);
  const server = new FakeServer({ user: "ada", userTopic: { offset: 1, epoch: "u1" }, log, topics });
  const page = setup({ server, storage });
  const { client } = page;
  await settle();
  await client.subscribe("room");
  const socket = server.socket;
  for (const offset of [1, 2]) server.push(socket, { type: "msg", topic: "room", offset, epoch: "e1", data: offset });
  await page.clock.advance(100);
  server.autoReply = false;
  client.send("s", "sent");
  client.request("r", "asked").catch(() => {});
  await settle();
  socket.session.processed = 2; // the send is processed; nothing said yet
  server.push(socket, { type: "msg", topic: "room", offset: 3, epoch: "e1", data: 3 }, { ack: false });
  await settle();
  socket.serverClose(1006); // the page is gone (its clock never advances again)
  await settle();
  return { storage, server, log, old: page };
}

test("a reloaded page resumes the saved session and resends what was unacknowledged, with its seq", async () => {
  const { storage, server } = await pageThatReloads();
  const saved = JSON.parse(storage.getItem(KEY));
  assert.equal(saved.session, "s1");
  assert.deepEqual(saved.pending.map((p) => [p.seq, p.envelope.event]), [[2, "s"], [3, "r"]]);
  server.autoReply = true;
  const page = setup({ server, storage });
  assert.equal(page.client.session, "s1"); // known before any connection
  await settle();
  const socket = server.socket;
  assert.deepEqual(socket.received[0], { type: "hello", resume: { session: "s1", token: "rt-s1", ack: 4 } });
  assert.equal(page.client.state, "resumed");
  // welcome.ack 2: the send was processed; the request goes again as seq 3.
  assert.deepEqual(sequenced(socket.received).map((e) => [e.seq, e.event]), [[3, "r"]]);
  await settle();
  assert.deepEqual(page.errors, []); // its reply has no promise left: dropped silently
  // New calls go on from the saved numbering, and the topic from its saved position.
  assert.equal(await page.client.request("echo", "after reload"), "after reload");
  assert.equal(sequenced(socket.received).at(-1).seq, 4);
  await page.client.subscribe("room");
  assert.deepEqual(sequenced(socket.received).at(-1).since, { offset: 3, epoch: "e1" });
});

test("storage is written before every ack above what it holds, and before every new seq", async () => {
  const log = [];
  const { storage, server } = await pageThatReloads({ log });
  server.autoReply = true;
  const page = setup({ server, storage });
  await settle();
  for (let i = 0; i < 12; i++) server.push(server.socket, { type: "msg", data: i });
  await page.clock.advance(100);
  await page.client.send("more");
  await page.clock.advance(100);
  let saved = null;
  let checked = 0;
  for (const entry of log) {
    if (entry.kind === "save") saved = entry.state;
    if (entry.kind === "remove") saved = null;
    if (entry.kind !== "send") continue;
    const { envelope } = entry;
    const ack = envelope.type === "hello" ? envelope.resume?.ack : envelope.ack;
    if (ack !== undefined) {
      assert.ok(saved && saved.processed >= ack, `ack ${ack} went out with ${saved?.processed} saved`);
      checked += 1;
    }
    if (typeof envelope.seq === "number") {
      assert.ok(saved && saved.nextSeq > envelope.seq, `seq ${envelope.seq} went out with ${saved?.nextSeq} saved`);
      checked += 1;
    }
  }
  assert.ok(checked >= 8, `${checked} checks`);
  assert.deepEqual(server.violations, []);
});

test("a reloaded page whose session is gone: connected, lost envelopes reported, topics recovered", async () => {
  const topics = { room: (since) => (since ? { offset: 5, epoch: "e1", recovered: false } : { offset: 0, epoch: "e1" }) };
  const { storage, server } = await pageThatReloads({ topics });
  server.sessions.get("s1").ended = true;
  server.autoReply = true;
  const page = setup({ server, storage });
  await settle();
  assert.equal(page.client.state, "connected");
  assert.equal(page.client.session, "s2");
  assert.equal(page.client.stats.sessionsLost, 1);
  assert.equal(page.client.stats.lostSends, 2); // written before the reload, fate unknown
  assert.equal(page.errors.length, 1);
  assert.equal(page.errors[0].name, "SessionLost");
  const subs = sequenced(server.socket.received).filter((e) => e.type === "sub");
  assert.deepEqual(
    subs.map((e) => [e.topic, e.since]),
    [
      ["user:ada", { offset: 1, epoch: "u1" }],
      ["room", { offset: 3, epoch: "e1" }],
    ],
  );
  assert.deepEqual(page.client.recovered, { "user:ada": true, room: false });
});

test("envelopes never written before the reload are renumbered in a new session", async () => {
  const storage = new FakeStorage();
  const server = new FakeServer({ autoOpen: false });
  const old = setup({ server, storage });
  old.client.send("queued", 1);
  old.client.send("queued", 2);
  await settle();
  assert.deepEqual(JSON.parse(storage.getItem(KEY)).pending.map((p) => [p.seq, p.written]), [[1, false], [2, false]]);
  server.autoOpen = true;
  const page = setup({ server, storage });
  await settle();
  assert.equal(page.client.state, "connected");
  assert.deepEqual(sequenced(server.socket.received).map((e) => [e.seq, e.data]), [[1, 1], [2, 2]]);
  assert.equal(page.client.stats.lostSends, 0);
});

test("close() clears storage; a final close code does too", async () => {
  for (const end of [(c) => c.client.close(), (c) => c.server.socket.serverClose(4005, "kicked")]) {
    const storage = new FakeStorage();
    const page = setup({ storage });
    await settle();
    await page.client.send("x");
    await settle();
    assert.notEqual(storage.getItem(KEY), null);
    await end(page);
    await settle();
    assert.equal(page.client.state, "closed");
    assert.equal(storage.getItem(KEY), null);
  }
});

test("giving up after maxAttempts keeps storage: the next page may still resume", async () => {
  const storage = new FakeStorage();
  const page = setup({ storage, backoff: { maxAttempts: 0 } });
  await settle();
  page.server.socket.serverClose(1006);
  await settle();
  assert.equal(page.client.state, "closed");
  assert.equal(JSON.parse(storage.getItem(KEY)).session, "s1");
});

test("a storage that refuses to write is reported, and the client carries on", async () => {
  const storage = new FakeStorage();
  let removed = 0;
  storage.setItem = () => {
    throw new Error("QuotaExceededError");
  };
  storage.removeItem = () => removed++;
  const page = setup({ storage });
  await settle();
  assert.equal(await page.client.request("echo", 1), 1);
  assert.ok(page.errors.length >= 1);
  assert.equal(page.errors[0].message, "QuotaExceededError");
  assert.ok(removed >= 1);
});

test("a storage holding garbage is ignored (and removed)", async () => {
  const storage = new FakeStorage();
  storage.map.set(KEY, "{not json");
  const page = setup({ storage, storageKey: KEY });
  await settle();
  assert.equal(page.client.state, "connected");
  assert.equal(page.client.session, "s1");
  assert.equal(page.errors.length, 1);
});
