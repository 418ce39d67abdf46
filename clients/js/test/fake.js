// Test doubles: a fake clock, a fake WebSocket and a small fake server that speaks the
// protocol (welcome, replies, acks, pings, resume, closes), and a Web Storage.
//
// Everything the server sends reaches the client asynchronously (a microtask later),
// as with a real socket; `await settle()` lets every pending microtask run.

import { json, msgpack, openClient } from "../wsgate.js";

/** Let every pending microtask (and promise chain) run. */
export async function settle() {
  for (let i = 0; i < 3; i++) await new Promise((resolve) => setImmediate(resolve));
}

/** A clock the test moves: setTimeout, clearTimeout and now for the client's options. */
export class FakeClock {
  constructor(start = 1_700_000_000_000) {
    this.time = start;
    this.timers = new Map();
    this.nextId = 1;
    this.now = () => this.time;
    this.setTimeout = (fn, ms) => {
      const id = this.nextId++;
      this.timers.set(id, { id, at: this.time + Math.max(0, Number(ms) || 0), fn });
      return id;
    };
    this.clearTimeout = (id) => {
      this.timers.delete(id);
    };
  }

  /** Move time forward by `ms`, running each timer due, in order, at its own time. */
  async advance(ms) {
    const end = this.time + ms;
    await settle();
    for (;;) {
      let next = null;
      for (const timer of this.timers.values()) {
        if (timer.at <= end && (!next || timer.at < next.at || (timer.at === next.at && timer.id < next.id))) next = timer;
      }
      if (!next) break;
      this.timers.delete(next.id);
      this.time = Math.max(this.time, next.at); // an overdue timer (time jumped) runs now
      next.fn();
      await settle();
    }
    this.time = end;
    await settle();
  }

  /** The delays of the timers pending now, sorted. */
  pending() {
    return [...this.timers.values()].map((t) => t.at - this.time).sort((a, b) => a - b);
  }
}

/** A Web Storage in memory; `log` (shared with the sockets) records every write. */
export class FakeStorage {
  constructor(log = []) {
    this.map = new Map();
    this.log = log;
  }
  getItem(key) {
    return this.map.has(key) ? this.map.get(key) : null;
  }
  setItem(key, value) {
    this.map.set(key, String(value));
    this.log.push({ kind: "save", key, state: JSON.parse(value) });
  }
  removeItem(key) {
    this.map.delete(key);
    this.log.push({ kind: "remove", key });
  }
}

const CONNECTING = 0;
const OPEN = 1;
const CLOSING = 2;
const CLOSED = 3;

/** One side of a fake connection: the client's WebSocket, driven by a FakeServer. */
class FakeSocket {
  constructor(server, url, protocols) {
    this.server = server;
    this.url = url;
    this.protocols = protocols;
    this.readyState = CONNECTING;
    this.binaryType = "blob";
    this.encoding = String(protocols?.[0] ?? "").endsWith("msgpack") ? "msgpack" : "json";
    this.codec = this.encoding === "msgpack" ? msgpack : json;
    this.frames = []; // raw messages the client sent
    this.received = []; // the envelopes in them, flattened, in order
    this.taken = 0;
    this.closedBy = null; // {code, reason} if the client closed it
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    this.session = null; // the server's session state attached to this socket
  }

  // -- the client's side -------------------------------------------------------

  send(data) {
    if (this.readyState !== OPEN) throw new Error(`send() in readyState ${this.readyState}`);
    if ((typeof data === "string") !== (this.encoding === "json")) throw new Error("wrong frame kind");
    this.frames.push(data);
    const value = this.codec.decode(typeof data === "string" ? data : new Uint8Array(data));
    const envelopes = Array.isArray(value) ? value : [value];
    for (const envelope of envelopes) {
      this.received.push(envelope);
      this.server.log.push({ kind: "send", envelope });
    }
    for (const envelope of envelopes) this.server.handle(this, envelope);
  }

  close(code, reason) {
    if (this.readyState === CLOSING || this.readyState === CLOSED) return;
    this.closedBy = { code, reason };
    this.readyState = CLOSED;
    this.server.detach(this);
    queueMicrotask(() => this.onclose?.({ code: code ?? 1005, reason: reason ?? "", wasClean: true }));
  }

  // -- the server's side -------------------------------------------------------

  /** The envelopes the client sent since the last take(). */
  take() {
    const out = this.received.slice(this.taken);
    this.taken = this.received.length;
    return out;
  }

  open() {
    this.readyState = OPEN;
    this.onopen?.({});
  }

  /** Send one envelope, or an array (a batch), encoded as the subprotocol says. */
  deliver(value) {
    const data = this.codec.encode(value);
    this.deliverRaw(typeof data === "string" ? data : data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength));
  }

  deliverRaw(data) {
    queueMicrotask(() => {
      if (this.readyState === OPEN) this.onmessage?.({ data });
    });
  }

  /** The server closes (or, with 1006, the connection just dies). */
  serverClose(code, reason = "") {
    if (this.readyState === CLOSED) return;
    this.readyState = CLOSED;
    this.server.detach(this);
    queueMicrotask(() => this.onclose?.({ code, reason, wasClean: code !== 1006 }));
  }
}

/**
 * A small wsgate server. By default it opens every socket, welcomes every hello
 * (resuming a session it holds), answers every sequenced envelope with a reply that
 * carries its ack, answers pings, and closes 1000 after bye. Switch parts off to drive
 * the client by hand.
 */
export class FakeServer {
  constructor(options = {}) {
    this.options = options;
    this.window = options.window ?? 16;
    this.heartbeat = options.heartbeat ?? { interval: 25, timeout: 10 };
    this.maxMessageSize = options.maxMessageSize ?? 65536;
    this.user = options.user ?? null;
    this.userTopic = options.userTopic ?? null; // {offset, epoch} for welcome.user_topic
    this.autoOpen = options.autoOpen ?? true;
    this.autoWelcome = options.autoWelcome ?? true;
    this.autoReply = options.autoReply ?? true;
    this.handlers = options.handlers ?? {};
    this.topics = options.topics ?? {}; // topic -> (since) => reply data
    this.sockets = [];
    this.sessions = new Map();
    this.log = options.log ?? [];
    this.nextSession = 1;
    this.violations = [];
    const server = this;
    this.WebSocket = class extends FakeSocket {
      constructor(url, protocols) {
        super(server, url, protocols);
        server.sockets.push(this);
        if (server.refuse) {
          // What a browser shows for an HTTP refusal of the upgrade: 1006, no reason.
          queueMicrotask(() => this.serverClose(1006, ""));
        } else if (server.autoOpen) queueMicrotask(() => this.open());
      }
    };
  }

  /** The latest socket. */
  get socket() {
    return this.sockets[this.sockets.length - 1];
  }

  detach(socket) {
    if (socket.session && socket.session.socket === socket) socket.session.socket = null;
  }

  /** Welcome a socket's hello: resume the session if it is held, else a new one. */
  welcome(socket, hello, extra = {}) {
    let session = null;
    const resume = hello.resume;
    if (resume && this.sessions.has(resume.session)) {
      const held = this.sessions.get(resume.session);
      if (!held.ended && held.resumeToken === resume.token) session = held;
    }
    const resumed = session !== null;
    if (!session) {
      const id = `s${this.nextSession++}`;
      session = { id, resumeToken: `rt-${id}`, received: 0, processed: 0, outSeq: 0, unacked: [], ended: false, socket: null, clientAcked: 0 };
      this.sessions.set(id, session);
    } else {
      if (resume.ack < session.clientAcked) this.violations.push(`resume ack ${resume.ack} below ${session.clientAcked}`);
      session.clientAcked = Math.max(session.clientAcked, resume.ack);
      session.unacked = session.unacked.filter((e) => e.seq > resume.ack);
      session.received = session.processed;
      if (session.socket && session.socket !== socket) session.socket.serverClose(4006, "session taken over");
    }
    session.socket = socket;
    socket.session = session;
    const welcome = {
      type: "welcome",
      session: session.id,
      resume_token: session.resumeToken,
      resumed,
      ack: session.processed,
      heartbeat: this.heartbeat,
      window: this.window,
      max_message_size: this.maxMessageSize,
    };
    if (this.user != null) welcome.user = this.user;
    if (!resumed && this.user != null && this.userTopic) welcome.user_topic = { topic: `user:${this.user}`, ...this.userTopic };
    const out = [{ ...welcome, ...extra }];
    if (resumed) out.push(...session.unacked);
    socket.deliver(out.length === 1 ? out[0] : out);
    return session;
  }

  /** Send a sequenced envelope (msg, reply) in the socket's session. */
  push(socket, envelope, { ack = true } = {}) {
    const session = socket.session;
    const numbered = { ...envelope, seq: ++session.outSeq };
    if (ack && session.processed) numbered.ack = session.processed;
    session.unacked.push(numbered);
    if (session.socket === socket) socket.deliver(numbered);
    return numbered;
  }

  /** Numbered envelopes for a batch, without sending them. */
  number(socket, envelope) {
    const session = socket.session;
    const numbered = { ...envelope, seq: ++session.outSeq };
    session.unacked.push(numbered);
    return numbered;
  }

  reply(socket, re, body) {
    return this.push(socket, { type: "reply", re, ...body });
  }

  handle(socket, envelope) {
    const session = socket.session;
    switch (envelope.type) {
      case "hello":
        if (this.autoWelcome) this.welcome(socket, envelope);
        return;
      case "ack":
        if (session) {
          if (envelope.ack > session.outSeq) this.violations.push(`ack ${envelope.ack} above ${session.outSeq}`);
          session.clientAcked = Math.max(session.clientAcked, envelope.ack);
          session.unacked = session.unacked.filter((e) => e.seq > envelope.ack);
        }
        return;
      case "ping":
        socket.deliver(envelope.ts === undefined ? { type: "pong" } : { type: "pong", ts: envelope.ts });
        return;
      case "pong":
      case "refresh":
        return;
      case "bye":
        if (session) session.ended = true;
        socket.serverClose(1000, "bye");
        return;
      default:
        break;
    }
    if (!session) {
      this.violations.push(`${envelope.type} before welcome`);
      return;
    }
    if (envelope.ack !== undefined) {
      session.clientAcked = Math.max(session.clientAcked, envelope.ack);
      session.unacked = session.unacked.filter((e) => e.seq > envelope.ack);
    }
    if (envelope.seq <= session.received) {
      socket.deliver({ type: "ack", ack: session.processed }); // a duplicate: ack again
      return;
    }
    if (envelope.seq !== session.received + 1) {
      this.violations.push(`seq ${envelope.seq} skips ahead of ${session.received}`);
      socket.serverClose(1002, "seq skips ahead");
      return;
    }
    session.received = envelope.seq;
    if (!this.autoReply) return; // the test answers and acks by hand
    session.processed = envelope.seq;
    this.push(socket, { type: "reply", re: envelope.seq, ...this.answer(envelope, session) });
  }

  /** What a handler answers: {data} or {error}. */
  answer(envelope, session) {
    try {
      switch (envelope.type) {
        case "msg": {
          const handler = this.handlers[envelope.event];
          const data = handler ? handler(envelope.data, session, envelope) : envelope.data;
          return data === undefined ? {} : { data };
        }
        case "sub": {
          const topic = this.topics[envelope.topic];
          if (topic) return { data: topic(envelope.since, envelope) };
          const data = { offset: 0, epoch: "e1" };
          if (envelope.since) data.recovered = true;
          return { data };
        }
        case "pub":
          return { data: { offset: 1, epoch: "e1" } };
        default:
          return {};
      }
    } catch (error) {
      return { error: { code: error.code ?? "internal", reason: error.reason ?? String(error.message ?? "") } };
    }
  }
}

/** A JWT with these claims (unsigned: the client reads, never checks). */
export function jwt(claims) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  return `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}.c2lnbmF0dXJl`;
}

/**
 * A client on a fake server and clock, with jitter fixed at `random` (0.5 by default).
 * Returns {client, server, clock, errors, states}.
 */
export function setup({ server: serverOptions = {}, random = () => 0.5, ...options } = {}) {
  const clock = new FakeClock();
  const server = serverOptions instanceof FakeServer ? serverOptions : new FakeServer(serverOptions);
  const client = openClient("ws://test.invalid/ws", {
    WebSocket: server.WebSocket,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    now: clock.now,
    random,
    ...options,
  });
  const errors = [];
  const states = [];
  const messages = [];
  client.on("error", (error) => errors.push(error));
  client.on("state", (state) => states.push(state));
  client.on("message", (message) => messages.push(message));
  return { client, server, clock, errors, states, messages };
}

/** Sequenced envelopes among a list (what counts against the window). */
export function sequenced(envelopes) {
  return envelopes.filter((e) => typeof e.seq === "number");
}
