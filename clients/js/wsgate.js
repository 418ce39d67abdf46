/**
 * wsgate.js: the browser client of trio-wsgate, one dependency-free ES module.
 *
 *     import { openClient } from "/wsgate.js";
 *     const client = openClient("wss://example.com/ws", { token });
 *     client.on("message", (m) => console.log(m.event, m.data, m.topic));
 *     console.log(await client.request("echo", { hello: "world" }));
 *     await client.send("say", "delivered exactly once, in order");
 *
 * Theory of operation: the same as trio_wsgate/client.py, the Python client. A
 * *connection attempt* opens one WebSocket at a time; the *session state* outlives
 * it: an {@link Outbox} numbers what the application sends and keeps it until the
 * server acknowledges it, an {@link Inbox} orders what the server sends and decides
 * when to acknowledge. After a drop the client waits (exponential backoff with full
 * jitter, {@link Backoff}), sends `hello` with `resume`, and on `welcome` both sides
 * resend what the other has not processed (docs/protocol.md, "Resuming"). So every
 * reply and message is seen exactly once and in order, and everything sent is
 * processed exactly once, across any number of drops.
 *
 * When the server no longer holds the session (`resumed: false`) the client carries
 * on in a new session: what it never wrote is renumbered and sent; a request or send
 * it wrote and never saw acknowledged may or may not have run, so it fails with
 * {@link SessionLost}. Then every topic it follows is subscribed again from the last
 * offset it processed (`since`), and `recovered[topic]` says whether nothing was
 * missed.
 *
 * With `storage` (a Web Storage object) the session state survives a page reload:
 * it is written before any ack above what storage holds leaves, and before any new
 * `seq` does, so a reloaded page resumes without breaking the protocol. The topics
 * under recovery are saved too: what a recovery holds is acked and lives only in the
 * page, so the next page asks for it again.
 *
 * The parts, in order: errors; the value domain and the two codecs; close codes and
 * backoff; sequencing (Outbox, Inbox: no I/O, no clock); tokens; the Client (calls,
 * connection attempts, envelopes, sessions, topics, persistence).
 *
 * @module wsgate
 */

// -- errors ---------------------------------------------------------------------------

/**
 * The root of every error the client raises on purpose; also an error reply.
 *
 * An error reply of a handler rejects {@link Client#request} with a WsgateError whose
 * `code` and `reason` are the reply's (`"forbidden"`, `"unknown_event"`, ...).
 */
export class WsgateError extends Error {
  /**
   * @param {string|number} code a short machine-readable code (a close code for
   *     {@link ClientClosed}).
   * @param {string} [reason] a human-readable explanation.
   * @param {string} [message] the Error's message (default: code and reason).
   */
  constructor(code, reason = "", message = undefined) {
    super(message ?? (reason ? `${code}: ${reason}` : String(code)));
    this.name = "WsgateError";
    this.code = code;
    this.reason = reason;
  }
}

/**
 * The server dropped the session with this request or send unacknowledged: it may or
 * may not have been processed, so the client cannot say (the client itself carries on
 * in a new session).
 */
export class SessionLost extends WsgateError {
  /** @param {string} [reason] */
  constructor(reason = "the server dropped the session") {
    super("session_lost", reason, `session lost: ${reason}`);
    this.name = "SessionLost";
  }
}

/** The client stopped for good: close(), a final close code, or out of attempts. */
export class ClientClosed extends WsgateError {
  /**
   * @param {number} code the close code the client stopped with (1006: no close frame).
   * @param {string} reason the close reason, or what went wrong.
   */
  constructor(code, reason) {
    super(code, reason, `client closed (code ${code}): ${reason}`);
    this.name = "ClientClosed";
  }
}

/** The server broke the protocol: the client closes and does not come back. */
class ProtocolViolation extends Error {
  constructor(code, reason) {
    super(`${reason} (close ${code})`);
    this.code = code;
    this.reason = reason;
  }
}

// -- the value domain (docs/protocol.md, "Values") ------------------------------------

// Whatever travels, either way, is inside one domain, so that the server can keep it,
// re-encode it in the other encoding and deliver it to a browser. The client refuses
// anything else itself, with a TypeError: the server would close the connection (1007).
const MAX_DEPTH = 32; // the envelope's own map is the first level
const TOO_DEEP = `arrays and maps nest more than ${MAX_DEPTH} deep`;
const BAD_TEXT = "a string is not valid Unicode (a lone surrogate)";
const BAD_KEY = "a map key is not valid Unicode (a lone surrogate)";
const BAD_INTEGER = "an integer is outside [-(2**53 - 1), 2**53 - 1]";
const BAD_NUMBER = "a number is NaN or infinite";

/**
 * An integral number past 2**53 - 1 that JSON would write as an integer (below 1e21 it
 * has no exponent): the server would refuse it (1007), so neither encoding sends it.
 * Larger magnitudes are written as floats (`1e+21`), which the server keeps.
 */
function unsafeInteger(value) {
  return Number.isInteger(value) && !Number.isSafeInteger(value) && Math.abs(value) < 1e21;
}

let loneSurrogate = null;
/** True if `text` holds no lone surrogate (UTF-8 cannot carry one; TextEncoder would
 * silently replace it and JSON.stringify would send an escape the server refuses). */
const wellFormed =
  typeof String.prototype.isWellFormed === "function"
    ? (text) => text.isWellFormed()
    : (text) => !(loneSurrogate ??= new RegExp("\\p{Cs}", "u")).test(text);

/** Why `value` (a map, an array or a scalar) cannot travel. */
function refusal(value) {
  if (value instanceof ArrayBuffer || ArrayBuffer.isView(value)) {
    return new TypeError("bytes cannot travel (send them as a base64 string)");
  }
  let kind = value === null ? "null" : typeof value;
  if (kind === "object") kind = value.constructor?.name ?? "object";
  return new TypeError(`a value of type ${kind} cannot be encoded`);
}

function isPlainObject(value) {
  const proto = Object.getPrototypeOf(value);
  return proto === Object.prototype || proto === null;
}

/**
 * Throw a TypeError if `value` is outside the value domain.
 *
 * Maps are plain objects; a key whose value is `undefined` is left out (as
 * JSON.stringify does); `undefined` anywhere else is refused.
 * @param {unknown} value
 * @param {number} depth how many levels of arrays and maps it may still open.
 */
function checkValue(value, depth) {
  switch (typeof value) {
    case "string":
      if (!wellFormed(value)) throw new TypeError(BAD_TEXT);
      return;
    case "number":
      if (!Number.isFinite(value)) throw new TypeError(BAD_NUMBER);
      if (unsafeInteger(value)) throw new TypeError(BAD_INTEGER);
      return;
    case "boolean":
      return;
    case "object":
      if (value === null) return;
      if (depth <= 0) throw new TypeError(TOO_DEEP);
      if (Array.isArray(value)) {
        for (let i = 0; i < value.length; i++) {
          if (value[i] === undefined) throw refusal(undefined);
          checkValue(value[i], depth - 1);
        }
        return;
      }
      if (!isPlainObject(value)) throw refusal(value);
      for (const key of Object.keys(value)) {
        const item = value[key];
        if (item === undefined) continue;
        if (!wellFormed(key)) throw new TypeError(BAD_KEY);
        checkValue(item, depth - 1);
      }
      return;
    default:
      throw refusal(value);
  }
}

// -- codecs (docs/protocol.md, "Envelopes") -------------------------------------------

const utf8Encoder = new TextEncoder();
const utf8Decoder = new TextDecoder("utf-8", { fatal: true });

/** UTF-8 length of a string without encoding it (batches stay within the server's bound). */
function utf8Length(text) {
  let length = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c < 0x80) length += 1;
    else if (c < 0x800) length += 2;
    else if (c >= 0xd800 && c <= 0xdbff && i + 1 < text.length) {
      length += 4;
      i++;
    } else length += 3;
  }
  return length;
}

function toBytes(data) {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new TypeError("expected bytes (an ArrayBuffer or a Uint8Array)");
}

/**
 * The `wsgate.v1.json` codec: text frames. JSON.stringify alone would turn NaN and
 * Infinity into null and send integers past 2**53 that the server refuses: the
 * encoder refuses them instead.
 */
export const json = Object.freeze({
  /**
   * @param {unknown} value
   * @returns {string}
   */
  encode(value) {
    checkValue(value, MAX_DEPTH);
    return JSON.stringify(value);
  },
  /**
   * @param {string|Uint8Array|ArrayBuffer} text
   * @returns {unknown}
   */
  decode(text) {
    return JSON.parse(typeof text === "string" ? text : utf8Decoder.decode(toBytes(text)));
  },
});

/** A growable byte buffer for the msgpack encoder. */
class Writer {
  constructor() {
    this.bytes = new Uint8Array(128);
    this.view = new DataView(this.bytes.buffer);
    this.length = 0;
  }

  reserve(n) {
    if (this.length + n <= this.bytes.length) return;
    let size = this.bytes.length * 2;
    while (size < this.length + n) size *= 2;
    const bytes = new Uint8Array(size);
    bytes.set(this.bytes.subarray(0, this.length));
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer);
  }

  u8(value) {
    this.reserve(1);
    this.bytes[this.length++] = value;
  }

  /** A type byte, then an unsigned (or `signed`) integer of `size` bytes. */
  head(type, size, value, signed = false) {
    this.reserve(1 + size);
    this.bytes[this.length] = type;
    const at = this.length + 1;
    const view = this.view;
    if (size === 1) signed ? view.setInt8(at, value) : view.setUint8(at, value);
    else if (size === 2) signed ? view.setInt16(at, value) : view.setUint16(at, value);
    else if (size === 4) signed ? view.setInt32(at, value) : view.setUint32(at, value);
    this.length += 1 + size;
  }

  raw(bytes) {
    this.reserve(bytes.length);
    this.bytes.set(bytes, this.length);
    this.length += bytes.length;
  }

  result() {
    return this.bytes.slice(0, this.length);
  }
}

const TWO_32 = 2 ** 32;

/** The smallest msgpack format for an integer, as Python's msgpack chooses it. */
function packInteger(w, v) {
  if (v >= 0) {
    if (v < 0x80) w.u8(v);
    else if (v < 0x100) w.head(0xcc, 1, v);
    else if (v < 0x10000) w.head(0xcd, 2, v);
    else if (v < TWO_32) w.head(0xce, 4, v);
    else pack64(w, 0xcf, v);
  } else if (v >= -32) w.u8(v & 0xff);
  else if (v >= -0x80) w.head(0xd0, 1, v, true);
  else if (v >= -0x8000) w.head(0xd1, 2, v, true);
  else if (v >= -0x80000000) w.head(0xd2, 4, v, true);
  else pack64(w, 0xd3, v);
}

/** uint64 or int64 (two's complement) of a safe integer, without BigInt. */
function pack64(w, type, v) {
  const high = Math.floor(v / TWO_32);
  w.reserve(9);
  w.bytes[w.length] = type;
  if (v < 0) w.view.setInt32(w.length + 1, high);
  else w.view.setUint32(w.length + 1, high);
  w.view.setUint32(w.length + 5, v - high * TWO_32);
  w.length += 9;
}

function packString(w, text, why) {
  if (!wellFormed(text)) throw new TypeError(why);
  const bytes = utf8Encoder.encode(text);
  const n = bytes.length;
  if (n < 32) w.u8(0xa0 | n);
  else if (n < 0x100) w.head(0xd9, 1, n);
  else if (n < 0x10000) w.head(0xda, 2, n);
  else w.head(0xdb, 4, n);
  w.raw(bytes);
}

function packValue(w, value, depth) {
  switch (typeof value) {
    case "string":
      packString(w, value, BAD_TEXT);
      return;
    case "number":
      if (!Number.isFinite(value)) throw new TypeError(BAD_NUMBER);
      if (Number.isSafeInteger(value)) packInteger(w, value);
      else if (unsafeInteger(value)) throw new TypeError(BAD_INTEGER);
      else {
        w.reserve(9);
        w.bytes[w.length] = 0xcb;
        w.view.setFloat64(w.length + 1, value);
        w.length += 9;
      }
      return;
    case "boolean":
      w.u8(value ? 0xc3 : 0xc2);
      return;
    case "object": {
      if (value === null) {
        w.u8(0xc0);
        return;
      }
      if (depth <= 0) throw new TypeError(TOO_DEEP);
      if (Array.isArray(value)) {
        const n = value.length;
        if (n < 16) w.u8(0x90 | n);
        else if (n < 0x10000) w.head(0xdc, 2, n);
        else w.head(0xdd, 4, n);
        for (let i = 0; i < n; i++) {
          if (value[i] === undefined) throw refusal(undefined);
          packValue(w, value[i], depth - 1);
        }
        return;
      }
      if (!isPlainObject(value)) throw refusal(value);
      const keys = Object.keys(value).filter((key) => value[key] !== undefined);
      const n = keys.length;
      if (n < 16) w.u8(0x80 | n);
      else if (n < 0x10000) w.head(0xde, 2, n);
      else w.head(0xdf, 4, n);
      for (const key of keys) {
        packString(w, key, BAD_KEY);
        packValue(w, value[key], depth - 1);
      }
      return;
    }
    default:
      throw refusal(value);
  }
}

/** Reads msgpack bytes, refusing anything the protocol does not send. */
class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.at = 0;
  }

  /** Advance by `n` bytes; return where they start. */
  take(n) {
    const at = this.at;
    if (at + n > this.bytes.length) throw new SyntaxError("msgpack: truncated");
    this.at = at + n;
    return at;
  }

  string(n) {
    const at = this.take(n);
    try {
      return utf8Decoder.decode(this.bytes.subarray(at, at + n));
    } catch {
      throw new SyntaxError("msgpack: a string is not valid UTF-8");
    }
  }

  /** A length prefix cannot promise more items than bytes remain (one byte each at least). */
  count(n) {
    if (n > this.bytes.length - this.at) throw new SyntaxError("msgpack: truncated");
    return n;
  }

  array(n, depth) {
    const items = new Array(this.count(n));
    for (let i = 0; i < n; i++) items[i] = this.value(depth - 1);
    return items;
  }

  map(n, depth) {
    const map = {};
    this.count(n);
    for (let i = 0; i < n; i++) {
      const key = this.value(depth - 1);
      if (typeof key !== "string") throw new SyntaxError("msgpack: a map key is not a string");
      const item = this.value(depth - 1);
      if (key === "__proto__") {
        // A plain assignment would set the prototype instead of a key.
        Object.defineProperty(map, key, { value: item, enumerable: true, writable: true, configurable: true });
      } else map[key] = item;
    }
    return map;
  }

  value(depth) {
    if (depth < 0) throw new SyntaxError("msgpack: nested too deep");
    const view = this.view;
    const b = this.bytes[this.take(1)];
    if (b <= 0x7f) return b;
    if (b >= 0xe0) return b - 0x100;
    if (b >= 0xa0 && b <= 0xbf) return this.string(b & 0x1f);
    if (b >= 0x90 && b <= 0x9f) return this.array(b & 0x0f, depth);
    if (b >= 0x80 && b <= 0x8f) return this.map(b & 0x0f, depth);
    switch (b) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xca: return view.getFloat32(this.take(4));
      case 0xcb: return view.getFloat64(this.take(8));
      case 0xcc: return view.getUint8(this.take(1));
      case 0xcd: return view.getUint16(this.take(2));
      case 0xce: return view.getUint32(this.take(4));
      case 0xcf: {
        const at = this.take(8);
        return view.getUint32(at) * TWO_32 + view.getUint32(at + 4);
      }
      case 0xd0: return view.getInt8(this.take(1));
      case 0xd1: return view.getInt16(this.take(2));
      case 0xd2: return view.getInt32(this.take(4));
      case 0xd3: {
        const at = this.take(8);
        return view.getInt32(at) * TWO_32 + view.getUint32(at + 4);
      }
      case 0xd9: return this.string(view.getUint8(this.take(1)));
      case 0xda: return this.string(view.getUint16(this.take(2)));
      case 0xdb: return this.string(view.getUint32(this.take(4)));
      case 0xdc: return this.array(view.getUint16(this.take(2)), depth);
      case 0xdd: return this.array(view.getUint32(this.take(4)), depth);
      case 0xde: return this.map(view.getUint16(this.take(2)), depth);
      case 0xdf: return this.map(view.getUint32(this.take(4)), depth);
      case 0xc4: case 0xc5: case 0xc6:
        throw new SyntaxError("msgpack: bin is not part of the protocol");
      case 0xc7: case 0xc8: case 0xc9: case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8:
        throw new SyntaxError("msgpack: extension types are not part of the protocol");
      default:
        throw new SyntaxError(`msgpack: unknown type byte 0x${b.toString(16)}`);
    }
  }
}

/**
 * The bundled `wsgate.v1.msgpack` codec, limited to the protocol's value domain:
 * integers in the smallest format (as Python's msgpack writes them), other numbers as
 * float64, strings, arrays and maps with string keys. No bin, no extension types.
 */
export const msgpack = Object.freeze({
  /**
   * @param {unknown} value
   * @returns {Uint8Array}
   */
  encode(value) {
    const w = new Writer();
    packValue(w, value, MAX_DEPTH);
    return w.result();
  },
  /**
   * @param {Uint8Array|ArrayBuffer} bytes
   * @returns {unknown}
   */
  decode(bytes) {
    const reader = new Reader(toBytes(bytes));
    const value = reader.value(256); // far deeper than the server sends (32)
    if (reader.at !== reader.bytes.length) throw new SyntaxError("msgpack: trailing bytes");
    return value;
  },
});

/** An application's msgpack codec (e.g. `@msgpack/msgpack`), held to the value domain. */
function customCodec(codec) {
  if (typeof codec?.encode !== "function" || typeof codec?.decode !== "function") {
    throw new TypeError("codec needs encode(value) and decode(bytes)");
  }
  return {
    encode(value) {
      checkValue(value, MAX_DEPTH); // another library would send NaN, bigints or bin
      return toBytes(codec.encode(value));
    },
    decode: (bytes) => codec.decode(bytes),
  };
}

// -- close codes and backoff (docs/protocol.md §8) ------------------------------------

// The close codes after which a client reconnects by itself. 1006 stands for "no
// close frame": a reset, a silent server, and every HTTP refusal of the handshake
// (a browser shows 401, 403 and 503 all as 1006 with an empty reason).
const RECONNECT_CODES = new Set([1001, 1006, 1011, 1013, 4002, 4003, 4004, 4009]);

/**
 * True if the protocol has the client reconnect by itself after close `code`.
 * @param {number} code
 */
export function reconnectsAfter(code) {
  return RECONNECT_CODES.has(code);
}

/**
 * Exponential backoff with full jitter between connection attempts.
 *
 * Attempt n (from 0) since the last `welcome` waits a uniformly random time in
 * `[0, min(cap, base * factor**n)]`: the spread keeps a fleet of clients that lost the
 * same server from coming back in one storm. A `welcome` restarts the count, however
 * short the connection then lives; the first wait after one is still drawn over
 * `[0, base]`, so a server that welcomes and closes at once sees one reconnection every
 * `base / 2` on average, not a tight loop. After `maxAttempts` failed attempts in a
 * row the client gives up (state `closed`).
 */
export class Backoff {
  /**
   * @param {{base?: number, factor?: number, cap?: number, maxAttempts?: number}} [options]
   *     milliseconds; defaults 500, 2, 30000, Infinity.
   */
  constructor({ base = 500, factor = 2, cap = 30000, maxAttempts = Infinity } = {}) {
    if (!(base >= 0) || !(cap >= 0) || !(factor >= 1) || !(maxAttempts >= 0)) {
      throw new RangeError("backoff needs base >= 0, cap >= 0, factor >= 1 and maxAttempts >= 0");
    }
    this.base = base;
    this.factor = factor;
    this.cap = cap;
    this.maxAttempts = maxAttempts;
  }

  /**
   * The largest wait before attempt `attempt` (from 0), in milliseconds.
   * @param {number} attempt
   */
  ceiling(attempt) {
    return Math.min(this.cap, this.base * this.factor ** Math.min(attempt, 64));
  }

  /**
   * A wait drawn with full jitter for attempt `attempt`, in milliseconds.
   * @param {number} attempt
   * @param {() => number} [random] uniform in [0, 1).
   */
  delay(attempt, random = Math.random) {
    return random() * this.ceiling(attempt);
  }
}

// -- sequencing (docs/protocol.md, "Acks"): no I/O, no clock ---------------------------

/**
 * The sending half: numbering, the window, and what awaits acknowledgement. A port of
 * trio_wsgate/session.py's Outbox. Items are `{seq, ...}`; the client keeps their
 * encoding and their waiter in them.
 */
class Outbox {
  constructor(window) {
    this.window = window;
    /** The seq the next sequenced envelope gets. */
    this.nextSeq = 1;
    /** The highest seq the server acknowledged. */
    this.acked = 0;
    /** Handed out for writing, not yet acknowledged, in seq order. */
    this.inFlight = [];
    /** Numbered but held back by the window, in seq order. */
    this.waiting = [];
  }

  /** The highest seq handed out for writing (what the server may ack). */
  get lastSent() {
    return this.inFlight.length ? this.inFlight[this.inFlight.length - 1].seq : this.acked;
  }

  /** True if an envelope pushed now would be written at once. */
  get open() {
    return this.waiting.length === 0 && this.inFlight.length < this.window;
  }

  get length() {
    return this.inFlight.length + this.waiting.length;
  }

  /** Take the item numbered `nextSeq`; true if it may be written now. */
  push(item) {
    this.nextSeq = item.seq + 1;
    if (this.open) {
      this.inFlight.push(item);
      return true;
    }
    this.waiting.push(item);
    return false;
  }

  /**
   * Apply a cumulative ack. Returns the items it acknowledged and those the window now
   * lets through (to write). An ack above what was written breaks the protocol (1002).
   */
  receiveAck(ack) {
    if (ack > this.lastSent) {
      throw new ProtocolViolation(1002, `ack ${ack} is above the last seq sent (${this.lastSent})`);
    }
    if (ack <= this.acked) return { acked: [], released: [] }; // stale: acks are cumulative
    this.acked = ack;
    let cut = 0;
    while (cut < this.inFlight.length && this.inFlight[cut].seq <= ack) cut++;
    const acked = this.inFlight.splice(0, cut);
    return { acked, released: this.refill() };
  }

  refill() {
    const room = this.window - this.inFlight.length;
    if (room <= 0 || !this.waiting.length) return [];
    const moved = this.waiting.splice(0, room);
    this.inFlight.push(...moved);
    return moved;
  }

  /**
   * Resume on a new connection where the server processed everything up to `ack`,
   * with the window it announced. Returns what was acknowledged and every item to
   * write again, in order: all that was written before is presumed lost with the old
   * connection.
   */
  rewind(ack, window) {
    if (ack < this.acked) {
      throw new ProtocolViolation(1002, `resume ack ${ack} is below the ack already received (${this.acked})`);
    }
    const { acked } = this.receiveAck(ack);
    this.window = window;
    if (this.inFlight.length > window) this.waiting.unshift(...this.inFlight.splice(window));
    this.refill();
    return { acked, resend: [...this.inFlight] };
  }

  /** Every numbered envelope not yet acknowledged, in order. */
  unacknowledged() {
    return [...this.inFlight, ...this.waiting];
  }
}

/**
 * The receiving half: order, duplicates, and when to ack. A port of
 * trio_wsgate/session.py's Inbox. It reports that an ack is *pending* (something
 * processed is unacknowledged: ack within 100 ms) or *urgent* (half the window, or a
 * duplicate to answer: ack at once); the client turns those into timers and envelopes.
 */
class Inbox {
  constructor(window, processed = 0) {
    this.window = window;
    /** The highest seq accepted. */
    this.received = processed;
    /** The highest seq whose processing finished. */
    this.processed = processed;
    /** The highest seq put in an ack on its way to the server. */
    this.acked = processed;
    /** A duplicate arrived: the server wants an ack even if nothing new was processed. */
    this.reack = false;
  }

  /** Account for a received seq: "new" (process it) or "duplicate" (ack it again only). */
  receive(seq) {
    if (seq <= this.received) {
      this.reack = true;
      return "duplicate";
    }
    if (seq !== this.received + 1) {
      throw new ProtocolViolation(1002, `seq ${seq} skips ahead (expected ${this.received + 1})`);
    }
    if (seq > this.acked + this.window) {
      throw new ProtocolViolation(1002, `seq ${seq} exceeds the window (${this.window} above ack ${this.acked})`);
    }
    this.received = seq;
    return "new";
  }

  markProcessed(seq) {
    if (seq > this.processed) this.processed = seq;
  }

  get ackPending() {
    return this.processed > this.acked || this.reack;
  }

  get ackUrgent() {
    return this.reack || (this.processed - this.acked) * 2 >= this.window;
  }

  /** The connection dropped: what was received and not processed will come again. */
  detach() {
    this.received = this.processed;
    this.reack = false;
  }

  /** The ack a resuming hello announces, now counted as sent. */
  resume() {
    this.received = this.processed;
    return this.takeAck();
  }

  takeAck() {
    this.acked = this.processed;
    this.reack = false;
    return this.processed;
  }
}

// -- tokens (docs/protocol.md, "Tokens") ----------------------------------------------

/** `exp` and `iat` of a JWT in milliseconds (each null if absent), read without any
 * check (the server checks; the client only needs to know when to refresh), or null
 * for anything that is not a JWT. */
function jwtTimes(token) {
  try {
    const part = token.split(".")[1];
    const base64 = part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "=");
    const binary = atob(base64);
    const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
    const claims = JSON.parse(utf8Decoder.decode(bytes));
    const time = (v) => (typeof v === "number" && Number.isFinite(v) ? v * 1000 : null);
    return { exp: time(claims.exp), iat: time(claims.iat) };
  } catch {
    return null;
  }
}

// Refresh when 80% of the token's lifetime has passed, and at the latest 10 s before it
// expires (the server closes 4001 at `exp`), but not before half of it has passed;
// never sooner than 1 s after the last refresh, so that a getToken handing out
// short-lived tokens cannot spin.
const REFRESH_AT = 0.8;
const REFRESH_MARGIN = 10000;
const REFRESH_MIN_DELAY = 1000;
const REFRESH_RETRY = 5000;
// A token already due for refresh when it arrives (our clock runs ahead of the issuer's,
// or getToken hands out stale tokens) is refreshed 1 s, 2 s, 4 s... later, up to half
// its lifetime (from iat), or up to a minute without iat.
const REFRESH_BACKOFF_CAP = 60000;

// -- the client -------------------------------------------------------------------------

const EVENTS = ["message", "state", "recovered", "error"];
const STORAGE_VERSION = 1;
const ACK_DELAY = 100; // docs/protocol.md §4: ack within 100 ms of an unacked arrival
const DEFAULT_MAX_MESSAGE_SIZE = 65536; // docs/protocol.md §2.2, until a welcome says
const MAX_TIMER = 2 ** 31 - 1; // the longest setTimeout delay that does not overflow

/**
 * A reliable wsgate client; {@link openClient} makes one. It starts connecting at once,
 * in the background: calls made before the `welcome` are queued.
 *
 * States: `connecting` (no live connection), `connected` (welcomed in the client's
 * first session), `resumed` (welcomed again, nothing lost), `session_lost` (welcomed
 * again in a new session), `closed` (for good).
 */
export class Client {
  /**
   * @param {string} url `ws://host:port/ws` or `wss://...`.
   * @param {object} [options] see wsgate.d.ts (ClientOptions) and README.md.
   */
  constructor(url, options = {}) {
    const o = options;
    const encoding = o.encoding ?? "json";
    if (encoding !== "json" && encoding !== "msgpack") {
      throw new TypeError(`encoding must be "json" or "msgpack", not ${JSON.stringify(encoding)}`);
    }
    const protocol = o.protocol ?? 1;
    if (protocol !== 1 && protocol !== 2) {
      throw new TypeError(`protocol must be 1 or 2, not ${JSON.stringify(protocol)}`);
    }
    if (o.codec != null && encoding !== "msgpack") {
      throw new TypeError('codec replaces the msgpack codec: it needs encoding: "msgpack"');
    }
    const WebSocketClass = o.WebSocket ?? globalThis.WebSocket;
    if (typeof WebSocketClass !== "function") {
      throw new TypeError("no WebSocket here: pass one in the WebSocket option (e.g. from the ws package)");
    }
    const maxPending = o.maxPending ?? 1000;
    if (!(Number.isInteger(maxPending) && maxPending >= 1)) {
      throw new RangeError("maxPending must be an integer of at least 1");
    }
    if (o.token != null) checkToken(o.token, "token");
    if (o.getToken != null && typeof o.getToken !== "function") throw new TypeError("getToken must be a function");

    this.url = url;
    this._codec = encoding === "json" ? json : o.codec != null ? customCodec(o.codec) : msgpack;
    this._binary = encoding === "msgpack";
    this._subprotocol = `wsgate.v${protocol}.${encoding}`;
    // Version 2 (docs/protocol.md, "Version 2"): publications come as unsequenced `pub`
    // envelopes, and every topic is recovered from its history after a reconnection.
    this._v2 = protocol === 2;
    this._WebSocket = WebSocketClass;
    this._backoff = o.backoff instanceof Backoff ? o.backoff : new Backoff(o.backoff ?? {});
    this._connectTimeout = o.connectTimeout ?? 10000;
    this._closeTimeout = o.closeTimeout ?? 5000;
    this._maxPending = maxPending;
    this._storage = o.storage ?? null;
    this._storageKey = o.storageKey ?? `wsgate:${url}`;
    this._getToken = o.getToken ?? null;
    // Clocks and randomness come in through options, so tests are deterministic.
    const setTimer = o.setTimeout ?? ((fn, ms) => globalThis.setTimeout(fn, ms));
    const clearTimer = o.clearTimeout ?? ((id) => globalThis.clearTimeout(id));
    // Two clocks: `now`, the wall clock, for a JWT's iat and exp; `monotonic` for
    // intervals (the silence watchdog), which a wall clock set forward or back (NTP, the
    // user) must not stretch or cut. A test that gives only `now` gets it for both.
    const now = o.now ?? (() => Date.now());
    const monotonic = o.monotonic ?? o.now ?? defaultMonotonic();
    const random = o.random ?? Math.random;
    // Past 2**31 - 1 ms a timer fires at once (browsers and Node alike): clamp, and
    // let the long ones (watchdog, refresh) look at the clock when they fire.
    this._setTimeout = (fn, ms) => setTimer(fn, Math.min(Math.max(0, ms), MAX_TIMER));
    this._clearTimeout = (id) => clearTimer(id);
    this._now = () => now();
    this._monotonic = () => monotonic();
    this._random = () => random();

    /** @type {"connecting"|"connected"|"resumed"|"session_lost"|"closed"} */
    this.state = "connecting";
    /** The server's session id, once welcomed (or restored from storage). */
    this.session = null;
    /** The user the server authenticated (welcome.user), if any. */
    this.user = null;
    /** The close code and reason the client stopped with (null while it runs). */
    this.closeCode = null;
    this.closeReason = "";
    /** After a lost session: whether each topic's recovery had no gap (false: reload
     * that topic's state). */
    this.recovered = {};
    /** Resolves (never rejects) once the client is closed for good. */
    this.closed = new Promise((resolve) => (this._resolveClosed = resolve));

    this._listeners = { message: [], state: [], recovered: [], error: [] };
    this._resumeToken = null;
    this._outbox = new Outbox(1); // the window comes with welcome
    this._inbox = new Inbox(1);
    this._requests = new Map(); // seq -> waiter, until the reply
    this._blocked = []; // calls waiting for room under maxPending, in call order
    this._link = null; // the current connection attempt
    this._everWelcomed = false;
    this._closing = false; // no new calls: close() is flushing
    this._finished = false;
    this._attempt = 0;
    this._reconnectTimer = null;
    this._refreshTimer = null;
    this._retryTimers = new Set();
    this._watchers = []; // close() waits on these
    this._scheduled = false;
    this._dirty = false;
    this._stats = { connects: 0, resumes: 0, sessionsLost: 0, lostSends: 0 };
    // Topics followed (by subscribe(), or the user's own), each with the last
    // {offset, epoch} processed in it, or null: where a recovery starts.
    this._topics = new Map();
    this._userTopic = null;
    // Topics with a sub `since` on its way: {offset, epoch, seen, held, pending}. The
    // waiter of each such sub points at its recovery (`waiter.recovery`).
    this._recoveries = new Map();
    // Topics a reloaded page found under recovery: asked again after a resumed welcome.
    this._restoredRecoveries = [];
    // Version 2: topics unsubscribed whose unsub is not answered yet (what still comes
    // of them is not followed again).
    this._leaving = new Set();
    // Version 2: topics whose sub was on its way when the connection dropped: once its
    // reply places them, they are asked for what came meanwhile. Each maps to what of
    // it came first, held until then (null: no reply of ours is awaited, nothing held).
    this._recoverOnReply = new Map();
    // Version 2: topics followed because the server sent them (the application
    // subscribed the session): recovered only while the session still follows them.
    this._serverTopics = new Set();
    // Version 2: the application's topics this session has not subscribed yet (after a
    // lost session, until their sub is answered): a resume must subscribe them, not
    // only recover them.
    this._unfollowed = new Set();
    // welcome.max_message_size: a larger envelope is refused here, not by the server
    // (1009 would end the client). The protocol's default until a welcome says.
    this._maxMessageSize = DEFAULT_MAX_MESSAGE_SIZE;
    this._token = null;
    this._tokenAt = 0;
    this._tokenStale = false;
    this._tokenPromise = null;
    this._refreshBackoff = 0; // tokens in a row that were due for refresh on arrival

    this._restore();
    if (o.token != null) this._setToken(o.token);
    queueMicrotask(() => this._connect());
  }

  // -- the application's side -----------------------------------------------------------

  /** Counters of the client's life. `pending`: own envelopes not yet acknowledged,
   * including calls still waiting for room under `maxPending`. */
  get stats() {
    return { ...this._stats, pending: this._outbox.length + this._blocked.length };
  }

  /**
   * Listen to `"message"`, `"state"`, `"recovered"` or `"error"`.
   * @returns {() => void} removes the listener.
   */
  on(name, fn) {
    if (!EVENTS.includes(name)) throw new TypeError(`no event ${JSON.stringify(name)}: one of ${EVENTS.join(", ")}`);
    if (typeof fn !== "function") throw new TypeError("a listener is a function");
    this._listeners[name].push(fn);
    return () => this.off(name, fn);
  }

  off(name, fn) {
    const list = this._listeners[name];
    const index = list ? list.indexOf(fn) : -1;
    if (index >= 0) list.splice(index, 1);
  }

  /**
   * Send a `msg` and wait for the handler's reply; resolve with its `data`.
   *
   * Rejects with WsgateError (an error reply: `code`, `reason`; or code "too_large":
   * the envelope is larger than welcome.max_message_size, nothing was sent),
   * SessionLost (written, and the session was lost before the reply: the handler may
   * or may not have run), ClientClosed, or TypeError (a value the protocol cannot
   * carry; nothing was sent).
   */
  request(event, data) {
    return this._callMsg("request", event, data);
  }

  /** Send a `msg`; resolves once the server acknowledged (processed) it. A lost one
   * rejects with SessionLost and counts in `stats.lostSends`; the promise never
   * reports an unhandled rejection, so fire-and-forget is fine. */
  send(event, data) {
    return this._callMsg("send", event, data);
  }

  /** A `msg` call; an event or data the protocol cannot carry rejects, unsent. */
  _callMsg(kind, event, data) {
    let envelope;
    try {
      envelope = msgEnvelope(event, data);
    } catch (error) {
      return Promise.reject(error);
    }
    return this._call(kind, envelope);
  }

  /**
   * Subscribe to a topic; resolves with the reply's data `{offset, epoch, recovered?}`.
   * Remembered: after a lost session it is subscribed again from the last offset
   * processed. Subscribing again to a followed topic asks with `since` (the server
   * sends what came after it; the client drops what it already had).
   */
  subscribe(topic) {
    if (typeof topic !== "string") return Promise.reject(new TypeError("a topic is a string"));
    const known = this._topics.has(topic);
    if (!this._closing && !known) this._topics.set(topic, null);
    this._serverTopics.delete(topic);
    const promise = this._call("sub", this._subEnvelope(topic), { topic, known });
    return promise;
  }

  /** Unsubscribe from a topic (also forgotten for recovery, and what a recovery of it
   * held is dropped: a sub reply still on its way must not bring it back). */
  unsubscribe(topic) {
    if (typeof topic !== "string") return Promise.reject(new TypeError("a topic is a string"));
    if (!this._closing) {
      this._topics.delete(topic);
      this._recoveries.delete(topic);
      this._recoverOnReply.delete(topic); // and what it held for its sub's reply
    }
    this._serverTopics.delete(topic);
    this._unfollowed.delete(topic);
    this._leaving.add(topic);
    const left = () => this._leaving.delete(topic);
    const promise = this._call("unsub", { type: "unsub", topic });
    promise.then(left, left);
    return promise.then(() => undefined);
  }

  /** Publish to a topic where the server allows it; resolves with `{offset, epoch}`. */
  publish(topic, data) {
    if (typeof topic !== "string") return Promise.reject(new TypeError("a topic is a string"));
    return this._call("pub", { type: "pub", topic, data: data === undefined ? null : data });
  }

  /** Send a fresh token for the same user at once (`refresh`); later connections use it. */
  refresh(token) {
    checkToken(token, "token");
    if (this._finished) return;
    this._setToken(token);
    const link = this._liveLink();
    if (link) this._enqueue(link, { type: "refresh", token });
  }

  /** Close the socket as a network failure would (no `bye`: the session is kept); the
   * client reconnects and resumes. For demos and tests. */
  drop() {
    const link = this._link;
    if (link && !link.ended) this._linkEnded(link, 1006, "dropped by the application");
  }

  /**
   * Close for good: no new calls; wait up to `closeTimeout` for what was sent to be
   * acknowledged, send `bye` (the server ends the session), close 1000. Clears storage.
   */
  async close() {
    if (this._finished) return;
    if (this._closing) return this.closed;
    this._closing = true;
    const closed = new ClientClosed(1000, "closing");
    for (const call of this._blocked.splice(0)) call.waiter.reject(closed);
    let timer;
    const timeout = new Promise((resolve) => (timer = this._setTimeout(resolve, this._closeTimeout)));
    await Promise.race([timeout, this._until(() => this._finished || this._outbox.length === 0)]);
    const link = this._liveLink();
    if (!this._finished && link) {
      this._enqueue(link, { type: "bye" });
      await Promise.race([timeout, this._until(() => this._finished || link.ended)]);
    }
    this._clearTimeout(timer);
    this._finish(1000, "closed by the application");
  }

  // -- calls and the outbox ---------------------------------------------------------------

  /**
   * Queue a sequenced envelope and return the promise of its waiter. The envelope is
   * encoded at once (a value outside the domain rejects with TypeError, one larger than
   * the server takes with WsgateError "too_large", and nothing is sent); past
   * `maxPending` unacknowledged envelopes, calls wait in order.
   */
  _call(kind, envelope, extra = {}) {
    if (this._closing) {
      return Promise.reject(new ClientClosed(this.closeCode ?? 1000, this.closeReason || "closing"));
    }
    let waiter;
    const promise = new Promise((resolve, reject) => {
      waiter = { kind, settled: false, chained: [], ...extra, resolve: null, reject: null };
      waiter.resolve = (value) => settle(waiter, () => resolve(value));
      waiter.reject = (error) => settle(waiter, () => reject(error));
    });
    const call = { envelope, waiter };
    try {
      if (this._blocked.length || this._outbox.length >= this._maxPending) {
        // Refuse a bad value now, not when room comes (the seq is still unknown: the
        // size is checked again then).
        this._checkSize(this._encode({ ...envelope, seq: 0 }));
        this._blocked.push(call);
      } else {
        this._push(call);
      }
    } catch (error) {
      // Nothing was sent. A promise of its own: send()'s is never reported unhandled,
      // and a value the protocol cannot carry is a bug to see.
      if (kind === "sub" && !extra.known) this._topics.delete(envelope.topic);
      return Promise.reject(error);
    }
    if (kind === "send") promise.catch(() => {}); // accepted: fire and forget is allowed
    return promise;
  }

  /** Number an envelope, encode it and hand it to the outbox (and the connection if the
   * window lets it through). Throws (a TypeError from the codec, a WsgateError
   * "too_large") before any change. */
  _push({ envelope, waiter }) {
    const link = this._liveLink();
    const outbox = this._outbox;
    const inbox = this._inbox;
    const seq = outbox.nextSeq;
    // A sub asks from the position when it is numbered, not when it was called; and a
    // sub of the client's own (a recovery, a retry) decides then too whether it only
    // recovers the topic: a retry armed in one session may fire in the next.
    if (envelope.type === "sub") envelope = this._subEnvelope(envelope.topic, Boolean(waiter?.auto) && this._recovers(envelope.topic));
    const numbered = { type: envelope.type, seq, ...envelope };
    // Piggyback a pending ack on what leaves now (docs/protocol.md §4), unless that is
    // what makes the envelope too large (the ack then goes on its own).
    let ack = link && outbox.open && inbox.ackPending ? inbox.processed : undefined;
    let payload = this._encode(ack === undefined ? numbered : { ...numbered, ack });
    if (ack !== undefined && payload.size > this._maxMessageSize) {
      ack = undefined;
      payload = this._encode(numbered);
    }
    this._checkSize(payload);
    if (ack !== undefined) inbox.takeAck();
    const item = { seq, envelope: numbered, payload, written: false, waiter };
    if (waiter) this._requests.set(seq, waiter);
    if (numbered.since && waiter) waiter.recovery = this._recover(numbered.topic, numbered.since);
    if (outbox.push(item) && link) this._write(link, item);
    this._markDirty();
  }

  /** Refuse an envelope larger than the server takes: it would close with 1009, which
   * ends the client, not just the call. */
  _checkSize(payload) {
    if (payload.size > this._maxMessageSize) {
      throw new WsgateError(
        "too_large",
        `the envelope is ${payload.size} bytes; the server takes at most ${this._maxMessageSize} (welcome.max_message_size)`,
      );
    }
  }

  /** A call refused before it was numbered: its promise says why. A send's promise is
   * never reported unhandled, so the "error" listeners hear of it too. */
  _refused(waiter, error) {
    if (waiter.kind === "sub" && !waiter.auto && !waiter.known && this._topics.get(waiter.topic) === null) {
      this._topics.delete(waiter.topic);
    }
    if (waiter.kind === "send") this._report(error);
    rejectWaiter(waiter, error);
  }

  /** A sub the client sends by itself (a recovery, a retry). A topic that cannot be
   * sent any more (larger than a new max_message_size) is reported, not thrown. */
  _pushAuto(waiter) {
    try {
      this._push({ envelope: { type: "sub", topic: waiter.topic }, waiter });
    } catch (error) {
      rejectWaiter(waiter, error);
      this._report(error);
    }
  }

  _write(link, item) {
    item.written = true;
    link.queue.push(item.payload);
    this._schedule();
  }

  /** Let calls waiting for room into the outbox, in order. */
  _admit() {
    while (this._blocked.length && this._outbox.length < this._maxPending) {
      const call = this._blocked.shift();
      try {
        this._push(call);
      } catch (error) {
        this._refused(call.waiter, error);
      }
    }
  }

  /** A sub from the topic's position; `recover` (version 2): only if the session still
   * follows the topic (docs/protocol.md §14). */
  _subEnvelope(topic, recover = false) {
    const position = this._topics.get(topic);
    const envelope = position ? { type: "sub", topic, since: { offset: position.offset, epoch: position.epoch } } : { type: "sub", topic };
    if (recover && this._v2) envelope.recover = true;
    return envelope;
  }

  /**
   * Version 2: whether a sub of the client's own may only recover `topic`, now: not
   * while this session has not subscribed it yet (after a lost session, until a sub of
   * it is answered). There `recover` is answered not_subscribed, taken as "the
   * application left", and the topic would be dropped for good (docs/protocol.md §14,
   * "A session lost, then resumed").
   */
  _recovers(topic) {
    return this._v2 && !this._unfollowed.has(topic);
  }

  // -- the connection attempt -------------------------------------------------------------

  async _connect() {
    this._reconnectTimer = null;
    if (this._finished) return;
    if (this._getToken && (this._token == null || this._tokenStale || this._tokenExpired())) {
      try {
        await this._fetchToken();
      } catch (error) {
        this._report(error);
        this._afterEnd(1006, "getToken failed", false);
        return;
      }
      if (this._finished) return;
    }
    let ws;
    try {
      ws = new this._WebSocket(this.url, [this._subprotocol]);
    } catch (error) {
      // A malformed URL: trying again cannot help.
      this._report(error);
      this._finish(1006, `cannot connect: ${error.message}`);
      return;
    }
    ws.binaryType = "arraybuffer";
    const link = {
      ws,
      queue: [],
      open: false,
      welcomed: false,
      ended: false,
      maxMessageSize: DEFAULT_MAX_MESSAGE_SIZE,
      silence: Infinity,
      heard: this._monotonic(),
      connectTimer: null,
      watchdogTimer: null,
      ackTimer: null,
      helloToken: null, // the token its hello carried
    };
    this._link = link;
    // docs/protocol.md, "Heartbeat": the whole attempt, socket and welcome, is bounded.
    link.connectTimer = this._setTimeout(() => this._linkEnded(link, 1006, "connect timeout"), this._connectTimeout);
    ws.onopen = () => {
      if (link.ended) return;
      link.open = true;
      const hello = this._hello();
      link.helloToken = hello.token ?? null;
      this._enqueue(link, hello);
    };
    ws.onmessage = (event) => this._onMessage(link, event);
    ws.onclose = (event) => {
      const code = typeof event?.code === "number" ? event.code : 1006;
      this._linkEnded(link, code, event?.reason ?? "");
    };
    ws.onerror = () => {}; // a close event follows, with the code
  }

  _hello() {
    const hello = { type: "hello" };
    if (this._token != null) hello.token = this._token;
    if (this.session != null && this._resumeToken != null) {
      // Announcing the ack here counts as acknowledging it (docs/protocol.md §5).
      hello.resume = { session: this.session, token: this._resumeToken, ack: this._inbox.resume() };
    }
    return hello;
  }

  /** A connection that is up and welcomed, or null. */
  _liveLink() {
    const link = this._link;
    return link && !link.ended && link.welcomed ? link : null;
  }

  /** The connection is over, whoever ended it; decide between reconnecting and stopping. */
  _linkEnded(link, code, reason) {
    if (link.ended) return;
    link.ended = true;
    for (const timer of [link.connectTimer, link.watchdogTimer, link.ackTimer]) {
      if (timer != null) this._clearTimeout(timer);
    }
    // 1006 is never sent; a browser refuses 1002-1011 from a page, closeSocket falls back.
    closeSocket(link.ws, code === 1006 ? 1000 : code, code === 1006 ? "" : reason);
    if (this._link === link) this._link = null;
    this._inbox.detach();
    this._notify();
    this._afterEnd(code, reason, link.welcomed);
  }

  _afterEnd(code, reason, welcomed) {
    if (this._finished) return;
    // A 4001 for an expired token is a reason to get a new one, with getToken; the
    // session ended with it, so the next welcome is a new one (docs/protocol.md, "Tokens").
    const expired = code === 4001 && this._getToken != null && /expired/i.test(reason);
    if (!reconnectsAfter(code) && !expired) {
      this._finish(code, reason);
      return;
    }
    if (expired) this._tokenStale = true;
    if (welcomed) this._attempt = 0; // a success, however short-lived (see Backoff)
    if (this._attempt >= this._backoff.maxAttempts) {
      const why = reason ? `${code} ${reason}` : `${code}`;
      this._finish(code, `gave up after ${this._attempt} attempts (last: ${why})`, true);
      return;
    }
    const delay = this._backoff.delay(this._attempt, this._random);
    this._attempt += 1;
    this._setState("connecting");
    this._reconnectTimer = this._setTimeout(() => this._connect(), delay);
  }

  // -- writing: one WebSocket message per tick --------------------------------------------

  /** Encode an envelope: `{data, size}` (size in bytes, for batches). */
  _encode(envelope) {
    const data = this._codec.encode(envelope);
    return { data, size: typeof data === "string" ? utf8Length(data) : data.length };
  }

  _enqueue(link, envelope) {
    link.queue.push(this._encode(envelope));
    this._schedule();
  }

  _schedule() {
    if (this._scheduled) return;
    this._scheduled = true;
    queueMicrotask(() => this._tick());
  }

  /** Persist if anything changed, then write everything queued (storage first: it must
   * never hold less than an ack or a seq the server has seen). */
  _tick() {
    this._scheduled = false;
    if (this._dirty) this._save();
    const link = this._link;
    if (!link || !link.open || link.ended || !link.queue.length) return;
    const payloads = link.queue;
    link.queue = [];
    for (const message of pack(payloads, link.maxMessageSize, this._binary)) {
      try {
        link.ws.send(message);
      } catch {
        return; // the socket is closing: its close event follows
      }
    }
  }

  // -- reading ----------------------------------------------------------------------------

  _onMessage(link, event) {
    if (link.ended || this._link !== link) return;
    link.heard = this._monotonic();
    try {
      const data = event.data;
      if ((typeof data === "string") === this._binary) {
        throw new ProtocolViolation(1003, this._binary ? "a text frame under msgpack" : "a binary frame under JSON");
      }
      let value;
      try {
        value = this._codec.decode(data);
      } catch (error) {
        throw new ProtocolViolation(1007, `undecodable message: ${error.message}`);
      }
      // The server is held to the value domain as the client is (docs/protocol.md §2.3):
      // a value outside it (1e400 is Infinity, a lone surrogate) would throw later, when
      // echoed in a pong or put in a sub, half-way through a batch. Checked whole first.
      const envelopes = Array.isArray(value) ? value : [value];
      for (const envelope of envelopes) {
        try {
          checkValue(envelope, MAX_DEPTH); // in a batch, the array does not count
        } catch (error) {
          throw new ProtocolViolation(1007, `a value outside the domain: ${error.message}`);
        }
      }
      for (const envelope of envelopes) {
        if (link.ended) break;
        this._onEnvelope(link, envelope);
      }
    } catch (error) {
      // The server broke the protocol: no reconnect (docs/protocol.md §8). Anything else
      // thrown here comes from what the server sent too, and leaves a message handled
      // in part, which no resume can take back: the same end, never an uncaught throw.
      const violation =
        error instanceof ProtocolViolation
          ? error
          : new ProtocolViolation(1002, `a message could not be handled: ${error instanceof Error ? error.message : "unknown error"}`);
      const report = new WsgateError(violation.code, `protocol error from the server: ${violation.reason}`);
      if (violation !== error) report.cause = error;
      this._report(report);
      this._linkEnded(link, violation.code, violation.reason);
    }
  }

  _onEnvelope(link, envelope) {
    if (envelope === null || typeof envelope !== "object" || Array.isArray(envelope) || typeof envelope.type !== "string") {
      throw new ProtocolViolation(1002, "an envelope is a map with a string type");
    }
    const type = envelope.type;
    if (!link.welcomed) {
      if (type !== "welcome") throw new ProtocolViolation(1002, "expected welcome first");
      this._onWelcome(link, envelope);
      return;
    }
    switch (type) {
      case "msg":
      case "reply": {
        const seq = integer(envelope, "seq");
        if (type === "reply") integer(envelope, "re");
        if (envelope.ack != null) this._onAck(link, integer(envelope, "ack"));
        if (this._inbox.receive(seq) === "duplicate") {
          this._processed(seq); // acked again at once, not processed again
          return;
        }
        if (type === "msg") this._onMsg(envelope);
        else this._onReply(envelope);
        this._processed(seq);
        return;
      }
      case "pub": {
        // Version 2's delivery: not numbered, not acked; its topic's offset is all.
        if (!this._v2) throw new ProtocolViolation(1002, "pub from a version-1 server");
        const offset = integer(envelope, "offset");
        if (typeof envelope.topic !== "string" || typeof envelope.epoch !== "string" || !("data" in envelope)) {
          throw new ProtocolViolation(1002, "pub: needs a string topic and epoch, and data");
        }
        if (envelope.event != null && typeof envelope.event !== "string") {
          throw new ProtocolViolation(1002, "pub: event must be a string");
        }
        if (!this._topics.has(envelope.topic) && !this._leaving.has(envelope.topic)) {
          // A topic the server subscribed the session to: followed from here, so that
          // a reconnection asks for what it missed too.
          this._topics.set(envelope.topic, { offset: offset - 1, epoch: envelope.epoch });
          this._serverTopics.add(envelope.topic);
        }
        this._onMsg(envelope);
        this._markDirty();
        return;
      }
      case "ack":
        this._onAck(link, integer(envelope, "ack"));
        return;
      case "ping": {
        const pong = { type: "pong" };
        if (envelope.ts !== undefined) pong.ts = envelope.ts;
        this._enqueue(link, pong);
        // A background tab's timers run late (a second, even a minute): an ack still
        // pending goes with the pong, so the heartbeat bounds how late it can be.
        if (this._inbox.ackPending) this._enqueue(link, { type: "ack", ack: this._inbox.takeAck() });
        return;
      }
      case "pong":
        return;
      default:
        throw new ProtocolViolation(1002, `unexpected ${type} from a server`);
    }
  }

  /** A msg counts as processed once the "message" listeners have returned. */
  _onMsg(envelope) {
    const { topic, offset, epoch } = envelope;
    const message = { event: envelope.event, data: envelope.data, topic, offset, epoch };
    if (typeof topic === "string" && this._topics.has(topic) && Number.isInteger(offset) && typeof epoch === "string") {
      const waiting = this._recoverOnReply.get(topic);
      if (waiting && !this._topics.get(topic)) {
        // No position yet, and its first sub's reply comes late (docs/protocol.md §14):
        // a live pub overtook it. Its offset is not the position (what came while we
        // were away is below it): held until the reply places the topic (_subscribed).
        waiting.push(message);
        return;
      }
      const recovery = this._recoveries.get(topic);
      if (recovery && recovery.epoch === epoch) {
        // Held until the recovery's reply, then delivered in offset order (acked now,
        // so that the window never waits for the reply it comes before).
        if (offset > recovery.offset && !recovery.seen.has(offset)) {
          recovery.seen.add(offset);
          recovery.held.push(message);
        }
        return;
      }
      if (this._seenBefore(topic, offset, epoch)) return;
    }
    this._emit("message", message);
  }

  /**
   * True if a publication was processed already: a subscription restarted from an
   * older offset sends it again, and offsets exist to drop exactly this. Else it
   * becomes the topic's position.
   *
   * While a `sub` with `since` is pending (a recovery), the session may already follow
   * the topic (the user topic does from the start of a new session, and so does a
   * topic the application subscribes it to): a live publication can then arrive before
   * the recovered ones below it. So during a recovery, what is above `since` is held
   * (once per offset) and delivered in offset order at the reply (docs/protocol.md
   * §6.7): nothing lost, nothing twice, in order.
   */
  _seenBefore(topic, offset, epoch) {
    const position = this._topics.get(topic);
    if (position && position.epoch === epoch && offset <= position.offset) return true;
    this._topics.set(topic, { offset, epoch });
    return false;
  }

  /** A sub with `since` is on its way: dedupe that topic by what the recovery sends.
   * Returns the recovery, for the sub's waiter: only its own reply ends it. */
  _recover(topic, since) {
    let recovery = this._recoveries.get(topic);
    if (recovery) recovery.pending += 1;
    else {
      recovery = { offset: since.offset, epoch: since.epoch, seen: new Set(), held: [], pending: 1 };
      this._recoveries.set(topic, recovery);
    }
    return recovery;
  }

  /**
   * A sub's reply came (data or error): if it was the last of its recovery, deliver
   * what the recovery held. Held messages never moved the topic's position, so a page
   * reloaded before this point asks again from there (see _resumeRecoveries).
   */
  _recovered(waiter, error = null) {
    const topic = waiter.topic;
    const recovery = waiter.recovery;
    // Unsubscribed since (the recovery was dropped with what it held), or a recovery of
    // another session: nothing of this topic to deliver or to follow again.
    if (!recovery || this._recoveries.get(topic) !== recovery) return;
    if (!this._topics.has(topic)) {
      this._recoveries.delete(topic);
      return;
    }
    if (--recovery.pending > 0) return;
    // An automatic resubscription answered "unavailable" is tried again (from the
    // same, unmoved position): what the recovery holds waits for that reply.
    if (error?.code === "unavailable" && waiter.auto) return;
    this._recoveries.delete(topic);
    recovery.held.sort((a, b) => a.offset - b.offset);
    for (const message of recovery.held) {
      if (!this._seenBefore(topic, message.offset, message.epoch)) this._emit("message", message);
    }
  }

  _onReply(envelope) {
    // The shape first: a waiter is taken out of _requests only to be settled.
    const error = envelope.error;
    if (error != null && (typeof error !== "object" || Array.isArray(error) || typeof error.code !== "string")) {
      throw new ProtocolViolation(1002, "reply: error must be a map with a string code");
    }
    const waiter = this._requests.get(envelope.re);
    if (!waiter) return; // restored from before a reload, or answered before a drop
    this._requests.delete(envelope.re);
    // It ran. A send still waits for the ack that covers it; should that be lost (with
    // the session, or the client stopping), the send is done all the same.
    waiter.replied = true;
    try {
      if (waiter.kind === "sub") this._recovered(waiter, error);
      if (error != null) {
        this._failed(waiter, new WsgateError(error.code, typeof error.reason === "string" ? error.reason : ""));
      } else {
        this._answered(waiter, envelope.data);
      }
    } catch (thrown) {
      rejectWaiter(waiter, thrown); // a bug, but no promise hangs on it
      throw thrown;
    }
  }

  _answered(waiter, data) {
    switch (waiter.kind) {
      case "send":
        return; // settled by the ack
      case "sub":
        this._subscribed(waiter.topic, data);
        for (const chained of waiter.chained) chained.resolve(data);
        waiter.resolve(data);
        return;
      case "unsub":
        waiter.resolve(undefined);
        return;
      default:
        waiter.resolve(data);
    }
  }

  _failed(waiter, error) {
    if (waiter.kind === "send") {
      this._report(error); // the handler of a send failed: no promise is left to tell
      return;
    }
    if (waiter.kind === "sub") {
      for (const chained of waiter.chained) chained.reject(error);
      // Nothing will place the topic: what it held for this reply is delivered.
      if (!this._topics.get(waiter.topic)) this._releaseWaiting(waiter.topic);
      if (waiter.auto) {
        this._resubscribeFailed(waiter, error);
        return;
      }
      if (!waiter.known && this._topics.get(waiter.topic) === null) this._topics.delete(waiter.topic);
    }
    waiter.reject(error);
  }

  /** Mark `seq` processed; ack it at once if urgent, else within 100 ms. */
  _processed(seq) {
    const inbox = this._inbox;
    inbox.markProcessed(seq);
    this._markDirty();
    const link = this._liveLink();
    if (!link) return;
    if (inbox.ackUrgent) {
      this._enqueue(link, { type: "ack", ack: inbox.takeAck() });
    } else if (inbox.ackPending && link.ackTimer == null) {
      link.ackTimer = this._setTimeout(() => {
        link.ackTimer = null;
        if (this._liveLink() === link && this._inbox.ackPending) {
          this._enqueue(link, { type: "ack", ack: this._inbox.takeAck() });
        }
      }, ACK_DELAY);
    }
  }

  _onAck(link, ack) {
    const { acked, released } = this._outbox.receiveAck(ack);
    for (const item of released) this._write(link, item);
    this._acknowledged(acked);
  }

  /** The server processed these: sends are done; room for waiting calls. */
  _acknowledged(items) {
    if (!items.length) return;
    for (const item of items) {
      if (item.waiter?.kind === "send") item.waiter.resolve(undefined);
    }
    this._markDirty();
    this._admit();
    this._notify();
  }

  // -- heartbeat (docs/protocol.md §7) ----------------------------------------------------

  /** Silence for interval + timeout from welcome means the connection is dead. */
  _watch(link) {
    const wait = link.heard + link.silence - this._monotonic();
    if (wait <= 0) {
      this._linkEnded(link, 1006, "heartbeat timeout");
      return;
    }
    link.watchdogTimer = this._setTimeout(() => {
      link.watchdogTimer = null;
      if (!link.ended) this._watch(link);
    }, wait);
  }

  // -- sessions (docs/protocol.md §5) -----------------------------------------------------

  _onWelcome(link, welcome) {
    // Numbers no server sends are a protocol error (1002, the client stops), checked
    // before anything of the welcome is taken, as trio_wsgate/client.py does: a window
    // or a size bound below 1 (nothing could be sent), a heartbeat that is not a
    // finite, non-negative number of seconds (a negative one would turn the watchdog
    // off), and a new session that says the server processed something of it.
    const ack = integer(welcome, "ack");
    const window = integer(welcome, "window");
    if (window < 1) throw new ProtocolViolation(1002, "welcome: window must be at least 1");
    const limit = integer(welcome, "max_message_size");
    if (limit < 1) throw new ProtocolViolation(1002, "welcome: max_message_size must be at least 1");
    if (typeof welcome.resumed !== "boolean") throw new ProtocolViolation(1002, "welcome: resumed must be a boolean");
    if (!welcome.resumed && ack !== 0) throw new ProtocolViolation(1002, "welcome: a new session's ack must be 0");
    if (typeof welcome.session !== "string" || typeof welcome.resume_token !== "string") {
      throw new ProtocolViolation(1002, "welcome: session and resume_token must be strings");
    }
    const heartbeat = welcome.heartbeat ?? {};
    if (typeof heartbeat !== "object" || Array.isArray(heartbeat)) {
      throw new ProtocolViolation(1002, "welcome: heartbeat must be a map");
    }
    // Seconds, absent meaning 0 (no heartbeat). A typeof check, not Number(): a map with
    // a toString of the server's choosing would throw from it.
    const seconds = (key) => {
      const value = heartbeat[key] ?? 0;
      if (typeof value !== "number") throw new ProtocolViolation(1002, `welcome: heartbeat.${key} must be a number`);
      if (!(Number.isFinite(value) && value >= 0)) {
        throw new ProtocolViolation(1002, `welcome: heartbeat.${key} must be finite and not negative`);
      }
      return value;
    };
    const interval = seconds("interval");
    const timeout = seconds("timeout");
    link.welcomed = true;
    this._clearTimeout(link.connectTimer);
    link.connectTimer = null;
    link.maxMessageSize = this._maxMessageSize = limit;
    link.silence = interval > 0 ? (interval + timeout) * 1000 : Infinity;
    link.heard = this._monotonic();
    if (link.silence !== Infinity) this._watch(link);
    // A token refreshed while the hello was unanswered (by refresh() or the refresh
    // timer) could not be sent then: the server holds the hello's, and would close
    // 4001 at its exp. It goes first.
    if (this._token != null && this._token !== link.helloToken) this._enqueue(link, { type: "refresh", token: this._token });
    this._stats.connects += 1;

    let state;
    let acked = [];
    let resend;
    let refused = [];
    let lost = false;
    const chained = new Map();
    if (welcome.resumed === true && welcome.session === this.session) {
      ({ acked } = this._outbox.rewind(ack, window));
      this._inbox.window = window;
      refused = this._refuseOversized();
      resend = [...this._outbox.inFlight];
      this._stats.resumes += 1;
      state = "resumed";
    } else {
      lost = this.session != null;
      resend = this._newSession(window, chained);
      if (lost) this._stats.sessionsLost += 1;
      // A reloaded page whose saved session is gone starts afresh: "connected".
      state = lost && this._everWelcomed ? "session_lost" : "connected";
    }
    this.session = welcome.session;
    this._resumeToken = welcome.resume_token;
    this.user = typeof welcome.user === "string" ? welcome.user : null;
    this._everWelcomed = true;
    for (const item of resend) this._write(link, item);
    // Settled only now: an "error" listener may make calls, which go after the resend.
    for (const item of refused) this._refusedAfterResume(item);
    if (state !== "resumed") this._followTopics(welcome, lost, chained);
    else {
      if (this._v2) this._recoverAll();
      this._resumeRecoveries();
    }
    this._restoredRecoveries = []; // a new session recovers every topic anyway
    this._markDirty();
    this._setState(state);
    this._acknowledged(acked);
    this._admit();
  }

  /**
   * After a resumed welcome: take out every unacknowledged envelope larger than the
   * welcome's max_message_size (encoded under the limit of an earlier connection: a
   * node that takes less), which the server would close 1009 for, ending the session
   * and the client. Returns them (the caller settles them once the resend is written).
   *
   * Failing them loses nothing, and runs nothing twice: a resumed welcome's ack is
   * exact (docs/protocol.md §5.3, §5.4: the old connection's handlers stopped before
   * it, and one stopped so has not processed its envelope), so nothing above it was
   * processed, and nothing will be that is not resent. Such an envelope fails with
   * too_large as a call over the limit does (§2.2), and is not resent. The server
   * forgot what it received and did not process, and takes ack + 1 next: those after
   * it are renumbered from there, with no gap (§4).
   */
  _refuseOversized() {
    const outbox = this._outbox;
    const items = outbox.unacknowledged();
    if (!items.some((item) => item.payload.size > this._maxMessageSize)) return [];
    const awaited = new Set(); // waiting for their reply under their seq
    for (const item of items) {
      if (item.waiter && this._requests.get(item.seq) === item.waiter) awaited.add(item);
      this._requests.delete(item.seq);
    }
    outbox.inFlight = [];
    outbox.waiting = [];
    outbox.nextSeq = outbox.acked + 1;
    const refused = [];
    for (const item of items) {
      if (item.payload.size > this._maxMessageSize) {
        refused.push(item);
        continue;
      }
      const seq = outbox.nextSeq;
      const moved = seq !== item.seq;
      const envelope = moved ? { ...item.envelope, seq } : item.envelope;
      // Written under its new seq only once it is written again.
      const renumbered = { ...item, seq, envelope, payload: moved ? this._encode(envelope) : item.payload, written: !moved && item.written };
      if (awaited.has(item)) this._requests.set(seq, item.waiter);
      outbox.push(renumbered);
    }
    return refused;
  }

  /** An envelope _refuseOversized took out: its call fails as an error reply too_large
   * would fail it (a send's promise too; the "error" listeners hear of it). */
  _refusedAfterResume(item) {
    const error = new WsgateError(
      "too_large",
      `the envelope is ${item.payload.size} bytes; the server now takes at most ${this._maxMessageSize} (welcome.max_message_size): it was not processed and is not sent again`,
    );
    const waiter = item.waiter;
    if (!waiter) {
      this._report(error); // restored from before a reload: no promise is left to tell
      return;
    }
    if (waiter.kind === "sub") this._recovered(waiter, error);
    this._failed(waiter, error);
    if (waiter.kind === "send") waiter.reject(error); // _failed only reported it
  }

  /**
   * A new session: number afresh, carry over what was never written, and fail what was
   * written and may or may not have been processed (docs/protocol.md §5). Returns the
   * items to write now.
   */
  _newSession(window, chained) {
    const old = this._outbox;
    const waiting = this._requests;
    this._outbox = new Outbox(window);
    this._inbox = new Inbox(window);
    this._requests = new Map();
    this._recoveries.clear();
    const carried = new Set();
    // Every call written to the old session: awaiting its reply, or (answered before the
    // ack that covers it) that ack.
    const gone = new Set(waiting.values());
    let orphans = 0;
    for (const item of old.unacknowledged()) {
      if (item.written) {
        if (item.waiter) gone.add(item.waiter);
        else orphans += 1; // restored from before a reload: no promise
        continue;
      }
      const seq = this._outbox.nextSeq;
      const type = item.envelope.type;
      // A new session follows only what is subscribed again: a sub of the client's own
      // subscribes one of the application's topics, and only recovers one of the
      // server's (followed if the application subscribed the session again).
      const recover = Boolean(item.waiter?.auto) && this._serverTopics.has(item.envelope.topic);
      const body = type === "sub" ? this._subEnvelope(item.envelope.topic, recover) : item.envelope;
      const envelope = { ...body, seq };
      const payload = this._encode(envelope);
      if (payload.size > this._maxMessageSize) {
        // Queued before the first welcome, under the default limit: this server takes less.
        const error = new WsgateError("too_large", `the envelope is ${payload.size} bytes; the server takes at most ${this._maxMessageSize}`);
        if (item.waiter) this._refused(item.waiter, error);
        else this._report(error);
        continue;
      }
      if (envelope.since && item.waiter) item.waiter.recovery = this._recover(envelope.topic, envelope.since);
      const renumbered = { seq, envelope, payload, written: false, waiter: item.waiter };
      if (item.waiter) {
        this._requests.set(seq, item.waiter);
        carried.add(item.waiter);
      }
      this._outbox.push(renumbered);
    }
    // Every other call went to the old session and its reply is gone with it.
    const lost = new SessionLost();
    for (const waiter of gone) {
      if (carried.has(waiter) || waiter.settled) continue;
      if (waiter.replied) {
        if (waiter.kind === "send") waiter.resolve(undefined); // it ran: only its ack is lost
        continue; // anything else was settled by its reply
      }
      if (waiter.kind === "sub") {
        // Subscribing is idempotent: the new session's subscription answers it.
        const list = chained.get(waiter.topic) ?? [];
        if (!waiter.auto) list.push(waiter);
        list.push(...waiter.chained);
        chained.set(waiter.topic, list);
        continue;
      }
      if (waiter.kind === "unsub") {
        waiter.resolve(undefined); // a new session follows only what is resubscribed
        continue;
      }
      if (waiter.kind === "send") this._stats.lostSends += 1;
      rejectWaiter(waiter, lost);
    }
    if (orphans) {
      this._stats.lostSends += orphans;
      this._report(new SessionLost(`${orphans} envelope(s) sent before a reload may or may not have been processed`));
    }
    return [...this._outbox.inFlight];
  }

  /** The topics a sub carried over into the new session asks for already. */
  _carriedSubs() {
    const subs = new Map();
    for (const item of this._outbox.unacknowledged()) {
      if (item.envelope.type === "sub" && item.waiter) subs.set(item.envelope.topic, item.waiter);
    }
    return subs;
  }

  // -- topics (docs/protocol.md §6) -------------------------------------------------------

  /**
   * On a new session: keep the user topic's starting position, and after a lost
   * session subscribe again to every topic from where the client was (`since`).
   */
  _followTopics(welcome, lost, chained) {
    const userTopic = this.user != null ? `user:${this.user}` : null;
    if (this._userTopic && this._userTopic !== userTopic) {
      this._topics.delete(this._userTopic); // another user now: not ours to recover
    }
    this._userTopic = userTopic;
    if (lost) {
      // What topics held for a sub reply gone with the old session: delivered, so that
      // the new session's sub asks from the last of them (as if they had not been held).
      for (const topic of [...this._recoverOnReply.keys()]) this._releaseWaiting(topic);
      // Retries of the old session's subs: every topic is subscribed again below.
      for (const timer of this._retryTimers) this._clearTimeout(timer);
      this._retryTimers.clear();
    }
    let topics = lost ? [...this._topics.keys()] : [];
    if (userTopic && !this._topics.get(userTopic)) {
      // No position in the user topic yet, so nothing to recover there: start from
      // where this session follows it.
      const start = welcome.user_topic;
      if (start && start.topic === userTopic && Number.isInteger(start.offset) && typeof start.epoch === "string") {
        // Where this session began following it (docs/protocol.md, "Topics"): a later
        // lost session recovers from there, with no sub at start.
        this._topics.set(userTopic, { offset: start.offset, epoch: start.epoch });
        topics = topics.filter((topic) => topic !== userTopic);
      } else {
        // A server without welcome.user_topic: learn the position with a sub, as
        // trio_wsgate/client.py does.
        this._topics.set(userTopic, null);
        if (!topics.includes(userTopic)) topics.push(userTopic);
      }
    }
    if (lost) this.recovered = {};
    if (this._v2) this._unfollowed = new Set(topics.filter((topic) => !this._serverTopics.has(topic)));
    const carried = this._carriedSubs();
    for (const topic of topics) {
      const waiter = carried.get(topic);
      if (waiter) waiter.chained.push(...(chained.get(topic) ?? []));
      else this._pushAuto(autoSub(topic, chained.get(topic)));
    }
    // The subscribe() calls lost with the old session and not answered above: a topic
    // left meanwhile, or the user topic, which the new session follows from the start.
    for (const [topic, list] of chained) {
      if (topics.includes(topic)) continue;
      const position = this._topics.get(topic);
      for (const waiter of list) {
        if (position) waiter.resolve({ offset: position.offset, epoch: position.epoch });
        else waiter.reject(new SessionLost());
      }
    }
  }

  /**
   * Version 2, after a resumed welcome: nothing of the topics was kept for this client,
   * so each asks its history for what came after its position (a topic already under
   * recovery asks with the sub being resent).
   */
  _recoverAll() {
    this.recovered = {};
    this._recoverOnReply.clear();
    // Recoveries of the last connection: what they sent may have died with it, and
    // what they held was neither delivered nor placed. Each topic is asked again.
    this._recoveries.clear();
    // A topic with no position is placed by its sub's reply, still to come: what of it
    // comes first is held for that reply (_onMsg), if a sub of ours awaits one.
    const placing = new Set();
    for (const waiter of this._requests.values()) {
      if (waiter.kind === "sub") placing.add(waiter.topic);
    }
    for (const [topic, position] of this._topics) {
      // (_push decides: subscribed again if unfollowed, else only recovered.)
      if (this._unfollowed.has(topic)) this._pushAuto(autoSub(topic));
      else if (!position) this._recoverOnReply.set(topic, placing.has(topic) ? [] : null);
      else this._pushAuto(autoSub(topic));
    }
  }

  /** Version 2: what `topic` held for its sub's reply goes through _onMsg again, each
   * epoch's in offset order: into the recovery that reply started, or delivered. */
  _releaseWaiting(topic) {
    const held = this._recoverOnReply.get(topic);
    this._recoverOnReply.delete(topic);
    if (!held) return;
    const epochs = new Map();
    for (const message of held) {
      if (!epochs.has(message.epoch)) epochs.set(message.epoch, []);
      epochs.get(message.epoch).push(message);
    }
    for (const messages of epochs.values()) {
      messages.sort((a, b) => a.offset - b.offset);
      for (const message of messages) this._onMsg(message);
    }
  }

  /**
   * After a reload in the middle of a recovery (a `sub` with `since` unanswered): the
   * messages it held died with the old page, and were acked, so the resumed session
   * does not resend them. Ask again from the topic's position, which held messages never
   * moved: the server sends everything after it again, and this recovery holds and
   * dedupes as the first one did.
   */
  _resumeRecoveries() {
    const topics = this._restoredRecoveries;
    this._restoredRecoveries = [];
    for (const topic of topics) {
      // A sub with since already queued since the reload asks the same.
      if (this._topics.get(topic) && !this._recoveries.has(topic)) this._pushAuto(autoSub(topic));
    }
  }

  /** A sub reply: the topic's position, and whether its history reached back. While
   * a recovery of the topic still waits for another reply, the position stays where
   * it is: what the recovery holds is below this reply's offset and not yet delivered
   * (the last reply moves it, after delivering them). */
  _subscribed(topic, data) {
    this._unfollowed.delete(topic); // answered: the session follows it
    if (!this._topics.has(topic) || data === null || typeof data !== "object") {
      this._releaseWaiting(topic);
      return;
    }
    if (Number.isInteger(data.offset) && typeof data.epoch === "string" && !this._recoveries.has(topic)) {
      // Forward only: a live one may have come before this reply (version 2).
      const position = this._topics.get(topic);
      if (!position || position.epoch !== data.epoch || position.offset < data.offset) {
        this._topics.set(topic, { offset: data.offset, epoch: data.epoch });
        this._markDirty();
      }
    }
    if ("recovered" in data) {
      const recovered = Boolean(data.recovered);
      this.recovered[topic] = recovered;
      this._emit("recovered", topic, recovered);
    }
    if (this._recoverOnReply.has(topic) && this._topics.get(topic) && !this._recoveries.has(topic)) {
      this._pushAuto(autoSub(topic)); // from the position this reply gave
    }
    // What came before this reply: held by that recovery until its own reply.
    this._releaseWaiting(topic);
  }

  /** An automatic resubscription failed: retry while the broker is unavailable. */
  _resubscribeFailed(waiter, error) {
    const topic = waiter.topic;
    if (error.code !== "unavailable") {
      // not_subscribed: the application unsubscribed the session from it (version 2).
      if (error.code !== "not_subscribed") {
        this._report(new WsgateError(error.code, `topic ${topic} could not be followed again: ${error.reason}`));
      }
      // Version 2 asks after every reconnection: a topic not ours to follow is let go.
      if (this._v2) {
        this._topics.delete(topic);
        this._serverTopics.delete(topic);
        this._unfollowed.delete(topic);
      }
      return;
    }
    const delay = waiter.retryDelay * (0.5 + this._random());
    const timer = this._setTimeout(() => {
      this._retryTimers.delete(timer);
      if (this._finished || !this._topics.has(topic)) return;
      const again = autoSub(topic);
      again.retryDelay = Math.min(waiter.retryDelay * 2, 10000);
      this._pushAuto(again);
    }, delay);
    this._retryTimers.add(timer);
  }

  // -- tokens ------------------------------------------------------------------------------

  _setToken(token) {
    this._token = token;
    this._tokenAt = this._now();
    this._tokenStale = false;
    this._scheduleRefresh();
  }

  _tokenExpired() {
    const times = this._token != null ? jwtTimes(this._token) : null;
    return times?.exp != null && this._now() >= times.exp;
  }

  /** One getToken() call at a time, shared by a connection attempt and a refresh. */
  _fetchToken() {
    if (!this._tokenPromise) {
      const promise = Promise.resolve()
        .then(() => this._getToken())
        .then((token) => {
          checkToken(token, "getToken's token");
          if (!this._finished && token !== this._token) this._setToken(token);
          else this._tokenStale = false;
          return token;
        });
      this._tokenPromise = promise;
      const forget = () => {
        if (this._tokenPromise === promise) this._tokenPromise = null;
      };
      promise.then(forget, forget);
    }
    return this._tokenPromise;
  }

  /** Refresh before `exp` (docs/protocol.md, "Tokens"): the server closes 4001 at `exp`. */
  _scheduleRefresh() {
    if (this._refreshTimer != null) this._clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (!this._getToken || this._finished || this._token == null) return;
    const times = jwtTimes(this._token);
    if (!times || times.exp == null) return;
    const start = times.iat ?? this._tokenAt;
    // The margin before exp: 20% of the lifetime, at least 10 s, at most half of it
    // (a short-lived token is renewed half way, not at once and again and again).
    const lifetime = times.exp - start;
    const margin = Math.min(Math.max((1 - REFRESH_AT) * lifetime, REFRESH_MARGIN), lifetime / 2);
    const delay = times.exp - margin - this._now();
    if (delay > REFRESH_MIN_DELAY) {
      this._refreshBackoff = 0;
      this._refreshIn(delay);
      return;
    }
    // Due already. Once is normal (a token given near its end); token after token means
    // that by our clock every new one is old already: a clock ahead of the issuer's, or
    // a getToken with a stale cache. Refreshing every second would not help: back off,
    // up to half the lifetime, which by the server's clock a fresh token still has.
    const cap = times.iat != null && lifetime > 0 ? Math.max(lifetime / 2, REFRESH_MIN_DELAY) : REFRESH_BACKOFF_CAP;
    this._refreshIn(Math.min(REFRESH_MIN_DELAY * 2 ** this._refreshBackoff, cap));
    this._refreshBackoff = Math.min(this._refreshBackoff + 1, 30);
  }

  _refreshIn(delay) {
    const at = this._now() + delay;
    this._refreshTimer = this._setTimeout(async () => {
      this._refreshTimer = null;
      if (this._finished) return;
      if (this._now() < at - 1000) {
        this._refreshIn(at - this._now()); // a clamped timer fired early: not yet
        return;
      }
      const previous = this._token;
      let token;
      try {
        token = await this._fetchToken();
      } catch (error) {
        this._report(error);
        if (!this._finished && !this._tokenExpired()) this._refreshIn(REFRESH_RETRY);
        return;
      }
      if (this._finished) return;
      if (token !== previous) {
        const link = this._liveLink();
        if (link) this._enqueue(link, { type: "refresh", token });
      } else if (!this._tokenExpired()) {
        this._refreshIn(REFRESH_RETRY); // the same token again: ask later, until exp
      }
    }, delay);
  }

  // -- persistence ---------------------------------------------------------------------------

  _markDirty() {
    if (!this._storage) return;
    this._dirty = true;
    this._schedule();
  }

  /** Write the session state: called before anything leaves that storage must cover. */
  _save() {
    this._dirty = false;
    if (!this._storage || this._finished) return;
    const state = {
      v: STORAGE_VERSION,
      session: this.session,
      resumeToken: this._resumeToken,
      user: this.user,
      processed: this._inbox.processed,
      nextSeq: this._outbox.nextSeq,
      acked: this._outbox.acked,
      pending: this._outbox.unacknowledged().map((item) => ({ seq: item.seq, written: item.written, envelope: item.envelope })),
      topics: [...this._topics].map(([topic, p]) => [topic, p ? p.offset : null, p ? p.epoch : null]),
      userTopic: this._userTopic,
      // What a recovery holds is acked and only in memory: a reloaded page asks again
      // (and so does the page after it, if it reloads before its welcome).
      recovering: [...new Set([...this._recoveries.keys(), ...this._restoredRecoveries])].filter((topic) => this._topics.get(topic)),
      // Version 2: the topics the application subscribed the session to (recovered
      // with recover, never subscribed by this client).
      serverTopics: [...this._serverTopics].filter((topic) => this._topics.has(topic)),
      // Version 2: the topics this session has not subscribed yet (after a lost
      // session): a reloaded page that resumes subscribes them, not only recovers them.
      unfollowed: [...this._unfollowed].filter((topic) => this._topics.has(topic)),
      maxMessageSize: this._maxMessageSize,
    };
    try {
      this._storage.setItem(this._storageKey, JSON.stringify(state));
    } catch (error) {
      // A stale state would resume with an ack below one already sent (1002): none is
      // better than that.
      try {
        this._storage.removeItem(this._storageKey);
      } catch {
        // nothing more to do
      }
      this._report(error);
    }
  }

  /** Take over the session a previous page saved: resume it, resend what it had not
   * seen acknowledged, with its original seq (replies to those are dropped). Anything
   * in storage that _save could not have written is discarded whole (and reported):
   * half of it would break the protocol later, in the middle of a welcome. */
  _restore() {
    const storage = this._storage;
    if (!storage) return;
    let state;
    try {
      const raw = storage.getItem(this._storageKey);
      if (raw == null) return;
      state = JSON.parse(raw);
      checkSaved(state, `${this._storageKey} in storage is not a saved wsgate session`);
      const outbox = new Outbox(1);
      outbox.nextSeq = state.nextSeq;
      outbox.acked = state.acked;
      const requests = new Map();
      for (const saved of state.pending) {
        const envelope = { ...saved.envelope, seq: saved.seq };
        // A sub's reply still places its topic; other replies have no promise left.
        const waiter = envelope.type === "sub" ? autoSub(envelope.topic) : null;
        if (waiter) requests.set(saved.seq, waiter);
        outbox.inFlight.push({ seq: saved.seq, envelope, payload: this._encode(envelope), written: Boolean(saved.written), waiter });
      }
      const topics = new Map(state.topics.map(([topic, offset, epoch]) => [topic, offset == null ? null : { offset, epoch }]));
      this._outbox = outbox;
      this._requests = requests;
      this._inbox = new Inbox(1, state.processed);
      this._topics = topics;
      this.session = state.session ?? null;
      this._resumeToken = state.resumeToken ?? null;
      this.user = state.user ?? null;
      this._userTopic = state.userTopic ?? null;
      this._restoredRecoveries = state.recovering ?? [];
      this._serverTopics = new Set(state.serverTopics ?? []);
      this._unfollowed = new Set(state.unfollowed ?? []);
      this._maxMessageSize = state.maxMessageSize ?? DEFAULT_MAX_MESSAGE_SIZE;
    } catch (error) {
      try {
        storage.removeItem(this._storageKey);
      } catch {
        // nothing more to do
      }
      queueMicrotask(() => this._report(error)); // once the caller could listen
    }
  }

  // -- bookkeeping -----------------------------------------------------------------------------

  _setState(state) {
    if (state === this.state) return;
    this.state = state;
    this._emit("state", state);
    this._notify();
  }

  _emit(name, ...args) {
    for (const fn of [...this._listeners[name]]) {
      try {
        fn(...args);
      } catch (error) {
        if (name === "error") console.error("wsgate: an error listener threw", error);
        else this._report(error);
      }
    }
  }

  /** An error no promise is left to carry: to the "error" listeners, else the console. */
  _report(error) {
    if (this._listeners.error.length) this._emit("error", error);
    else console.error("wsgate:", error);
  }

  _until(predicate) {
    if (predicate()) return Promise.resolve();
    return new Promise((resolve) => this._watchers.push({ predicate, resolve }));
  }

  _notify() {
    if (!this._watchers.length) return;
    this._watchers = this._watchers.filter((watcher) => {
      if (!watcher.predicate()) return true;
      watcher.resolve();
      return false;
    });
  }

  /** Stop for good: fail what waits, close the socket, forget the saved session (unless
   * it may still be resumed: giving up on an outage keeps it for the next page). */
  _finish(code, reason, keepStorage = false) {
    if (this._finished) return;
    if (keepStorage && this._dirty) this._save();
    this._finished = true;
    this._closing = true;
    this.closeCode = code;
    this.closeReason = reason;
    for (const timer of [this._reconnectTimer, this._refreshTimer, ...this._retryTimers]) {
      if (timer != null) this._clearTimeout(timer);
    }
    this._retryTimers.clear();
    const error = new ClientClosed(code, reason);
    for (const waiter of this._requests.values()) rejectWaiter(waiter, error);
    for (const { waiter } of this._outbox.unacknowledged()) {
      if (waiter?.replied && waiter.kind === "send") waiter.resolve(undefined); // it ran
      else if (waiter) rejectWaiter(waiter, error);
    }
    this._requests.clear();
    for (const call of this._blocked.splice(0)) rejectWaiter(call.waiter, error);
    const link = this._link;
    if (link && !link.ended) {
      if (link.open && link.queue.length) this._tick(); // a bye still queued goes first
      link.ended = true;
      for (const timer of [link.connectTimer, link.watchdogTimer, link.ackTimer]) {
        if (timer != null) this._clearTimeout(timer);
      }
      closeSocket(link.ws, 1000, "");
    }
    this._link = null;
    if (this._storage && !keepStorage) {
      try {
        this._storage.removeItem(this._storageKey);
      } catch {
        // nothing more to do
      }
    }
    this._setState("closed");
    this._notify();
    this._resolveClosed();
  }
}

/**
 * Open a client: it starts connecting at once, in the background.
 * @param {string} url
 * @param {object} [options]
 * @returns {Client}
 */
export function openClient(url, options = {}) {
  return new Client(url, options);
}

// -- helpers ---------------------------------------------------------------------------------

function settle(waiter, fn) {
  if (waiter.settled) return;
  waiter.settled = true;
  fn();
}

/** Fail a waiter and the subscribe() calls chained onto it (an automatic sub's own
 * reject does nothing: without this, they would wait for ever). */
function rejectWaiter(waiter, error) {
  for (const chained of waiter.chained ?? []) chained.reject(error);
  waiter.reject(error);
}

/** A token goes in hello and refresh: one that cannot be encoded would throw there, out
 * of a socket's onopen or a timer, instead of here. */
function checkToken(token, what) {
  if (typeof token !== "string") throw new TypeError(`${what} must be a string`);
  if (!wellFormed(token)) throw new TypeError(`${what} is not valid Unicode (a lone surrogate)`);
}

/** Where intervals are measured: a clock that never jumps, where there is one. */
function defaultMonotonic() {
  const performance = globalThis.performance;
  return typeof performance?.now === "function" ? () => performance.now() : () => Date.now();
}

/**
 * Throw a TypeError (`why`, and what is wrong) unless `state` is a session state that
 * Client#_save could have written.
 */
function checkSaved(state, why) {
  const fail = (what) => {
    throw new TypeError(`${why}: ${what}`);
  };
  const isMap = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
  const text = (v) => typeof v === "string" && wellFormed(v);
  const count = (v) => Number.isSafeInteger(v) && v >= 0;
  if (!isMap(state) || state.v !== STORAGE_VERSION) fail(`not version ${STORAGE_VERSION}`);
  for (const key of ["session", "resumeToken", "user", "userTopic"]) {
    if (state[key] !== null && !text(state[key])) fail(`${key} is neither a string nor null`);
  }
  for (const key of ["processed", "nextSeq", "acked"]) {
    if (!count(state[key])) fail(`${key} is not an integer in [0, 2**53)`);
  }
  if (state.acked >= state.nextSeq) fail("acked is not below nextSeq");
  if (!Array.isArray(state.pending)) fail("pending is not an array");
  let last = state.acked;
  for (const saved of state.pending) {
    // Unacknowledged seqs: above acked, below nextSeq, in order.
    if (!isMap(saved) || !Number.isSafeInteger(saved.seq) || saved.seq <= last || saved.seq >= state.nextSeq) {
      fail("a pending seq is out of order or out of (acked, nextSeq)");
    }
    last = saved.seq;
    if (typeof saved.written !== "boolean") fail("a pending written is not a boolean");
    const envelope = saved.envelope;
    if (!isMap(envelope)) fail("a pending envelope is not a map");
    try {
      checkValue(envelope, MAX_DEPTH);
    } catch (error) {
      fail(`a pending envelope: ${error.message}`);
    }
    const { type, topic, since } = envelope;
    const shaped =
      type === "msg"
        ? typeof envelope.event === "string"
        : (type === "sub" || type === "unsub" || type === "pub") &&
          typeof topic === "string" &&
          (type !== "pub" || "data" in envelope) &&
          (type !== "sub" || since === undefined || (isMap(since) && count(since.offset) && typeof since.epoch === "string"));
    if (!shaped) fail(`a pending ${typeof type === "string" ? type : "envelope"} is not one the client sends`);
  }
  if (!Array.isArray(state.topics)) fail("topics is not an array");
  const positions = new Map();
  for (const entry of state.topics) {
    if (!Array.isArray(entry) || entry.length !== 3) fail("a topic is not [topic, offset, epoch]");
    const [topic, offset, epoch] = entry;
    if (!text(topic) || positions.has(topic)) fail("a topic is not a string, or twice");
    if (!(offset === null && epoch === null) && !(count(offset) && text(epoch))) {
      fail(`the position of ${topic} is neither an integer offset and a string epoch nor null`);
    }
    positions.set(topic, offset);
  }
  // Added after the first release of this format: a state without them is still good.
  if (state.recovering !== undefined) {
    if (!Array.isArray(state.recovering)) fail("recovering is not an array");
    for (const topic of state.recovering) {
      if (positions.get(topic) == null) fail("a topic under recovery has no position");
    }
  }
  if (state.serverTopics !== undefined) {
    if (!Array.isArray(state.serverTopics)) fail("serverTopics is not an array");
    for (const topic of state.serverTopics) {
      if (!positions.has(topic)) fail("a topic of the server's is not followed");
    }
  }
  if (state.unfollowed !== undefined) {
    if (!Array.isArray(state.unfollowed)) fail("unfollowed is not an array");
    for (const topic of state.unfollowed) {
      if (!positions.has(topic)) fail("a topic not subscribed yet is not followed");
    }
  }
  if (state.maxMessageSize !== undefined && !(Number.isSafeInteger(state.maxMessageSize) && state.maxMessageSize > 0)) {
    fail("maxMessageSize is not a positive integer");
  }
}

function msgEnvelope(event, data) {
  if (typeof event !== "string") throw new TypeError("an event is a string");
  return data === undefined ? { type: "msg", event } : { type: "msg", event, data };
}

/** An integer field of a server envelope, as docs/protocol.md requires (else 1002). */
function integer(envelope, key) {
  const value = envelope[key];
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new ProtocolViolation(1002, `${envelope.type}: field ${key} must be an integer in [0, 2**53)`);
  }
  return value;
}

/** The waiter of a sub the client sends by itself: its reply places the topic, and
 * resolves the application's subscribe() calls it stands in for (`chained`). Whether it
 * only recovers the topic is decided when it is numbered (Client#_recovers). */
function autoSub(topic, chained = []) {
  return { kind: "sub", auto: true, topic, settled: false, chained, retryDelay: 500, resolve() {}, reject() {} };
}

/** Close a socket from our side; browsers only allow 1000 and 3000-4999, reasons up to
 * 123 bytes. */
function closeSocket(ws, code, reason) {
  try {
    if (ws.readyState === 2 || ws.readyState === 3) return;
    let text = String(reason ?? "");
    while (utf8Length(text) > 123) text = text.slice(0, -1);
    ws.close(code, text);
  } catch {
    try {
      ws.close();
    } catch {
      // already closed
    }
  }
}

/** Group encoded envelopes, in order, into as few messages as fit `budget` bytes; an
 * envelope larger than the budget (calls refuse those, "too_large") goes alone. */
function pack(payloads, budget, binary) {
  const messages = [];
  let index = 0;
  while (index < payloads.length) {
    let end = index + 1;
    let size = payloads[index].size + 5; // the batch's own framing, at most
    while (end < payloads.length && size + payloads[end].size + 1 <= budget) {
      size += payloads[end].size + 1;
      end += 1;
    }
    messages.push(end === index + 1 ? payloads[index].data : batch(payloads.slice(index, end), binary));
    index = end;
  }
  return messages;
}

function batch(payloads, binary) {
  if (!binary) return `[${payloads.map((p) => p.data).join(",")}]`;
  const w = new Writer();
  const n = payloads.length;
  if (n < 16) w.u8(0x90 | n);
  else if (n < 0x10000) w.head(0xdc, 2, n);
  else w.head(0xdd, 4, n);
  for (const p of payloads) w.raw(p.data);
  return w.result();
}
