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

/** A room publication at `offset`, epoch e1, with its offset as data. */
const room = (offset) => ({ type: "msg", topic: "room", offset, epoch: "e1", data: offset });

/**
 * A page that follows room up to 3, subscribes again (a `sub` since 3), gets 4 and 5
 * held by that recovery and acked, and reloads before the sub's reply reaches it. With
 * `ackSub` false, nothing acknowledged the sub: the reloaded page resends it.
 */
async function pageReloadingInRecovery({ ackSub = true } = {}) {
  const storage = new FakeStorage();
  const server = new FakeServer({ window: 16 });
  const page = setup({ server, storage });
  await settle();
  await page.client.subscribe("room"); // reply {offset 0, e1}
  const socket = server.socket;
  for (const offset of [1, 2, 3]) server.push(socket, room(offset));
  await page.clock.advance(200);
  assert.deepEqual(page.messages.map((m) => m.data), [1, 2, 3]);
  // Subscribe again (asks since 3). The server sends 4, 5 first; its reply is slow.
  server.autoReply = false;
  page.client.subscribe("room").catch(() => {});
  await settle();
  const sub = sequenced(socket.take()).filter((e) => e.type === "sub").at(-1);
  assert.deepEqual(sub.since, { offset: 3, epoch: "e1" });
  socket.session.processed = sub.seq;
  for (const offset of [4, 5]) server.push(socket, room(offset), { ack: ackSub });
  await page.clock.advance(200); // held, and acked within 100 ms
  assert.equal(socket.session.clientAcked, socket.session.outSeq, "the client acked the held messages");
  return { storage, server, page, socket, sub };
}

test("held recovery messages survive a reload: the reloaded page asks again from the unmoved position", async () => {
  for (const ackSub of [true, false]) {
    const { storage, server, socket, sub } = await pageReloadingInRecovery({ ackSub });
    // Storage holds the position before what is held, and the topic under recovery.
    const saved = JSON.parse(storage.getItem(KEY));
    assert.deepEqual(saved.topics, [["room", 3, "e1"]]);
    assert.deepEqual(saved.recovering, ["room"]);
    assert.deepEqual(saved.pending.map((p) => p.seq), ackSub ? [] : [sub.seq]);
    server.reply(socket, sub.seq, { data: { offset: 5, epoch: "e1", recovered: true } }); // in flight...
    socket.serverClose(1006); // ...the page reloads first
    await settle();
    const reloaded = setup({ server, storage });
    await settle();
    assert.equal(reloaded.client.state, "resumed");
    const second = server.socket;
    const [again] = sequenced(second.received).filter((e) => e.type === "sub");
    assert.deepEqual([again.topic, again.since], ["room", { offset: 3, epoch: "e1" }]);
    // The old reply came again with the resume (to the restored sub, if it was still
    // unacknowledged): it ends nothing, delivers nothing, moves nothing.
    assert.deepEqual(reloaded.messages, []);
    second.session.processed = again.seq;
    server.push(second, room(6)); // live, before the restarted subscription's
    for (const offset of [4, 5, 6]) server.push(second, room(offset));
    server.reply(second, again.seq, { data: { offset: 6, epoch: "e1", recovered: true } });
    server.push(second, room(7));
    await reloaded.clock.advance(200);
    // The page saw 1..3; the reloaded page sees 4, 5, 6 (each once, in order), then 7.
    assert.deepEqual(reloaded.messages.map((m) => m.data), [4, 5, 6, 7], `ackSub ${ackSub}`);
    assert.deepEqual(reloaded.client.recovered, { room: true });
    assert.deepEqual(JSON.parse(storage.getItem(KEY)).topics, [["room", 7, "e1"]]);
    assert.deepEqual(JSON.parse(storage.getItem(KEY)).recovering, []);
    assert.deepEqual(server.violations, []);
  }
});

test("a recovery survives two reloads, the second before any welcome", async () => {
  const { storage, server, socket } = await pageReloadingInRecovery();
  socket.serverClose(1006);
  await settle();
  server.autoOpen = false;
  const between = setup({ server, storage });
  between.client.send("queued"); // saves the state before any welcome
  await settle();
  assert.deepEqual(JSON.parse(storage.getItem(KEY)).recovering, ["room"]);
  server.autoOpen = true;
  const reloaded = setup({ server, storage });
  await settle();
  assert.equal(reloaded.client.state, "resumed");
  const subs = sequenced(server.socket.received).filter((e) => e.type === "sub");
  assert.deepEqual(subs.map((e) => e.since), [{ offset: 3, epoch: "e1" }]);
});

test("a reloaded page whose session is gone recovers a topic under recovery once, from its position", async () => {
  const { storage, server, socket } = await pageReloadingInRecovery();
  socket.session.ended = true;
  socket.serverClose(1006);
  await settle();
  server.autoReply = true;
  const reloaded = setup({ server, storage });
  await settle();
  assert.equal(reloaded.client.state, "connected");
  const subs = sequenced(server.socket.received).filter((e) => e.type === "sub");
  assert.deepEqual(subs.map((e) => [e.topic, e.since]), [["room", { offset: 3, epoch: "e1" }]]);
});

// What _save writes for a client that never connected, as garbage variants start from.
const base = { v: 1, session: "gone", resumeToken: "x", user: null, processed: 0, nextSeq: 1, acked: 0, pending: [], topics: [], userTopic: null };

test("a stored topic that cannot be encoded is discarded, not thrown out of a welcome", async () => {
  const storage = new FakeStorage();
  storage.map.set(KEY, JSON.stringify({ ...base, topics: [["\ud800", 1, "e"]] }));
  const server = new FakeServer({ autoWelcome: false });
  const page = setup({ server, storage });
  await settle();
  const s = server.socket;
  let thrown = null;
  const onmessage = s.onmessage;
  s.onmessage = (e) => {
    try {
      onmessage(e);
    } catch (err) {
      thrown = err;
    }
  };
  server.welcome(s, s.take()[0]);
  await settle();
  assert.equal(thrown, null, `uncaught from onmessage: ${thrown}`);
  assert.equal(page.client.state, "connected");
  assert.equal(page.errors.length, 1); // the discarded storage
});

test("a stored negative processed is discarded: no resume ack outside [0, 2**53)", async () => {
  const storage = new FakeStorage();
  storage.map.set(KEY, JSON.stringify({ ...base, processed: -1 }));
  const server = new FakeServer();
  const page = setup({ server, storage });
  await settle();
  const hello = server.socket.received[0];
  assert.equal(hello.resume, undefined);
  assert.equal(page.client.state, "connected");
});

test("every field of a stored state is checked; any garbage discards it whole", async () => {
  const msg = (seq, extra = {}) => ({ seq, written: true, envelope: { type: "msg", seq, event: "e", ...extra } });
  const variants = {
    version: { v: 2 },
    session: { session: 5 },
    resumeToken: { resumeToken: {} },
    user: { user: "\udc00" },
    userTopic: { userTopic: 7 },
    "processed not an integer": { processed: 1.5 },
    "nextSeq 0": { nextSeq: 0 },
    "acked at nextSeq": { acked: 2, nextSeq: 2 },
    "nextSeq past 2**53": { nextSeq: 2 ** 53 },
    "pending not an array": { pending: {} },
    "pending at nextSeq": { pending: [msg(1)] },
    "pending at acked": { acked: 1, nextSeq: 3, pending: [msg(1)] },
    "pending out of order": { nextSeq: 4, pending: [msg(2), msg(1)] },
    "pending twice": { nextSeq: 4, pending: [msg(1), msg(1)] },
    "pending written": { nextSeq: 2, pending: [{ ...msg(1), written: "yes" }] },
    "pending hello": { nextSeq: 2, pending: [{ seq: 1, written: false, envelope: { type: "hello" } }] },
    "pending sub without topic": { nextSeq: 2, pending: [{ seq: 1, written: false, envelope: { type: "sub" } }] },
    "pending pub without data": { nextSeq: 2, pending: [{ seq: 1, written: false, envelope: { type: "pub", topic: "t" } }] },
    "pending lone surrogate": { nextSeq: 2, pending: [msg(1, { data: "\ud800" })] },
    "pending too deep": { nextSeq: 2, pending: [msg(1, { data: JSON.parse("[".repeat(40) + "]".repeat(40)) })] },
    "topics not an array": { topics: {} },
    "topic not a string": { topics: [[5, null, null]] },
    "topic twice": { topics: [["a", null, null], ["a", 1, "e"]] },
    "offset not an integer": { topics: [["a", 1.5, "e"]] },
    "epoch missing": { topics: [["a", 1, null]] },
    "topic entry short": { topics: [["a"]] },
    "recovering unknown": { recovering: ["a"] },
    "recovering without position": { topics: [["a", null, null]], recovering: ["a"] },
    maxMessageSize: { maxMessageSize: 0 },
    "unfollowed not an array": { unfollowed: "a" },
    "unfollowed unknown": { unfollowed: ["a"] },
  };
  for (const [name, change] of Object.entries(variants)) {
    const storage = new FakeStorage();
    storage.map.set(KEY, JSON.stringify({ ...base, ...change }));
    const page = setup({ storage });
    await settle();
    assert.equal(socketOf(page).received[0].resume, undefined, name);
    assert.equal(page.client.state, "connected", name);
    assert.equal(page.errors.length, 1, name);
    assert.match(page.errors[0].message, /not a saved wsgate session/, name);
  }
  // And the base itself is good: it is resumed from (as a lost session).
  const storage = new FakeStorage();
  storage.map.set(KEY, JSON.stringify({ ...base, topics: [["a", 1, "e"]], recovering: ["a"], maxMessageSize: 100 }));
  const page = setup({ storage });
  await settle();
  assert.deepEqual(socketOf(page).received[0].resume, { session: "gone", token: "x", ack: 0 });
  assert.deepEqual(page.errors, []);
});

/** The latest socket of a page's server. */
const socketOf = (page) => page.server.socket;
