// Type declarations for wsgate.js, the browser client of trio-wsgate.

/**
 * What may travel in a message, either way (docs/protocol.md, "Values"), checked when
 * a call is made (a TypeError otherwise; calls take `unknown` so that objects typed by
 * interfaces are accepted): null,
 * booleans, finite numbers (integers within +-(2**53 - 1)), strings without lone
 * surrogates, arrays, and plain objects with string keys, nested at most 32 deep
 * counting the envelope (so `data` nests 31 deep at most). No bytes: send base64.
 * A key whose value is `undefined` is left out.
 */
export type Value = null | boolean | number | string | Value[] | { [key: string]: Value | undefined };

/** The root of every error the client raises on purpose; also an error reply. */
export declare class WsgateError extends Error {
  constructor(code: string | number, reason?: string, message?: string);
  /** The error reply's code (`"forbidden"`, `"unknown_event"`, ...); `"too_large"` for an
   * envelope larger than welcome.max_message_size (refused here, nothing sent); or a
   * close code. */
  readonly code: string | number;
  readonly reason: string;
}

/** The session was lost with this call unacknowledged: it may or may not have run. */
export declare class SessionLost extends WsgateError {
  constructor(reason?: string);
  readonly code: "session_lost";
}

/** The client stopped for good: close(), a final close code, or out of attempts. */
export declare class ClientClosed extends WsgateError {
  constructor(code: number, reason: string);
  /** The close code the client stopped with (1006: no close frame). */
  readonly code: number;
}

export interface BackoffOptions {
  /** The ceiling of the first wait, ms (default 500). */
  base?: number;
  /** How much the ceiling grows per failed attempt (default 2). */
  factor?: number;
  /** The largest ceiling, ms (default 30000). */
  cap?: number;
  /** Failed reconnections in a row (no welcome between) before giving up (default Infinity). */
  maxAttempts?: number;
}

/** Exponential backoff with full jitter: attempt n waits uniform [0, min(cap, base * factor**n)]. */
export declare class Backoff {
  constructor(options?: BackoffOptions);
  readonly base: number;
  readonly factor: number;
  readonly cap: number;
  readonly maxAttempts: number;
  /** The largest wait before attempt `attempt` (from 0), ms. */
  ceiling(attempt: number): number;
  /** A wait drawn with full jitter for attempt `attempt`, ms. */
  delay(attempt: number, random?: () => number): number;
}

/** A codec of the `wsgate.v1.msgpack` kind: bytes in binary frames. */
export interface BinaryCodec {
  encode(value: unknown): Uint8Array;
  decode(bytes: Uint8Array): unknown;
}

/** The `wsgate.v1.json` codec; encode throws a TypeError outside the value domain. */
export declare const json: {
  encode(value: unknown): string;
  decode(text: string | Uint8Array | ArrayBuffer): unknown;
};

/** The bundled msgpack codec, limited to the value domain (no bin, no extensions). */
export declare const msgpack: {
  encode(value: unknown): Uint8Array;
  decode(bytes: Uint8Array | ArrayBuffer): unknown;
};

/** True if the protocol has the client reconnect by itself after close `code`. */
export declare function reconnectsAfter(code: number): boolean;

/** The Web Storage methods the client uses (`sessionStorage` fits). */
export interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

/**
 * The WebSocket the client needs: the browser's, or the `ws` package's in Node. The
 * client sets the four handlers (`onmessage` gets `{data}`, `onclose` gets
 * `{code, reason}`); they are `any` so that both implementations fit.
 */
export interface WebSocketLike {
  binaryType: string;
  readonly readyState: number;
  send(data: string | Uint8Array): void;
  close(code?: number, reason?: string): void;
  onopen: any;
  onmessage: any;
  onclose: any;
  onerror: any;
}

export interface ClientOptions {
  /** Sent in `hello.token` (never in the URL). */
  token?: string;
  /** Called for a token before the first connection if there is none, before the
   * token's `exp`, and after a close 4001 whose reason says "expired". */
  getToken?: () => string | Promise<string>;
  /** `"json"` (default) or `"msgpack"`. */
  encoding?: "json" | "msgpack";
  /** The wire protocol version, 1 (default) or 2 (docs/protocol.md, "Version 2"): in
   * version 2 publications are not numbered by the session, every topic is recovered
   * from its history after each reconnection (a "recovered" event per topic), and a
   * topic's messages are not ordered with the session's other messages. */
  protocol?: 1 | 2;
  /** Replaces the bundled msgpack codec; only with `encoding: "msgpack"`. */
  codec?: BinaryCodec;
  backoff?: BackoffOptions | Backoff;
  /** ms for the socket to open and `welcome` to arrive (default 10000). */
  connectTimeout?: number;
  /** ms close() waits for acks before `bye` (default 5000). */
  closeTimeout?: number;
  /** Own unacknowledged envelopes before calls wait (default 1000). */
  maxPending?: number;
  /** Keeps the session across a page reload. */
  storage?: StorageLike;
  /** Default `"wsgate:" + url`. */
  storageKey?: string;
  /** Default `globalThis.WebSocket`. */
  WebSocket?: new (url: string, protocols?: string | string[]) => WebSocketLike;
  /** Uniform in [0, 1) (default Math.random). */
  random?: () => number;
  setTimeout?: (fn: () => void, ms: number) => unknown;
  clearTimeout?: (id: any) => void;
  /** Wall clock in ms (default Date.now), for a token's iat and exp. */
  now?: () => number;
  /** A clock in ms that never jumps, for intervals (the heartbeat watchdog); default
   * performance.now, or `now` when only that is given. */
  monotonic?: () => number;
}

export type ClientState = "connecting" | "connected" | "resumed" | "session_lost" | "closed";

/** A `msg` from the server; fields it did not carry are undefined. */
export interface Message {
  event: string | undefined;
  data: unknown;
  topic: string | undefined;
  offset: number | undefined;
  epoch: string | undefined;
}

/** A topic position, as `sub` and `pub` replies give it. */
export interface Position {
  offset: number;
  epoch: string;
}

export interface SubscribeResult extends Position {
  /** Present when the sub carried `since`: false means a gap (reload that state). */
  recovered?: boolean;
}

export interface ClientStats {
  connects: number;
  resumes: number;
  sessionsLost: number;
  /** Sends written and lost with a session (their outcome is unknown). */
  lostSends: number;
  /** Own envelopes not yet acknowledged, and calls waiting for room. */
  pending: number;
}

export interface ClientEvents {
  message: (message: Message) => void;
  state: (state: ClientState) => void;
  recovered: (topic: string, recovered: boolean) => void;
  error: (error: Error) => void;
}

/** A reliable wsgate client; it starts connecting as soon as it is made. */
export declare class Client {
  constructor(url: string, options?: ClientOptions);
  readonly url: string;
  readonly state: ClientState;
  /** The server's session id, once welcomed (or restored from storage). */
  readonly session: string | null;
  /** The user the server authenticated, if any. */
  readonly user: string | null;
  /** The close code and reason the client stopped with (null while it runs). */
  readonly closeCode: number | null;
  readonly closeReason: string;
  /** After a lost session: whether each topic's recovery had no gap. */
  readonly recovered: { [topic: string]: boolean };
  readonly stats: ClientStats;
  /** Resolves (never rejects) once the client is closed for good. */
  readonly closed: Promise<void>;
  on<K extends keyof ClientEvents>(name: K, fn: ClientEvents[K]): () => void;
  off<K extends keyof ClientEvents>(name: K, fn: ClientEvents[K]): void;
  /**
   * The reply's data; rejects with WsgateError (an error reply, or code "too_large":
   * larger than welcome.max_message_size, 64 KiB before the first welcome; nothing
   * sent), SessionLost, ClientClosed or TypeError (outside the value domain).
   */
  request(event: string, data?: unknown): Promise<unknown>;
  /** Resolves once the server acknowledged it; rejects as request() does. */
  send(event: string, data?: unknown): Promise<void>;
  /** Rejects as request() does. */
  subscribe(topic: string): Promise<SubscribeResult>;
  /** Forgets the topic at once (and what a recovery of it held). */
  unsubscribe(topic: string): Promise<void>;
  /** Rejects as request() does. */
  publish(topic: string, data: unknown): Promise<Position>;
  /** Sends `refresh` at once; later connections use the token. */
  refresh(token: string): void;
  /** Cuts the connection without `bye`: the client reconnects and resumes. */
  drop(): void;
  /** Waits for acks (closeTimeout), sends `bye`, closes 1000; clears storage. */
  close(): Promise<void>;
}

/** Open a client: it starts connecting at once, in the background. */
export declare function openClient(url: string, options?: ClientOptions): Client;
