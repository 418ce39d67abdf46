// Protocol version 2 (docs/protocol.md, "Version 2"): publications as unsequenced `pub`
// envelopes, and every topic recovered from its history after a reconnection.

import assert from "node:assert/strict";
import { test } from "node:test";

import { FakeServer, FakeStorage, sequenced, settle, setup } from "./fake.js";

const pub = (topic, offset, data, epoch = "e1") => ({ type: "pub", topic, offset, epoch, data });

async function cutAndReconnect(server, clock) {
  server.socket.serverClose(1006);
  await settle();
  await clock.advance(clock.pending()[0]);
  await settle();
}

test("v2: offers wsgate.v2.*, delivers pubs once each, in offset order, without acking them", async () => {
  const { client, server, messages } = setup({ protocol: 2, encoding: "msgpack" });
  await settle();
  assert.deepEqual(server.socket.protocols, ["wsgate.v2.msgpack"]);
  await client.subscribe("room");
  await settle();
  server.socket.take();
  server.socket.deliver([pub("room", 1, "a"), pub("room", 2, "b"), pub("room", 2, "b"), pub("room", 1, "a")]);
  await settle();
  assert.deepEqual(messages.map((m) => [m.topic, m.offset, m.data]), [["room", 1, "a"], ["room", 2, "b"]]);
  // Nothing to acknowledge: a pub has no seq.
  assert.deepEqual(server.socket.take(), []);
});

test("v2: a resumed welcome asks every topic from its position, the server's own included", async () => {
  const { client, server, clock, messages } = setup({ protocol: 2 });
  const recovered = [];
  client.on("recovered", (topic, ok) => recovered.push([topic, ok]));
  await settle();
  await client.subscribe("room");
  await settle();
  // "news": a topic the server subscribed the session to; the client follows it from
  // its first pub.
  server.socket.deliver([pub("room", 1, "r1"), pub("news", 7, "n7")]);
  await settle();
  await cutAndReconnect(server, clock);
  const second = server.socket;
  assert.equal(client.state, "resumed");
  const subs = sequenced(second.take()).filter((e) => e.type === "sub");
  assert.deepEqual(
    subs.map((e) => [e.topic, e.since]),
    [
      ["room", { offset: 1, epoch: "e1" }],
      ["news", { offset: 7, epoch: "e1" }],
    ],
  );
  assert.deepEqual(recovered, [
    ["room", true],
    ["news", true],
  ]);
});

test("v2: what comes before a recovery's reply is held, then delivered in order, each once", async () => {
  const { client, server, clock, messages } = setup({ protocol: 2, server: { autoReply: false } });
  await settle();
  const subscribed = client.subscribe("room");
  await settle();
  const first = sequenced(server.socket.take()).find((e) => e.type === "sub");
  server.socket.session.processed = first.seq;
  server.reply(server.socket, first.seq, { data: { offset: 0, epoch: "e1" } });
  await subscribed;
  server.socket.deliver(pub("room", 1, 1));
  await settle();
  await cutAndReconnect(server, clock);
  const second = server.socket;
  const sub = sequenced(second.take()).find((e) => e.type === "sub");
  assert.deepEqual(sub.since, { offset: 1, epoch: "e1" });
  // A live one (4) first, then the history from 2, then the reply.
  second.deliver([pub("room", 4, 4), pub("room", 2, 2), pub("room", 3, 3), pub("room", 4, 4)]);
  await settle();
  assert.deepEqual(messages.map((m) => m.data), [1]);
  second.session.received = second.session.processed = sub.seq;
  server.reply(second, sub.seq, { data: { offset: 4, epoch: "e1", recovered: true } });
  second.deliver(pub("room", 5, 5));
  await settle();
  assert.deepEqual(messages.map((m) => m.data), [1, 2, 3, 4, 5]);
  assert.equal(client.recovered.room, true);
});

test("v2: a pub of a topic being unsubscribed does not follow it again", async () => {
  const { client, server, clock } = setup({ protocol: 2 });
  await settle();
  await client.subscribe("room");
  await settle();
  server.autoReply = false;
  const left = client.unsubscribe("room");
  await settle();
  server.socket.deliver(pub("room", 1, "late"));
  await settle();
  const unsub = sequenced(server.socket.take()).find((e) => e.type === "unsub");
  server.socket.session.received = server.socket.session.processed = unsub.seq;
  server.reply(server.socket, unsub.seq, {});
  await left;
  server.autoReply = true;
  await cutAndReconnect(server, clock);
  assert.deepEqual(sequenced(server.socket.take()).filter((e) => e.type === "sub"), []);
});

test("v2: a topic the server refuses to follow again is let go", async () => {
  const { client, server, clock, errors } = setup({
    protocol: 2,
    server: { topics: { room: () => ({ offset: 0, epoch: "e1" }) } },
  });
  await settle();
  await client.subscribe("room");
  await settle();
  server.topics.room = () => {
    throw Object.assign(new Error("no"), { code: "forbidden", reason: "not any more" });
  };
  await cutAndReconnect(server, clock);
  assert.equal(errors.at(-1).code, "forbidden");
  await cutAndReconnect(server, clock);
  assert.deepEqual(sequenced(server.socket.take()).filter((e) => e.type === "sub"), []);
});

test("v1: a pub from the server is a protocol error", async () => {
  const { client, server, errors } = setup();
  await settle();
  server.socket.deliver(pub("room", 1, "x"));
  await settle();
  assert.equal(errors.at(-1).code, 1002);
  assert.equal(client.state, "closed");
});

test("protocol must be 1 or 2", () => {
  assert.throws(() => setup({ protocol: 3 }), /protocol must be 1 or 2/);
});

test("v2: a sub answered only after a drop asks for what came meanwhile, from the reply's offset", async () => {
  const { client, server, clock, messages } = setup({ protocol: 2, server: { autoReply: false } });
  await settle();
  const subscribed = client.subscribe("room");
  await settle();
  const first = server.socket;
  const sub = sequenced(first.take()).find((e) => e.type === "sub");
  // Processed, but its reply never reached the client before the drop.
  first.session.received = first.session.processed = sub.seq;
  server.number(first, { type: "reply", re: sub.seq, data: { offset: 0, epoch: "e1" } });
  await cutAndReconnect(server, clock);
  const second = server.socket;
  assert.equal(client.state, "resumed");
  assert.deepEqual(await subscribed, { offset: 0, epoch: "e1" });
  await settle();
  const again = sequenced(second.take()).filter((e) => e.type === "sub");
  assert.deepEqual(again.map((e) => [e.topic, e.since]), [["room", { offset: 0, epoch: "e1" }]]);
  second.deliver(pub("room", 1, "away"));
  second.session.received = second.session.processed = again[0].seq;
  server.reply(second, again[0].seq, { data: { offset: 1, epoch: "e1", recovered: true } });
  await settle();
  assert.deepEqual(messages.map((m) => m.data), ["away"]);
});

test("v2: a recovery answered only on a later connection moves nothing; this one's asks again", async () => {
  const { client, server, clock, messages } = setup({ protocol: 2, server: { autoReply: false } });
  await settle();
  const subscribed = client.subscribe("room");
  await settle();
  const first = sequenced(server.socket.take()).find((e) => e.type === "sub");
  server.socket.session.received = server.socket.session.processed = first.seq;
  server.reply(server.socket, first.seq, { data: { offset: 0, epoch: "e1" } });
  await subscribed;
  server.socket.deliver(pub("room", 1, 1));
  await settle();
  await cutAndReconnect(server, clock);
  const second = server.socket;
  const sub = sequenced(second.take()).find((e) => e.type === "sub");
  assert.deepEqual([sub.since, sub.recover], [{ offset: 1, epoch: "e1" }, true]);
  // Processed: 2 and 3 sent, 2 arrives, then the drop; the reply never left.
  second.session.received = second.session.processed = sub.seq;
  second.deliver(pub("room", 2, 2));
  await settle();
  server.number(second, { type: "reply", re: sub.seq, data: { offset: 3, epoch: "e1", recovered: true } });
  await cutAndReconnect(server, clock); // 4 was published meanwhile
  const third = server.socket;
  // The old reply came first (resent by the session): asked again from 1 all the same.
  const again = sequenced(third.take()).filter((e) => e.type === "sub");
  assert.deepEqual(again.map((e) => [e.since, e.recover]), [[{ offset: 1, epoch: "e1" }, true]]);
  third.deliver([pub("room", 5, 5), pub("room", 2, 2), pub("room", 3, 3), pub("room", 4, 4), pub("room", 5, 5)]);
  third.session.received = third.session.processed = again[0].seq;
  server.reply(third, again[0].seq, { data: { offset: 5, epoch: "e1", recovered: true } });
  await settle();
  assert.deepEqual(messages.map((m) => m.data), [1, 2, 3, 4, 5]);
});

test("v2: a sub reply overtaken by a live pub does not move the position back", async () => {
  const { client, server, clock, messages } = setup({ protocol: 2, server: { autoReply: false } });
  await settle();
  const subscribed = client.subscribe("room");
  await settle();
  const first = sequenced(server.socket.take()).find((e) => e.type === "sub");
  server.socket.session.received = server.socket.session.processed = first.seq;
  server.socket.deliver(pub("room", 6, 6)); // live: the reply waited for the window
  await settle();
  server.reply(server.socket, first.seq, { data: { offset: 5, epoch: "e1" } });
  await subscribed;
  await cutAndReconnect(server, clock);
  const sub = sequenced(server.socket.take()).find((e) => e.type === "sub");
  assert.deepEqual(sub.since, { offset: 6, epoch: "e1" });
  assert.deepEqual(messages.map((m) => m.data), [6]);
});

test("v2: after a lost session, the server's topics are asked only if still followed", async () => {
  const { client, server, clock, errors } = setup({ protocol: 2 });
  await settle();
  await client.subscribe("room");
  await settle();
  server.socket.deliver([pub("room", 1, "r"), pub("news", 3, "n")]);
  await settle();
  server.socket.session.ended = true;
  await cutAndReconnect(server, clock);
  assert.equal(client.state, "session_lost");
  const subs = sequenced(server.socket.take()).filter((e) => e.type === "sub");
  assert.deepEqual(
    subs.map((e) => [e.topic, e.since, e.recover]),
    [
      ["room", { offset: 1, epoch: "e1" }, undefined],
      ["news", { offset: 3, epoch: "e1" }, true],
    ],
  );
  assert.deepEqual(errors, []);
});

test("v2: after a lost session, a topic not yet subscribed again is subscribed, not only recovered, on a resume", async () => {
  const { client, server, clock } = setup({ protocol: 2 });
  await settle();
  await client.subscribe("room");
  await settle();
  server.socket.deliver(pub("room", 1, "r"));
  await settle();
  server.socket.session.ended = true;
  server.autoReply = false;
  await cutAndReconnect(server, clock); // a new session: room is asked again, unanswered
  assert.equal(client.state, "session_lost");
  const lost = sequenced(server.socket.take()).filter((e) => e.type === "sub");
  assert.deepEqual(lost.map((e) => [e.topic, e.recover]), [["room", undefined]]);
  await cutAndReconnect(server, clock); // resumed before the answer
  assert.equal(client.state, "resumed");
  const again = sequenced(server.socket.take()).filter((e) => e.type === "sub" && e.seq > lost[0].seq);
  assert.deepEqual(again.map((e) => [e.topic, e.since, e.recover]), [["room", { offset: 1, epoch: "e1" }, undefined]]);
});

test("v2 + storage: a server topic is recovered with recover: true after a reload and a lost session", async () => {
  const storage = new FakeStorage([]);
  const server = new FakeServer({});
  const page = setup({ server, storage, protocol: 2 });
  await settle();
  // "news": a topic the application subscribed the session to.
  server.socket.deliver({ type: "pub", topic: "news", offset: 7, epoch: "e1", data: "n7" });
  await settle();
  server.socket.serverClose(1006); // the page goes away
  await settle();
  for (const s of server.sessions.values()) s.ended = true; // and its session expires
  const reloaded = setup({ server, storage, protocol: 2 });
  await settle();
  assert.equal(reloaded.client.state, "connected");
  const subs = sequenced(server.socket.received).filter((e) => e.type === "sub");
  assert.deepEqual(subs.map((e) => [e.topic, e.recover]), [["news", true]]);
});

test("v2: a live pub before a late first sub reply does not hide the gap", async () => {
  // docs/protocol.md §14, "A sub's reply on a later connection": the first sub was
  // processed and the connection dropped before its reply; 1..4 were published
  // meanwhile. After the resume the live 5 comes before the resent reply (offset 0):
  // 5 must not become the position. Held; the reply places the topic at 0, the
  // recovery asks from there, and 1..5 are delivered once each, in order.
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
});

test("v2: what was held for a late sub reply answered with an error is delivered", async () => {
  // Nothing will place the topic: what it held is delivered, in order, not kept.
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
});

test("v2: a retry armed before a lost session does not only recover the topic in the new session", async () => {
  // docs/protocol.md §14, "A session lost, then resumed". The recovery after a resume is
  // answered unavailable (retry armed); the session is then lost, and the new session's
  // sub of room is answered unavailable too. The old retry must not fire into the new
  // session with recover: true: not_subscribed there would drop room for good, silently.
  let brokerDown = false;
  let server;
  const topics = {
    room(since, env) {
      const session = server.socket.session;
      session.follows ??= new Set();
      if (env.recover && !session.follows.has("room")) throw { code: "not_subscribed", reason: "not followed" };
      if (brokerDown) throw { code: "unavailable", reason: "broker down" };
      session.follows.add("room");
      return { offset: since ? since.offset : 0, epoch: "e1", ...(since ? { recovered: true } : {}) };
    },
  };
  const page = setup({ protocol: 2, server: { topics } });
  server = page.server;
  const { client, clock, errors, messages } = page;
  await settle();
  await client.subscribe("room");
  server.socket.deliver(pub("room", 1, "a"));
  await settle();
  brokerDown = true;
  await cutAndReconnect(server, clock); // resumed: the recovery is answered unavailable
  assert.equal(client.state, "resumed");
  await clock.advance(100); // its retry is due in 500 ms
  server.socket.session.ended = true;
  await cutAndReconnect(server, clock); // (250 ms) a new session: room asked, unavailable
  assert.equal(client.state, "session_lost");
  await clock.advance(400); // when the old retry was due
  brokerDown = false;
  await clock.advance(20000);
  const subs = server.sockets.flatMap((socket) => sequenced(socket.received)).filter((e) => e.type === "sub");
  assert.deepEqual(
    subs.map((e) => [e.since?.offset, e.recover]),
    [
      [undefined, undefined], // subscribe()
      [1, true], // the recovery after the resume
      [1, undefined], // the new session subscribes room
      [1, undefined], // and retries that; the old session's retry is gone with it
    ],
  );
  assert.ok(client._topics.has("room"));
  assert.ok(server.socket.session.follows.has("room"));
  assert.deepEqual(errors, []);
  server.socket.deliver(pub("room", 2, "b"));
  await settle();
  assert.deepEqual(messages.map((m) => m.data), ["a", "b"]);
});

test("v2 + storage: a page reloaded before its new session subscribed a topic subscribes it on resume", async () => {
  // After a lost session the plain sub of room is on its way when the page reloads. The
  // reloaded page resumes that session, which does not follow room yet: it must ask
  // with a plain sub (stored as not yet followed), not recover: true, which is answered
  // not_subscribed and would drop room for good.
  const server = new FakeServer({});
  const storage = new FakeStorage();
  let refusals = 0;
  server.topics.room = (since, env) => {
    const session = server.socket.session;
    session.follows ??= new Set();
    if (env.recover && !session.follows.has("room")) throw { code: "not_subscribed", reason: "" };
    if (!env.recover && since && refusals-- > 0) throw { code: "unavailable", reason: "broker hiccup" };
    session.follows.add("room");
    return { offset: since?.offset ?? 0, epoch: "e1", ...(since ? { recovered: true } : {}) };
  };
  const first = setup({ server, storage, protocol: 2 });
  await settle();
  await first.client.subscribe("room");
  server.socket.deliver(pub("room", 1, 1));
  await settle();
  server.socket.session.ended = true;
  server.autoReply = false; // the new session's sub of room goes unanswered
  await cutAndReconnect(server, first.clock);
  assert.equal(first.client.state, "session_lost");
  assert.deepEqual(JSON.parse(storage.getItem("wsgate:ws://test.invalid/ws")).unfollowed, ["room"]);
  server.socket.serverClose(1006); // the page goes away
  await settle();
  server.autoReply = true;
  refusals = 1; // the resent sub is answered unavailable
  const reloaded = setup({ server, storage, protocol: 2 });
  await settle();
  await reloaded.clock.advance(30000);
  assert.equal(reloaded.client.state, "resumed");
  const subs = sequenced(server.socket.received).filter((e) => e.type === "sub");
  // The resent sub (unavailable), then the resume's own: plain both. (The retry of the
  // first comes once room is followed again: a recovery then.)
  assert.deepEqual(
    subs.slice(0, 2).map((e) => [e.seq, e.since.offset, e.recover]),
    [
      [1, 1, undefined],
      [2, 1, undefined],
    ],
  );
  assert.ok(reloaded.client._topics.has("room"));
  assert.ok(server.socket.session.follows.has("room"));
  assert.deepEqual(reloaded.errors, []);
  server.socket.deliver(pub("room", 2, 2));
  await settle();
  assert.deepEqual(reloaded.messages.map((m) => m.data), [2]);
});
