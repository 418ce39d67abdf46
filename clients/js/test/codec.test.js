// The bundled codecs: msgpack byte for byte as Python's msgpack writes it, every format
// the server can send decoded, and the value domain refused where it ends.

import assert from "node:assert/strict";
import { test } from "node:test";

import { json, msgpack } from "../wsgate.js";

const hex = (bytes) => Buffer.from(bytes).toString("hex");
const bytes = (text) => new Uint8Array(Buffer.from(text, "hex"));

// What Python's msgpack.packb(value) gives (msgpack 1.x, use_bin_type=True).
const PYTHON = [
  [0, "00"],
  [1, "01"],
  [127, "7f"],
  [128, "cc80"],
  [255, "ccff"],
  [256, "cd0100"],
  [65535, "cdffff"],
  [65536, "ce00010000"],
  [2 ** 32 - 1, "ceffffffff"],
  [2 ** 32, "cf0000000100000000"],
  [2 ** 53 - 1, "cf001fffffffffffff"],
  [-1, "ff"],
  [-32, "e0"],
  [-33, "d0df"],
  [-128, "d080"],
  [-129, "d1ff7f"],
  [-32768, "d18000"],
  [-32769, "d2ffff7fff"],
  [-(2 ** 31), "d280000000"],
  [-(2 ** 31) - 1, "d3ffffffff7fffffff"],
  [-(2 ** 53 - 1), "d3ffe0000000000001"],
  [1.5, "cb3ff8000000000000"],
  [-0.25, "cbbfd0000000000000"],
  [1e21, "cb444b1ae4d6e2ef50"], // from 1e21 an integral number is a float, as JSON writes it
  [null, "c0"],
  [false, "c2"],
  [true, "c3"],
  ["", "a0"],
  ["é", "a2c3a9"],
  ["a".repeat(31), "bf" + "61".repeat(31)],
  ["a".repeat(32), "d920" + "61".repeat(32)],
  ["a".repeat(256), "da0100" + "61".repeat(256)],
  ["😀", "a4f09f9880"],
  [{}, "80"],
  [[], "90"],
  [[1, [2]], "920191 02".replace(" ", "")],
  [{ a: 1, b: "x" }, "82a16101a162a178"],
];

test("msgpack encodes as Python's msgpack does, byte for byte", () => {
  for (const [value, expected] of PYTHON) {
    assert.equal(hex(msgpack.encode(value)), expected, JSON.stringify(value));
  }
});

test("msgpack uses 16 and 32 bit headers for long strings, arrays and maps", () => {
  assert.equal(hex(msgpack.encode("a".repeat(65536))).slice(0, 10), "db00010000");
  const array = new Array(16).fill(0);
  assert.equal(hex(msgpack.encode(array)), "dc0010" + "00".repeat(16));
  const map = Object.fromEntries(Array.from({ length: 16 }, (_, i) => [`k${i.toString(16)}`, i]));
  assert.equal(hex(msgpack.encode(map)).slice(0, 6), "de0010");
  assert.equal(hex(msgpack.encode(new Array(65536).fill(null))).slice(0, 10), "dd00010000");
});

test("msgpack decodes every format the server sends", () => {
  for (const [value, encoded] of PYTHON) {
    const decoded = msgpack.decode(bytes(encoded));
    assert.deepEqual(decoded, value);
  }
  // Formats the encoder never chooses but a peer may: float32, uint64/int64 of small
  // values, str8 of a short string, array16/map16 of few items.
  assert.equal(msgpack.decode(bytes("ca3fc00000")), 1.5);
  assert.equal(msgpack.decode(bytes("cf0000000000000005")), 5);
  assert.equal(msgpack.decode(bytes("d3fffffffffffffffb")), -5);
  assert.equal(msgpack.decode(bytes("d0ff")), -1);
  assert.equal(msgpack.decode(bytes("d90161")), "a");
  assert.equal(msgpack.decode(bytes("db0000000161")), "a");
  assert.deepEqual(msgpack.decode(bytes("dc000101")), [1]);
  assert.deepEqual(msgpack.decode(bytes("dd0000000101")), [1]);
  assert.deepEqual(msgpack.decode(bytes("de0001a16101")), { a: 1 });
  assert.deepEqual(msgpack.decode(bytes("df00000001a16101")), { a: 1 });
  // An ArrayBuffer (what a WebSocket gives with binaryType "arraybuffer") works too.
  assert.deepEqual(msgpack.decode(bytes("81a16101").buffer), { a: 1 });
});

test("msgpack round-trips values of the domain", () => {
  const values = [
    { type: "msg", seq: 1, event: "e", data: { list: [1, -2, 3.25, "x", null, true, { deep: [[]] }] } },
    [0, 127, 128, -32, -33, 2 ** 16, 2 ** 31, -(2 ** 31), 2 ** 52 + 0.5, Number.MAX_SAFE_INTEGER, -Number.MAX_SAFE_INTEGER],
    "naïve ☃ 😀",
    1e-300,
    -1.7976931348623157e308,
  ];
  for (const value of values) assert.deepEqual(msgpack.decode(msgpack.encode(value)), value);
});

test("msgpack decodes a __proto__ key as a key, not a prototype", () => {
  const decoded = msgpack.decode(bytes("81a95f5f70726f746f5f5f81a178c3")); // {"__proto__": {"x": true}}
  assert.equal(Object.getPrototypeOf(decoded), Object.prototype);
  assert.deepEqual(Object.keys(decoded), ["__proto__"]);
  assert.equal({}.x, undefined);
});

test("msgpack refuses bin, extensions, unknown bytes, truncation and trailing bytes", () => {
  for (const bad of ["c4016a", "c500016a", "c6000000016a", "d40100", "c70101ff", "c1", "a2c3", "cd01", "0000", "92 01".replace(" ", ""), "81a161", "8101c0", "a1ff"]) {
    assert.throws(() => msgpack.decode(bytes(bad)), SyntaxError, bad);
  }
});

test("both encoders refuse values outside the domain with a TypeError", () => {
  const deep = (n) => (n === 0 ? 0 : [deep(n - 1)]);
  const bad = [
    NaN,
    Infinity,
    -Infinity,
    2n,
    () => 1,
    Symbol("s"),
    undefined,
    new Uint8Array(2),
    new ArrayBuffer(2),
    new Date(0),
    new Map(),
    [undefined],
    { a: NaN },
    "\ud800",
    "a\udc00b",
    { "\ud800": 1 },
    deep(33), // 33 levels of arrays
  ];
  for (const codec of [json, msgpack]) {
    for (const value of bad) assert.throws(() => codec.encode(value), TypeError, String(value?.toString?.() ?? value));
  }
  // 32 levels is the limit, the envelope's own map included.
  assert.doesNotThrow(() => msgpack.encode(deep(32)));
  assert.doesNotThrow(() => json.encode(deep(32)));
  assert.throws(() => json.encode({ a: { b: [] }, c: "\ud83d" }), /lone surrogate/);
  assert.throws(() => msgpack.encode(new Uint8Array(1)), /base64/);
});

test("JSON refuses integers past 2**53 - 1 (JSON.stringify would send digits the server refuses)", () => {
  assert.throws(() => json.encode(2 ** 53), /outside/);
  assert.throws(() => json.encode({ n: -(2 ** 53) }), /outside/);
  assert.throws(() => json.encode(1e20), /outside/);
  assert.throws(() => msgpack.encode([2 ** 53]), /outside/); // the same answer in msgpack
  assert.equal(json.encode(1e21), "1e+21"); // a float to every reader: the server keeps it
  assert.equal(json.encode(Number.MAX_SAFE_INTEGER), "9007199254740991");
  assert.equal(json.encode({ a: 1, skip: undefined, b: [null, 1.5] }), '{"a":1,"b":[null,1.5]}');
  assert.deepEqual(json.decode('{"a":[1,2]}'), { a: [1, 2] });
  assert.deepEqual(json.decode(new TextEncoder().encode('{"é":1}')), { é: 1 });
});

test("maps skip keys whose value is undefined; objects without a prototype are maps", () => {
  const bare = Object.create(null);
  bare.k = 1;
  assert.equal(hex(msgpack.encode(bare)), "81a16b01");
  assert.equal(hex(msgpack.encode({ a: undefined, b: 2 })), "81a16202");
  class Point {
    constructor() {
      this.x = 1;
    }
  }
  assert.throws(() => msgpack.encode(new Point()), /Point/);
});
