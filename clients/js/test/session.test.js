// Sessions across connections: resume, and what happens when the server lost the session
// (renumbering, SessionLost, topic recovery, the user topic).

import assert from "node:assert/strict";
import { test } from "node:test";

import { SessionLost } from "../wsgate.js";
import { sequenced, settle, setup } from "./fake.js";

/** Cut the connection the way a network would, and let the client come back. */
async function cutAndReconnect(server, clock) {
  server.socket.serverClose(1006);
  await settle();
  await clock.advance(clock.pending()[0]);
}

test("resume: hello.resume carries session, token and ack; what the server lacks is resent with its seq", async () => {
  const { client, server, clock, messages } = setup({ server: { autoReply: false } });
  await settle();
  const first = server.socket;
  const sends = [1, 2, 3].map((n) => client.send("n", n));
  const request = client.request("r", 4);
  await settle();
  assert.deepEqual(sequenced(first.take()).map((e) => e.seq), [1, 2, 3, 4]);
  server.push(first, { type: "msg", data: "a" });
  server.push(first, { type: "msg", data: "b" });
  await settle();
  first.session.processed = 2; // the server processed 1 and 2, and said nothing yet
  await cutAndReconnect(server, clock);
  const second = server.socket;
  assert.deepEqual(second.received[0], { type: "hello", resume: { session: "s1", token: "rt-s1", ack: 2 } });
  assert.equal(client.state, "resumed");
  assert.equal(client.stats.resumes, 1);
  await Promise.all(sends.slice(0, 2)); // welcome.ack 2 acknowledged them
  // 3 and 4 again, in order, with their original seq, before anything new.
  client.send("new", 5);
  await settle();
  assert.deepEqual(sequenced(second.received).map((e) => [e.seq, e.data]), [[3, 3], [4, 4], [5, 5]]);
  server.autoReply = true;
  second.session.processed = 4;
  server.reply(second, 4, { data: "four" });
  assert.equal(await request, "four");
  assert.deepEqual(messages.map((m) => m.data), ["a", "b"]);
});

test("resume: the server's envelopes above resume.ack come again, once each", async () => {
  const { server, clock, messages } = setup();
  await settle();
  const first = server.socket;
  server.push(first, { type: "msg", data: 1 });
  server.push(first, { type: "msg", data: 2 });
  await settle();
  first.serverClose(1006); // before any ack: the server still holds 1 and 2
  await settle();
  // The client processed both: hello.resume.ack says so, and the server resends nothing.
  await clock.advance(clock.pending()[0]);
  assert.equal(server.socket.take()[0].resume.ack, 2);
  // And if a server resends anyway (stale), the duplicates are acked, not delivered.
  server.socket.deliver({ type: "msg", seq: 2, data: 2 });
  await settle();
  assert.deepEqual(server.socket.take(), [{ type: "ack", ack: 2 }]);
  assert.deepEqual(messages.map((m) => m.data), [1, 2]);
  server.push(server.socket, { type: "msg", data: 3 });
  await settle();
  assert.deepEqual(messages.map((m) => m.data), [1, 2, 3]);
});

test("resume: a welcome resending a batch above the ack delivers it in order", async () => {
  const { server, clock, messages } = setup();
  await settle();
  const session = server.socket.session;
  server.socket.serverClose(1006);
  await settle();
  // Published while detached: the server holds them for the resume.
  server.number({ session }, { type: "msg", data: "x" });
  server.number({ session }, { type: "msg", data: "y" });
  await clock.advance(clock.pending()[0]);
  assert.deepEqual(messages.map((m) => m.data), ["x", "y"]);
});

test("drop() cuts the connection without bye; the client resumes", async () => {
  const { client, server, clock, states } = setup();
  await settle();
  const first = server.socket;
  client.drop();
  await settle();
  assert.equal(first.closedBy.code, 1000); // a close frame, but no bye: the session stays
  assert.ok(!first.received.some((e) => e.type === "bye"));
  assert.equal(client.state, "connecting");
  await clock.advance(clock.pending()[0]);
  assert.deepEqual(states, ["connected", "connecting", "resumed"]);
  assert.equal(await client.request("echo", 1), 1);
});

test("a resume ack below what the server acknowledged before is a protocol error (1002)", async () => {
  const { client, server, clock } = setup();
  await settle();
  await client.send("n", 1); // acked: 1
  server.socket.serverClose(1006);
  await settle();
  server.autoWelcome = false;
  await clock.advance(clock.pending()[0]);
  server.welcome(server.socket, server.socket.take()[0], { ack: 0 });
  await settle();
  assert.equal(client.state, "closed");
  assert.equal(client.closeCode, 1002);
});

/**
 * A client in a session with a room subscribed (position 5) and the user topic known
 * from welcome.user_topic, then with calls in flight when the server loses the session.
 */
async function losingSession({ userTopic = { offset: 2, epoch: "u1" } } = {}) {
  const topics = {
    room: (since) => (since ? { offset: 9, epoch: "e1", recovered: since.epoch === "e1" } : { offset: 0, epoch: "e1" }),
    "user:ada": (since) => ({ offset: 4, epoch: "u1", ...(since ? { recovered: false } : {}) }),
  };
  const env = setup({ server: { user: "ada", userTopic, topics, window: 2 } });
  const { client, server } = env;
  await settle();
  const first = server.socket;
  assert.deepEqual(await client.subscribe("room"), { offset: 0, epoch: "e1" });
  for (let offset = 1; offset <= 5; offset++) server.push(first, { type: "msg", topic: "room", offset, epoch: "e1", data: offset });
  await settle();
  server.autoReply = false;
  const calls = {
    request: client.request("written request", 1).catch((e) => e),
    send: client.send("written send", 2).catch((e) => e),
    unwrittenSend: client.send("unwritten send", 3),
    unwrittenRequest: client.request("unwritten request", 4),
  };
  await settle();
  first.take();
  return { ...env, first, calls };
}

test("session lost: renumbering, SessionLost, sub with since for each topic, recovered", async () => {
  const { client, server, clock, first, calls, states } = await losingSession();
  const recoveredEvents = [];
  client.on("recovered", (topic, ok) => recoveredEvents.push([topic, ok]));
  first.session.ended = true; // the server dropped it (resume_ttl, a restart...)
  server.autoReply = true;
  server.window = 16;
  await cutAndReconnect(server, clock);
  const second = server.socket;
  assert.equal(client.state, "session_lost");
  assert.deepEqual(states, ["connected", "connecting", "session_lost"]);
  assert.equal(client.session, "s2");
  const hello = second.received[0];
  assert.equal(hello.resume.session, "s1");
  // Written and unacknowledged: may or may not have run.
  const requestError = await calls.request;
  assert.ok(requestError instanceof SessionLost);
  assert.ok((await calls.send) instanceof SessionLost);
  assert.equal(client.stats.lostSends, 1);
  assert.equal(client.stats.sessionsLost, 1);
  // Never written: renumbered from 1 in the new session, then the topics from where we were.
  assert.deepEqual(
    sequenced(second.received).map((e) => [e.seq, e.type, e.event ?? e.topic, e.since]),
    [
      [1, "msg", "unwritten send", undefined],
      [2, "msg", "unwritten request", undefined],
      [3, "sub", "user:ada", { offset: 2, epoch: "u1" }],
      [4, "sub", "room", { offset: 5, epoch: "e1" }],
    ],
  );
  await calls.unwrittenSend;
  assert.equal(await calls.unwrittenRequest, 4);
  await settle();
  assert.deepEqual(client.recovered, { room: true, "user:ada": false });
  assert.deepEqual(recoveredEvents, [["user:ada", false], ["room", true]]);
});

test("session lost: a subscribe in flight is answered by the resubscription; an unsubscribe needs nothing", async () => {
  const { client, server, clock, first } = await losingSession();
  const subscribing = client.subscribe("other");
  const leaving = client.unsubscribe("room");
  await settle();
  first.session.ended = true;
  server.autoReply = true;
  server.window = 16;
  await cutAndReconnect(server, clock);
  assert.deepEqual(await subscribing, { offset: 0, epoch: "e1" });
  assert.equal(await leaving, undefined);
  const subs = sequenced(server.socket.received).filter((e) => e.type === "sub").map((e) => e.topic);
  assert.deepEqual(subs.sort(), ["other", "user:ada"]); // room was left: not followed again
});

test("session lost: the user topic's start comes from welcome.user_topic, no sub at start", async () => {
  const { client, server } = setup({ server: { user: "ada", userTopic: { offset: 7, epoch: "u9" } } });
  await settle();
  assert.deepEqual(sequenced(server.socket.take()), []);
  assert.equal(client.state, "connected");
});

test("a server without welcome.user_topic: the user topic's position is learned with a sub", async () => {
  const topics = { "user:ada": () => ({ offset: 3, epoch: "u1" }) };
  const { client, server, clock } = setup({ server: { user: "ada", topics } });
  await settle();
  assert.deepEqual(sequenced(server.socket.received), [{ type: "sub", seq: 1, topic: "user:ada" }]);
  server.socket.session.ended = true;
  await cutAndReconnect(server, clock);
  assert.equal(client.state, "session_lost");
  assert.deepEqual(sequenced(server.socket.received), [{ type: "sub", seq: 1, topic: "user:ada", since: { offset: 3, epoch: "u1" } }]);
});

test("the user topic's position follows its messages", async () => {
  const { server, clock } = setup({ server: { user: "ada", userTopic: { offset: 2, epoch: "u1" } } });
  await settle();
  server.push(server.socket, { type: "msg", topic: "user:ada", offset: 3, epoch: "u1", data: "dm" });
  await settle();
  server.socket.session.ended = true;
  await cutAndReconnect(server, clock);
  const [sub] = sequenced(server.socket.received);
  assert.deepEqual(sub.since, { offset: 3, epoch: "u1" });
});

/** A session lost and a new one welcomed: the recovery's `sub` of "room" (since 5) is
 * on its way; `room(n)` makes publication n of it. */
async function recoveringRoom() {
  const env = await losingSession();
  const { server, clock, first, messages } = env;
  first.session.ended = true;
  server.window = 16;
  await cutAndReconnect(server, clock);
  const second = server.socket;
  const subRoom = sequenced(second.received).find((e) => e.type === "sub" && e.topic === "room");
  messages.length = 0;
  const room = (offset) => ({ type: "msg", topic: "room", offset, epoch: "e1", data: offset });
  return { ...env, second, subRoom, room };
}

test("recovery: a live publication before the recovered ones loses nothing, duplicates nothing and waits its turn", async () => {
  const { client, server, messages, second, subRoom, room } = await recoveringRoom();
  // The new session already follows room (an on_connect hook): 9 arrives live first,
  // then the sub since 5 sends 6..9, then its reply.
  server.push(second, room(9));
  for (const offset of [6, 7, 8, 9]) server.push(second, room(offset));
  server.push(second, { type: "reply", re: subRoom.seq, data: { offset: 9, epoch: "e1", recovered: true } });
  server.push(second, room(10));
  await settle();
  // Held until the reply, then in offset order; 10 came after the reply: live.
  assert.deepEqual(messages.map((m) => m.data), [6, 7, 8, 9, 10]);
  assert.equal(client.recovered.room, true);
});

test("recovery answered unavailable: what it holds waits for the retry, asked from the same position", async () => {
  const { client, server, clock, messages, second, subRoom, room } = await recoveringRoom();
  assert.deepEqual(subRoom.since, { offset: 5, epoch: "e1" });
  // A live one comes, then the broker cannot answer the recovery.
  server.push(second, room(9));
  server.push(second, { type: "reply", re: subRoom.seq, error: { code: "unavailable", reason: "broker down" } });
  await settle();
  assert.deepEqual(messages.map((m) => m.data), []); // still held: 6..8 are not here yet
  second.take();
  await clock.advance(1000); // the retry's pause: 500 ms × [0.5, 1.5)
  await settle();
  const retry = sequenced(second.take()).find((e) => e.type === "sub" && e.topic === "room");
  assert.deepEqual(retry.since, { offset: 5, epoch: "e1" }); // not from 9
  for (const offset of [6, 7, 8, 9]) server.push(second, room(offset));
  server.push(second, { type: "reply", re: retry.seq, data: { offset: 9, epoch: "e1", recovered: true } });
  await settle();
  assert.deepEqual(messages.map((m) => m.data), [6, 7, 8, 9]);
  assert.equal(client.recovered.room, true);
});

test("subscribing again to a followed topic asks with since and drops what was already processed", async () => {
  const { client, server, messages } = setup();
  await settle();
  const socket = server.socket;
  await client.subscribe("room");
  for (const offset of [1, 2, 3]) server.push(socket, { type: "msg", topic: "room", offset, epoch: "e1", data: offset });
  await settle();
  server.autoReply = false;
  const again = client.subscribe("room");
  await settle();
  const sub = sequenced(socket.take()).at(-1);
  assert.deepEqual(sub.since, { offset: 3, epoch: "e1" });
  for (const offset of [2, 3, 4]) server.push(socket, { type: "msg", topic: "room", offset, epoch: "e1", data: offset });
  socket.session.processed = sub.seq;
  server.reply(socket, sub.seq, { data: { offset: 4, epoch: "e1", recovered: true } });
  assert.deepEqual(await again, { offset: 4, epoch: "e1", recovered: true });
  assert.deepEqual(messages.map((m) => m.data), [1, 2, 3, 4]);
});

test("a new epoch in a topic is delivered (offsets of another history mean nothing)", async () => {
  const { client, server, messages } = setup();
  await settle();
  await client.subscribe("room");
  const socket = server.socket;
  server.push(socket, { type: "msg", topic: "room", offset: 5, epoch: "e1", data: "old" });
  server.push(socket, { type: "msg", topic: "room", offset: 1, epoch: "e2", data: "new" });
  await settle();
  assert.deepEqual(messages.map((m) => m.data), ["old", "new"]);
});

test("subscribe, publish and unsubscribe answer with the reply's data; a refused subscribe is forgotten", async () => {
  const topics = {
    secret() {
      throw { code: "forbidden", reason: "no" };
    },
  };
  const { client, server, clock } = setup({ server: { topics } });
  await settle();
  assert.deepEqual(await client.subscribe("room"), { offset: 0, epoch: "e1" });
  assert.deepEqual(await client.publish("room", { text: "hi" }), { offset: 1, epoch: "e1" });
  const refused = await client.subscribe("secret").catch((e) => e);
  assert.equal(refused.code, "forbidden");
  assert.equal(await client.unsubscribe("room"), undefined);
  const wire = sequenced(server.socket.received).map(({ seq, ack, ...rest }) => rest);
  assert.deepEqual(wire, [
    { type: "sub", topic: "room" },
    { type: "pub", topic: "room", data: { text: "hi" } },
    { type: "sub", topic: "secret" },
    { type: "unsub", topic: "room" },
  ]);
  server.socket.session.ended = true;
  await cutAndReconnect(server, clock);
  assert.deepEqual(sequenced(server.socket.received), []); // nothing left to follow
});

test("an automatic resubscription the broker refuses as unavailable is tried again", async () => {
  let refusals = 1;
  const topics = {
    room(since) {
      if (since && refusals-- > 0) throw { code: "unavailable", reason: "broker down" };
      return { offset: 1, epoch: "e1", ...(since ? { recovered: true } : {}) };
    },
  };
  const { client, server, clock } = setup({ server: { topics } });
  await settle();
  await client.subscribe("room");
  server.push(server.socket, { type: "msg", topic: "room", offset: 1, epoch: "e1" });
  await settle();
  server.socket.session.ended = true;
  await cutAndReconnect(server, clock);
  assert.deepEqual(client.recovered, {});
  await clock.advance(1000);
  assert.deepEqual(client.recovered, { room: true });
});

test("a subscribe() chained onto the automatic resubscription settles when the client stops first", async () => {
  const { client, server, clock } = setup({ server: { autoReply: false } });
  await settle();
  const subscribing = client.subscribe("room");
  let outcome = "pending";
  subscribing.then(
    () => (outcome = "resolved"),
    (e) => (outcome = `rejected: ${e.name}`),
  );
  await settle(); // written, unanswered
  const first = server.socket;
  first.session.ended = true; // the server loses the session
  first.serverClose(1006);
  await settle();
  await clock.advance(clock.pending()[0]); // resumed: false; an automatic sub for room
  assert.equal(client.state, "session_lost");
  server.socket.serverClose(4005, "kicked"); // final, before the automatic sub's reply
  await settle();
  assert.equal(client.state, "closed");
  assert.equal(outcome, "rejected: ClientClosed");
});

test("a subscribe() of the user topic lost with its session is answered by the new welcome's user_topic", async () => {
  // A server without welcome.user_topic at first: the user topic's position is unknown.
  const { client, server, clock } = setup({ server: { user: "ada", autoReply: false } });
  await settle();
  const subscribing = client.subscribe("user:ada");
  await settle();
  server.socket.session.ended = true;
  server.userTopic = { offset: 7, epoch: "u1" }; // the next welcome says where it starts
  await cutAndReconnect(server, clock);
  assert.equal(client.state, "session_lost");
  assert.deepEqual(sequenced(server.socket.received), []); // nothing to recover, no sub
  assert.deepEqual(await subscribing, { offset: 7, epoch: "u1" });
});

test("unsubscribe() during a recovery of the topic: the sub's reply does not bring it back", async () => {
  const { client, server, clock, messages } = setup();
  await settle();
  await client.subscribe("room");
  const socket = server.socket;
  server.push(socket, { type: "msg", topic: "room", offset: 1, epoch: "e1" });
  await clock.advance(200);
  server.autoReply = false;
  client.subscribe("room").catch(() => {}); // since 1: a recovery
  await settle();
  const sub = sequenced(socket.take()).filter((e) => e.type === "sub").at(-1);
  socket.session.processed = sub.seq;
  server.push(socket, { type: "msg", topic: "room", offset: 2, epoch: "e1" }); // held
  await settle();
  client.unsubscribe("room").catch(() => {});
  server.reply(socket, sub.seq, { data: { offset: 2, epoch: "e1", recovered: true } });
  await clock.advance(200);
  assert.equal(messages.length, 1); // what the recovery held went with the topic
  // Lose the session: room must not be subscribed again.
  server.autoReply = true;
  socket.session.ended = true;
  await cutAndReconnect(server, clock);
  const subs = sequenced(server.socket.received).filter((e) => e.type === "sub").map((e) => e.topic);
  assert.deepEqual(subs, [], `resubscribed after unsubscribe: ${subs}`);
});

test("two recoveries of a topic at once: the first reply does not move the position past what is held", async () => {
  const { client, server, messages } = setup();
  await settle();
  await client.subscribe("room");
  const socket = server.socket;
  const room = (offset) => ({ type: "msg", topic: "room", offset, epoch: "e1", data: offset });
  for (const offset of [1, 2, 3]) server.push(socket, room(offset));
  await settle();
  server.autoReply = false;
  const first = client.subscribe("room");
  const second = client.subscribe("room");
  await settle();
  const [a, b] = sequenced(socket.take()).filter((e) => e.type === "sub").slice(-2);
  assert.deepEqual([a.since, b.since], [{ offset: 3, epoch: "e1" }, { offset: 3, epoch: "e1" }]);
  socket.session.processed = b.seq;
  for (const offset of [4, 5]) server.push(socket, room(offset));
  server.reply(socket, a.seq, { data: { offset: 5, epoch: "e1", recovered: true } });
  for (const offset of [4, 5]) server.push(socket, room(offset));
  server.reply(socket, b.seq, { data: { offset: 5, epoch: "e1", recovered: true } });
  await Promise.all([first, second]);
  assert.deepEqual(messages.map((m) => m.data), [1, 2, 3, 4, 5]);
});

test("session lost: a send whose reply came before the ack covering it resolves (it ran)", async () => {
  const { client, server, clock } = setup({ server: { autoReply: false } });
  await settle();
  let outcome = "pending";
  client.send("s", 1).then(
    () => (outcome = "resolved"),
    (e) => (outcome = `rejected: ${e.name}`),
  );
  await settle();
  const socket = server.socket;
  server.reply(socket, 1, {}, { ack: false }); // a reply without the ack
  await settle();
  assert.equal(outcome, "pending"); // a send is settled by its ack
  socket.session.ended = true;
  await cutAndReconnect(server, clock);
  assert.equal(client.state, "session_lost");
  assert.equal(outcome, "resolved");
  assert.equal(client.stats.lostSends, 0);
});

test("a send whose reply came before its ack resolves when the client stops (it ran)", async () => {
  const { client, server } = setup({ server: { autoReply: false } });
  await settle();
  const outcome = client.send("s", 1).then(
    () => "resolved",
    (e) => `rejected: ${e.name}`,
  );
  await settle();
  server.reply(server.socket, 1, {}, { ack: false });
  await settle();
  server.socket.serverClose(4005, "kicked");
  assert.equal(await outcome, "resolved");
});

test("a resumed welcome with a smaller max_message_size: what no longer fits fails too_large, the rest is renumbered", async () => {
  // Resent, a 40000-byte envelope would be closed 1009 by a node that takes 16384, which
  // ends the client. The server processed nothing above welcome.ack and will not unless
  // it is resent: it fails as a call over the limit does, and what follows it takes its
  // seq (the server expects welcome.ack + 1 next).
  const { client, server, clock, errors } = setup({ server: { autoReply: false } });
  await settle();
  const socket = server.socket;
  const big = "x".repeat(40000);
  const first = client.send("first", 1);
  const refused = client.request("store", big).catch((e) => e);
  client.send("big", big); // fire and forget: its refusal goes to "error"
  const small = client.request("small", 4);
  await settle();
  assert.deepEqual(sequenced(socket.take()).map((e) => e.seq), [1, 2, 3, 4]);
  socket.session.processed = 1; // then the connection dies
  server.maxMessageSize = 16384; // the node the client comes back to takes less
  await cutAndReconnect(server, clock);
  assert.equal(client.state, "resumed");
  const second = server.socket;
  assert.ok(second.frames.every((frame) => frame.length <= 16384));
  assert.deepEqual(sequenced(second.received).map((e) => [e.seq, e.event]), [[2, "small"]]);
  await first; // acknowledged by the welcome
  const error = await refused;
  assert.equal(error.code, "too_large");
  assert.match(error.reason, /at most 16384/);
  assert.deepEqual(errors.map((e) => e.code), ["too_large"]);
  second.session.processed = 2;
  server.reply(second, 2, { data: "ok" });
  assert.equal(await small, "ok");
  server.autoReply = true;
  assert.equal(await client.request("next", 5), 5);
  assert.deepEqual(sequenced(second.received).map((e) => e.seq), [2, 3]);
  assert.deepEqual(server.violations, []);
  assert.equal(client.stats.pending, 0);
});
