// Tokens: hello.token, getToken before the first connection, refresh before exp, and a
// new token after a 4001 for an expired one.

import assert from "node:assert/strict";
import { test } from "node:test";

import { openClient } from "../wsgate.js";
import { FakeServer, jwt, sequenced, settle, setup } from "./fake.js";

const START = 1_700_000_000_000; // FakeClock's start, in ms

test("getToken is called before the first connection when there is no token", async () => {
  const calls = [];
  const { client, server } = setup({ getToken: async () => (calls.push(1), "tok-1") });
  await settle();
  assert.equal(calls.length, 1);
  assert.deepEqual(server.socket.received[0], { type: "hello", token: "tok-1" });
  assert.equal(client.state, "connected");
});

test("a refresh goes when 80% of the token's life has passed", async () => {
  const iat = START / 1000;
  const tokens = [jwt({ sub: "ada", iat, exp: iat + 100 }), jwt({ sub: "ada", iat: iat + 80, exp: iat + 180 })];
  let calls = 0;
  const { server, clock } = setup({ token: tokens[0], getToken: () => tokens[++calls] ?? "spare" });
  await settle();
  assert.equal(server.socket.received[0].token, tokens[0]);
  assert.equal(calls, 0); // the token option is used first
  server.socket.take();
  await clock.advance(79999);
  assert.equal(calls, 0);
  await clock.advance(1);
  assert.equal(calls, 1);
  assert.deepEqual(server.socket.take().filter((e) => e.type === "refresh"), [{ type: "refresh", token: tokens[1] }]);
  // The next one from the new token's own iat and exp: 80 s after its iat.
  await clock.advance(79999);
  assert.equal(calls, 1);
  await clock.advance(1);
  assert.equal(calls, 2);
});

test("a short-lived token is refreshed 10 s before exp at the latest; without iat, from when it was obtained", async () => {
  const now = START / 1000;
  const first = jwt({ sub: "ada", exp: now + 20 }); // 80% would be 16 s: too late
  const second = jwt({ sub: "ada", exp: now + 1000 }); // no iat: 80% of 1000 s from when obtained
  let calls = 0;
  const { clock } = setup({ getToken: () => [first, second, "x"][calls++] });
  await settle();
  assert.equal(calls, 1);
  await clock.advance(9999);
  assert.equal(calls, 1);
  await clock.advance(1);
  assert.equal(calls, 2); // at exp - 10 s
  await clock.advance(0.8 * 990000 - 1);
  assert.equal(calls, 2);
  await clock.advance(1);
  assert.equal(calls, 3);
});

test("a token shorter than 20 s is refreshed half way through its life, not in a loop", async () => {
  const iat = START / 1000;
  let calls = 0;
  // Each token lives 4 s from when it is handed out.
  const { clock } = setup({ getToken: () => jwt({ sub: "ada", iat: iat + 2 * calls, exp: iat + 2 * calls++ + 4 }) });
  await settle();
  assert.equal(calls, 1);
  await clock.advance(1999);
  assert.equal(calls, 1);
  await clock.advance(1);
  assert.equal(calls, 2); // half of 4 s
  await clock.advance(2000);
  assert.equal(calls, 3); // and every 2 s after, no sooner
});

test("tokens already expired by the client's clock: refreshes back off to half their lifetime, not every second", async () => {
  // The client's clock runs 10 minutes ahead of the issuer's: every token it gets,
  // valid 5 minutes by the server's clock, has expired by its own.
  let page;
  const times = [];
  const getToken = () => {
    times.push(page.clock.time);
    const iat = page.clock.time / 1000 - 600;
    return jwt({ sub: "ada", iat, exp: iat + 300 });
  };
  page = setup({ getToken, server: { heartbeat: { interval: 0, timeout: 0 } } });
  await settle();
  await page.clock.advance(20 * 60 * 1000);
  const gaps = times.slice(1).map((t, i) => (t - times[i]) / 1000);
  assert.ok(times.length < 20, `${times.length} getToken calls in 20 minutes`);
  assert.deepEqual(gaps.slice(0, 8), [1, 2, 4, 8, 16, 32, 64, 128]);
  assert.deepEqual(gaps.slice(8, 10), [150, 150]); // half of the 300 s lifetime
  assert.equal(page.client.state, "connected");
  const refreshes = page.server.socket.received.filter((e) => e.type === "refresh");
  assert.equal(refreshes.length, times.length - 1); // each new token still goes to the server
});

test("the refresh backoff ends with the first token that is not due on arrival", async () => {
  let page;
  let skewed = true;
  let calls = 0;
  const getToken = () => {
    calls += 1;
    const iat = page.clock.time / 1000 - (skewed ? 600 : 0);
    return jwt({ sub: "ada", iat, exp: iat + 300 });
  };
  page = setup({ getToken, server: { heartbeat: { interval: 0, timeout: 0 } } });
  await settle();
  await page.clock.advance(1000 + 2000 + 4000); // three refreshes, backing off
  assert.equal(calls, 4);
  skewed = false; // the clock is set right
  await page.clock.advance(8000);
  assert.equal(calls, 5);
  await page.clock.advance(240 * 1000 - 1); // 80% of 300 s from its iat
  assert.equal(calls, 5);
  await page.clock.advance(1);
  assert.equal(calls, 6);
});

test("refresh() sends the token at once and later connections use it", async () => {
  const { client, server, clock } = setup({ token: "old" });
  await settle();
  client.refresh("new");
  await settle();
  assert.deepEqual(server.socket.received.at(-1), { type: "refresh", token: "new" });
  server.socket.serverClose(1006);
  await settle();
  await clock.advance(clock.pending()[0]);
  assert.equal(server.socket.received[0].token, "new");
});

test("4001 'token expired' with getToken: a new token, a new session, topics recovered", async () => {
  let n = 0;
  const topics = { room: (since) => (since ? { offset: 2, epoch: "e", recovered: true } : { offset: 0, epoch: "e" }) };
  const { client, server, clock, states } = setup({ getToken: () => `tok-${++n}`, server: { topics } });
  await settle();
  await client.subscribe("room");
  server.push(server.socket, { type: "msg", topic: "room", offset: 1, epoch: "e" });
  await settle();
  server.socket.session.ended = true; // 4001 ends the session
  server.socket.serverClose(4001, "unauthorized: token expired");
  await settle();
  assert.equal(client.state, "connecting");
  await clock.advance(clock.pending()[0]);
  const hello = server.socket.received[0];
  assert.equal(hello.token, "tok-2");
  assert.equal(hello.resume.session, "s1");
  assert.equal(client.state, "session_lost");
  assert.deepEqual(states, ["connected", "connecting", "session_lost"]);
  assert.deepEqual(sequenced(server.socket.received)[0].since, { offset: 1, epoch: "e" });
  await settle();
  assert.deepEqual(client.recovered, { room: true });
});

test("4001 is final without getToken, and with getToken when the token is not expired but bad", async () => {
  for (const [options, reason] of [
    [{ token: "t" }, "unauthorized: token expired"],
    [{ getToken: () => "t" }, "unauthorized: invalid token: Signature verification failed"],
  ]) {
    const { client, server, clock } = setup(options);
    await settle();
    server.socket.serverClose(4001, reason);
    await settle();
    assert.equal(client.state, "closed");
    assert.equal(client.closeCode, 4001);
    assert.equal(client.closeReason, reason);
    assert.deepEqual(clock.pending(), []);
  }
});

test("a token past its exp is replaced before connecting", async () => {
  const now = START / 1000;
  let n = 0;
  const { server, clock } = setup({ token: jwt({ sub: "a", exp: now + 60 }), getToken: () => `fresh-${++n}` });
  await settle();
  server.socket.serverClose(1006);
  await settle();
  // The laptop slept past exp: the refresh timer did not help.
  clock.time += 120000;
  await clock.advance(0); // the overdue timers run: the reconnection first
  const hellos = server.sockets.map((s) => s.received[0]?.token);
  assert.ok(hellos.at(-1).startsWith("fresh-"), hellos.join());
});

test("a getToken that fails is reported and the attempt is retried with backoff", async () => {
  let fail = true;
  const { client, server, clock, errors } = setup({
    getToken: async () => {
      if (fail) throw new Error("auth server down");
      return "tok";
    },
  });
  await settle();
  assert.equal(server.sockets.length, 0);
  assert.equal(errors[0].message, "auth server down");
  assert.equal(client.state, "connecting");
  fail = false;
  await clock.advance(clock.pending()[0]);
  assert.equal(client.state, "connected");
  assert.equal(server.socket.received[0].token, "tok");
});

test("a getToken that throws synchronously is asked again next time", async () => {
  let calls = 0;
  const { client, clock, errors } = setup({
    getToken() {
      if (++calls === 1) throw new Error("not yet");
      return "tok";
    },
  });
  await settle();
  assert.equal(errors[0].message, "not yet");
  await clock.advance(clock.pending()[0]);
  assert.equal(calls, 2);
  assert.equal(client.state, "connected");
});

test("a token valid for months is refreshed at 80% of its life, not at once (timers cap at 2**31 - 1 ms)", async () => {
  const iat = START / 1000;
  const day = 86400;
  let calls = 0;
  const { clock } = setup({ token: jwt({ sub: "ada", iat, exp: iat + 100 * day }), getToken: () => (calls++, "next") });
  await settle();
  assert.ok(Math.max(...clock.pending()) <= 2 ** 31 - 1);
  await clock.advance(79 * day * 1000);
  assert.equal(calls, 0);
  await clock.advance(1 * day * 1000);
  assert.equal(calls, 1);
});

test("a token that cannot be encoded is refused where it enters, not when hello is sent", async () => {
  const WebSocket = new FakeServer().WebSocket;
  assert.throws(() => openClient("ws://x/ws", { WebSocket, token: "\ud800" }), TypeError);
  const { client, errors, server, clock } = setup({ getToken: () => "bad \udfff" });
  await settle();
  assert.equal(server.sockets.length, 0); // not connected with it
  assert.match(errors[0].message, /getToken's token is not valid Unicode/);
  assert.equal(client.state, "connecting");
  assert.ok(clock.pending().length > 0); // tried again later, with backoff
  assert.throws(() => client.refresh("\ud800"), TypeError);
});

test("connectTimeout: Infinity never fires", async () => {
  const { client, server, clock } = setup({ connectTimeout: Infinity, server: { autoOpen: false } });
  await settle();
  await clock.advance(3600 * 1000);
  assert.equal(server.sockets.length, 1);
  assert.equal(client.state, "connecting");
});

test("a refresh due while the hello is unanswered goes right after the welcome", async () => {
  // The hello carried the old token, so the server's deadline is the old exp: the
  // refresh obtained meanwhile must still reach it, or 4001 ends the session there.
  const iat = START / 1000;
  const tokens = [jwt({ sub: "ada", iat, exp: iat + 100 }), jwt({ sub: "ada", iat: iat + 80, exp: iat + 180 })];
  let calls = 0;
  const { client, server, clock } = setup({ token: tokens[0], getToken: () => tokens[++calls] ?? "spare" });
  await settle();
  await clock.advance(79000);
  server.autoWelcome = false; // the next welcome is slow
  server.socket.serverClose(1006);
  await settle();
  await clock.advance(clock.pending()[0]); // the hello, with the old token
  const socket = server.socket;
  assert.equal(socket.received[0].token, tokens[0]);
  await clock.advance(1500); // the refresh is due at 80 s: got, but no welcome yet
  assert.equal(calls, 1);
  assert.deepEqual(socket.received.filter((e) => e.type === "refresh"), []);
  server.welcome(socket, socket.received[0]);
  await settle();
  assert.equal(client.state, "resumed");
  assert.deepEqual(socket.received.filter((e) => e.type === "refresh"), [{ type: "refresh", token: tokens[1] }]);
});

test("refresh() between hello and welcome is sent after the welcome; an unchanged token is not", async () => {
  const { client, server, clock } = setup({ token: "old", server: { autoWelcome: false } });
  await settle();
  client.refresh("new");
  await settle();
  const socket = server.socket;
  assert.deepEqual(socket.received.map((e) => e.type), ["hello"]); // nothing before welcome
  server.welcome(socket, socket.received[0]);
  await settle();
  assert.deepEqual(socket.received.slice(1), [{ type: "refresh", token: "new" }]);
  // The next hello carries the new token: no refresh after its welcome.
  server.autoWelcome = true;
  socket.serverClose(1006);
  await settle();
  await clock.advance(clock.pending()[0]);
  assert.equal(client.state, "resumed");
  assert.deepEqual(server.socket.received.map((e) => e.type), ["hello"]);
  assert.equal(server.socket.received[0].token, "new");
});
