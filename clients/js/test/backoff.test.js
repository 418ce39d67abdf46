// Reconnection: the backoff schedule, and which close codes reconnect.

import assert from "node:assert/strict";
import { test } from "node:test";

import { Backoff, ClientClosed, reconnectsAfter } from "../wsgate.js";
import { settle, setup } from "./fake.js";

test("Backoff: full jitter over [0, min(cap, base * factor**n)]", () => {
  const backoff = new Backoff();
  assert.deepEqual(
    [0, 1, 2, 3, 4, 5, 6, 7, 100].map((n) => backoff.ceiling(n)),
    [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000],
  );
  assert.equal(backoff.maxAttempts, Infinity);
  assert.equal(backoff.delay(3, () => 0), 0);
  assert.equal(backoff.delay(3, () => 0.5), 2000);
  const high = backoff.delay(3, () => 0.9999999);
  assert.ok(high < 4000 && high > 3999);
  for (let i = 0; i < 200; i++) {
    const delay = backoff.delay(i % 10);
    assert.ok(delay >= 0 && delay <= backoff.ceiling(i % 10));
  }
  const custom = new Backoff({ base: 100, factor: 3, cap: 1000, maxAttempts: 4 });
  assert.deepEqual([0, 1, 2, 3].map((n) => custom.ceiling(n)), [100, 300, 900, 1000]);
  assert.throws(() => new Backoff({ factor: 0.5 }), RangeError);
  assert.throws(() => new Backoff({ base: -1 }), RangeError);
  assert.throws(() => new Backoff({ maxAttempts: -1 }), RangeError);
});

test("reconnectsAfter follows the close code table", () => {
  for (const code of [1001, 1006, 1011, 1013, 4002, 4003, 4004, 4009]) assert.equal(reconnectsAfter(code), true, code);
  for (const code of [1000, 1002, 1003, 1005, 1007, 1008, 1009, 4001, 4005, 4006]) assert.equal(reconnectsAfter(code), false, code);
});

test("failed attempts wait longer and longer, up to the cap", async () => {
  const { client, server, clock } = setup({ backoff: { base: 100, factor: 2, cap: 1000 }, random: () => 0.5 });
  server.refuse = true; // a browser sees every HTTP refusal as 1006
  await settle();
  const waits = [];
  for (let attempt = 0; attempt < 7; attempt++) {
    assert.equal(server.sockets.length, attempt + 1);
    assert.equal(client.state, "connecting");
    const pending = clock.pending();
    assert.equal(pending.length, 1); // the reconnection, nothing else
    waits.push(pending[0]);
    await clock.advance(pending[0]);
  }
  assert.deepEqual(waits, [50, 100, 200, 400, 500, 500, 500]);
});

test("the jitter comes from the random option", async () => {
  const draws = [0, 0.25, 0.999];
  const { server, clock } = setup({ backoff: { base: 1000, factor: 2, cap: 100000 }, random: () => draws.shift() ?? 0.5 });
  server.refuse = true;
  await settle();
  const waits = [];
  for (let i = 0; i < 3; i++) {
    waits.push(clock.pending()[0]);
    await clock.advance(clock.pending()[0]);
  }
  assert.deepEqual(waits, [0, 500, 3996]);
});

test("a welcome restarts the count: the next wait is drawn over [0, base] again", async () => {
  const { client, server, clock } = setup({ backoff: { base: 100, factor: 2, cap: 10000 }, random: () => 0.5 });
  server.refuse = true;
  await settle();
  for (let i = 0; i < 4; i++) await clock.advance(clock.pending()[0]);
  assert.equal(clock.pending()[0], 800); // attempt 4
  server.refuse = false;
  await clock.advance(800);
  assert.equal(client.state, "connected");
  server.socket.serverClose(1011, "internal error");
  await settle();
  assert.equal(client.state, "connecting");
  assert.deepEqual(clock.pending(), [50]); // attempt 0 again
  await clock.advance(50);
  assert.equal(client.state, "resumed");
});

test("maxAttempts: give up after that many failed reconnections in a row", async () => {
  const { client, server, clock } = setup({ backoff: { base: 100, maxAttempts: 2 } });
  server.refuse = true;
  await settle();
  await clock.advance(clock.pending()[0]);
  await clock.advance(clock.pending()[0]);
  assert.equal(server.sockets.length, 3); // the first attempt and two more
  assert.equal(client.state, "closed");
  assert.equal(client.closeCode, 1006);
  assert.match(client.closeReason, /gave up after 2 attempts/);
  assert.deepEqual(clock.pending(), []);
  await client.closed;
  await assert.rejects(client.request("late"), ClientClosed);
});

test("maxAttempts counts failures since the last welcome only", async () => {
  const { client, server, clock } = setup({ backoff: { base: 100, maxAttempts: 1 } });
  await settle();
  for (let i = 0; i < 3; i++) {
    assert.notEqual(client.state, "closed");
    server.socket.serverClose(1006);
    await settle();
    await clock.advance(clock.pending()[0]); // one attempt, welcomed again
    assert.equal(client.state, "resumed");
  }
});

for (const code of [1001, 1006, 1011, 1013, 4002, 4003, 4004, 4009]) {
  test(`close ${code} reconnects and resumes`, async () => {
    const { client, server, clock } = setup();
    await settle();
    assert.equal(client.state, "connected");
    server.socket.serverClose(code, "bye for now");
    await settle();
    assert.equal(client.state, "connecting");
    await clock.advance(clock.pending()[0]);
    assert.equal(client.state, "resumed");
    assert.equal(server.sockets.length, 2);
    assert.equal(server.socket.take()[0].resume.session, client.session);
  });
}

for (const code of [1000, 1002, 1003, 1007, 1008, 1009, 4001, 4005, 4006]) {
  test(`close ${code} is final`, async () => {
    const { client, server, clock, states } = setup();
    await settle();
    server.autoReply = false;
    const pending = client.request("never answered").catch((e) => e);
    await settle();
    server.socket.serverClose(code, "the reason");
    await settle();
    assert.equal(client.state, "closed");
    assert.deepEqual(states, ["connected", "closed"]);
    assert.equal(client.closeCode, code);
    assert.equal(client.closeReason, "the reason");
    const error = await pending;
    assert.ok(error instanceof ClientClosed);
    assert.equal(error.code, code);
    assert.deepEqual(clock.pending(), []);
    assert.equal(server.sockets.length, 1);
  });
}

test("a close before any welcome is final too when its code says so (a bad token: 4001)", async () => {
  const { client, server } = setup({ server: { autoWelcome: false } });
  await settle();
  assert.equal(server.socket.take()[0].type, "hello");
  server.socket.serverClose(4001, "unauthorized: invalid token: Signature verification failed");
  await settle();
  assert.equal(client.state, "closed");
  assert.equal(client.closeCode, 4001);
});
