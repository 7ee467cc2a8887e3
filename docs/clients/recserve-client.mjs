#!/usr/bin/env node
// A recserve client for Node.js 20, written from PROTOCOL.md alone (no npm packages).
//
// As a library:
//   import { RecserveClient, tensor } from "./recserve-client.mjs";
//   const client = await RecserveClient.connect("127.0.0.1", 7700);
//   const { models } = await client.models();
//   const { scores, shape } = await client.infer("demo", 5, inputs);
//
// As a program (see README.md): `node recserve-client.mjs --port 7700` pings, lists the
// models, scores a random valid request built from the `models` answer, sends malformed
// requests, and prints one JSON document describing what came back.

import net from "node:net";
import fs from "node:fs";
import { pathToFileURL } from "node:url";

// ---------------------------------------------------------------- msgpack (spec subset)

/** A number to be packed as msgpack float64 even when it is integral (e.g. 2.0). */
export class F64 {
  constructor(value) { this.value = value; }
}

/** An n-d numeric array: a JS typed array (C order) and its shape, sent as a typed array. */
export class Tensor {
  constructor(data, shape) {
    const size = shape.reduce((a, b) => a * b, 1);
    if (size !== data.length) throw new Error(`shape [${shape}] does not hold ${data.length}`);
    this.data = data;
    this.shape = shape;
  }
}

/** `tensor(Float32Array.of(...), [n, d])`; the shape defaults to 1-D. */
export const tensor = (data, shape = [data.length]) => new Tensor(data, shape);

const DTYPES = [  // typed array class <-> protocol dtype code (section 4)
  [Float32Array, "f4"], [Float64Array, "f8"], [Int32Array, "i4"], [BigInt64Array, "i8"],
];

class Writer {
  constructor() { this.buf = Buffer.alloc(256); this.len = 0; }
  ensure(n) {
    if (this.len + n <= this.buf.length) return;
    const next = Buffer.alloc(Math.max(this.buf.length * 2, this.len + n));
    this.buf.copy(next, 0, 0, this.len);
    this.buf = next;
  }
  u8(v) { this.ensure(1); this.buf[this.len++] = v; }
  bytes(b) { this.ensure(b.length); this.buf.set(b, this.len); this.len += b.length; }
  // Big-endian fixed-width writers (msgpack is big-endian; typed array data is not).
  put(n, fn, v) { this.ensure(n); this.buf[fn](v, this.len); this.len += n; }
}

function packInt(w, v) {  // v: an integral Number or a BigInt
  const big = typeof v === "bigint";
  if (big ? v >= 0n : v >= 0) {
    if (v < 128) return w.u8(Number(v));
    if (v < 256) { w.u8(0xcc); return w.u8(Number(v)); }
    if (v < 65536) { w.u8(0xcd); return w.put(2, "writeUInt16BE", Number(v)); }
    if (v < 4294967296) { w.u8(0xce); return w.put(4, "writeUInt32BE", Number(v)); }
    if (BigInt(v) > 0xffffffffffffffffn) throw new RangeError(`${v} does not fit uint64`);
    w.u8(0xcf); return w.put(8, "writeBigUInt64BE", BigInt(v));
  }
  if (v >= -32) return w.u8(Number(v) & 0xff);
  if (v >= -128) { w.u8(0xd0); return w.put(1, "writeInt8", Number(v)); }
  if (v >= -32768) { w.u8(0xd1); return w.put(2, "writeInt16BE", Number(v)); }
  if (v >= -2147483648) { w.u8(0xd2); return w.put(4, "writeInt32BE", Number(v)); }
  if (BigInt(v) < -0x8000000000000000n) throw new RangeError(`${v} does not fit int64`);
  w.u8(0xd3); return w.put(8, "writeBigInt64BE", BigInt(v));
}

function packHeader(w, n, fix, fixMax, c16, c32) {  // str/array/map length prefixes
  if (fix !== null && n <= fixMax) return w.u8(fix | n);
  if (c16 === 0xd9 && n < 256) { w.u8(0xd9); return w.u8(n); }  // str8 only
  if (n < 65536) { w.u8(c16 === 0xd9 ? 0xda : c16); return w.put(2, "writeUInt16BE", n); }
  w.u8(c32); w.put(4, "writeUInt32BE", n);
}

function packBin(w, bytes) {
  const n = bytes.length;
  if (n < 256) { w.u8(0xc4); w.u8(n); }
  else if (n < 65536) { w.u8(0xc5); w.put(2, "writeUInt16BE", n); }
  else { w.u8(0xc6); w.put(4, "writeUInt32BE", n); }
  w.bytes(bytes);
}

function typedArrayMap(data, shape) {
  const entry = DTYPES.find(([cls]) => data instanceof cls);
  if (!entry) throw new TypeError(`no protocol dtype for ${data.constructor.name}`);
  // Typed array data is little-endian (PROTOCOL.md section 4); so is every platform Node
  // runs on, but write it explicitly rather than trust the host's byte order.
  const bytes = Buffer.alloc(data.byteLength);
  const width = data.BYTES_PER_ELEMENT;
  const put = { f4: "writeFloatLE", f8: "writeDoubleLE", i4: "writeInt32LE",
    i8: "writeBigInt64LE" }[entry[1]];
  for (let i = 0; i < data.length; i++) bytes[put](data[i], i * width);
  return { dtype: entry[1], shape, data: bytes };
}

function pack(w, v) {
  if (v === null || v === undefined) return w.u8(0xc0);  // (undefined in a map: left out)
  if (v === true) return w.u8(0xc3);
  if (v === false) return w.u8(0xc2);
  if (typeof v === "bigint") return packInt(w, v);
  if (typeof v === "number") {
    if (Number.isInteger(v) && Number.isSafeInteger(v)) return packInt(w, v);
    w.u8(0xcb); return w.put(8, "writeDoubleBE", v);
  }
  if (v instanceof F64) { w.u8(0xcb); return w.put(8, "writeDoubleBE", v.value); }
  if (typeof v === "string") {
    const b = Buffer.from(v, "utf8");
    packHeader(w, b.length, 0xa0, 31, 0xd9, 0xdb);
    return w.bytes(b);
  }
  if (v instanceof Uint8Array) return packBin(w, v);  // Buffer included
  if (v instanceof Tensor) return pack(w, typedArrayMap(v.data, v.shape));
  if (ArrayBuffer.isView(v)) return pack(w, typedArrayMap(v, [v.length]));
  if (Array.isArray(v)) {
    packHeader(w, v.length, 0x90, 15, 0xdc, 0xdd);
    for (const x of v) pack(w, x);
    return;
  }
  // Keys whose value is undefined are left out, as JSON.stringify does: the protocol wants
  // optional keys absent, never nil.
  const entries = (v instanceof Map ? [...v.entries()] : Object.entries(v))
    .filter(([, x]) => x !== undefined);
  packHeader(w, entries.length, 0x80, 15, 0xde, 0xdf);
  for (const [k, x] of entries) { pack(w, String(k)); pack(w, x); }
}

/** Pack one JS value as msgpack bytes. */
export function encode(value) {
  const w = new Writer();
  pack(w, value);
  return w.buf.subarray(0, w.len);
}

class Reader {
  constructor(buf) { this.buf = buf; this.pos = 0; }
  take(n) {
    if (this.pos + n > this.buf.length) throw new Error("msgpack: truncated");
    const out = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }
  get(n, fn) { const v = this.take(n); return v[fn](0); }
}

function int64(v) {  // keep ids exact: a BigInt only when a Number would round
  return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER)
    ? Number(v) : v;
}

function unpackSeq(r, n, isMap) {
  if (!isMap) return Array.from({ length: n }, () => unpack(r));
  const out = {};
  for (let i = 0; i < n; i++) {
    const k = unpack(r);
    if (typeof k !== "string") throw new Error("msgpack: non-str map key");
    out[k] = unpack(r);
  }
  return out;
}

function unpack(r) {
  const c = r.get(1, "readUInt8");
  if (c <= 0x7f) return c;
  if (c >= 0xe0) return c - 256;
  if (c >= 0x80 && c <= 0x8f) return unpackSeq(r, c & 0x0f, true);
  if (c >= 0x90 && c <= 0x9f) return unpackSeq(r, c & 0x0f, false);
  if (c >= 0xa0 && c <= 0xbf) return r.take(c & 0x1f).toString("utf8");
  switch (c) {
    case 0xc0: return null;
    case 0xc2: return false;
    case 0xc3: return true;
    case 0xc4: return Buffer.from(r.take(r.get(1, "readUInt8")));
    case 0xc5: return Buffer.from(r.take(r.get(2, "readUInt16BE")));
    case 0xc6: return Buffer.from(r.take(r.get(4, "readUInt32BE")));
    case 0xca: return r.get(4, "readFloatBE");
    case 0xcb: return r.get(8, "readDoubleBE");
    case 0xcc: return r.get(1, "readUInt8");
    case 0xcd: return r.get(2, "readUInt16BE");
    case 0xce: return r.get(4, "readUInt32BE");
    case 0xcf: return int64(r.get(8, "readBigUInt64BE"));
    case 0xd0: return r.get(1, "readInt8");
    case 0xd1: return r.get(2, "readInt16BE");
    case 0xd2: return r.get(4, "readInt32BE");
    case 0xd3: return int64(r.get(8, "readBigInt64BE"));
    case 0xd9: return r.take(r.get(1, "readUInt8")).toString("utf8");
    case 0xda: return r.take(r.get(2, "readUInt16BE")).toString("utf8");
    case 0xdb: return r.take(r.get(4, "readUInt32BE")).toString("utf8");
    case 0xdc: return unpackSeq(r, r.get(2, "readUInt16BE"), false);
    case 0xdd: return unpackSeq(r, r.get(4, "readUInt32BE"), false);
    case 0xde: return unpackSeq(r, r.get(2, "readUInt16BE"), true);
    case 0xdf: return unpackSeq(r, r.get(4, "readUInt32BE"), true);
    default:  // 0xc1 (never used) and the ext family: the protocol has no use for them
      throw new Error(`msgpack: unsupported type byte 0x${c.toString(16)}`);
  }
}

/** Unpack exactly one msgpack value filling `bytes`. */
export function decode(bytes) {
  const r = new Reader(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength));
  const value = unpack(r);
  if (r.pos !== r.buf.length) throw new Error("msgpack: trailing bytes");
  return value;
}

/** A typed array map from a response as `{ data: <typed array>, shape }`. */
export function fromTypedArray(m) {
  const entry = DTYPES.find(([, code]) => code === m.dtype);
  if (!entry) throw new Error(`unknown dtype ${m.dtype}`);
  const [cls] = entry;
  const count = m.shape.reduce((a, b) => a * b, 1);
  if (m.data.length !== count * cls.BYTES_PER_ELEMENT) throw new Error("typed array: bad size");
  const get = { f4: "readFloatLE", f8: "readDoubleLE", i4: "readInt32LE",
    i8: "readBigInt64LE" }[m.dtype];
  const out = new cls(count);
  for (let i = 0; i < count; i++) out[i] = m.data[get](i * cls.BYTES_PER_ELEMENT);
  return { data: out, shape: m.shape };
}

/** Frame one message: 4-byte big-endian payload length, then the msgpack map. */
export function frame(message) {
  const payload = encode(message);
  const head = Buffer.alloc(4);
  head.writeUInt32BE(payload.length, 0);
  return Buffer.concat([head, payload]);
}

// ---------------------------------------------------------------------- the client

/** A response with `ok: false`: `code` is what programs branch on (PROTOCOL.md section 6). */
export class RecserveError extends Error {
  constructor(code, message, id) {
    super(`${code}: ${message}`);
    this.name = "RecserveError";
    this.code = code;
    this.serverMessage = message;
    this.id = id;
  }
}

/** One pipelined connection; requests are matched to responses by id. */
export class RecserveClient {
  constructor(socket) {
    this.socket = socket;
    this.nextId = 1;
    this.pending = new Map();  // id -> { resolve, reject }
    this.unmatched = [];  // errors with id nil, in arrival order
    this.unmatchedWaiters = [];
    this.buffer = Buffer.alloc(0);
    this.closedError = null;
    socket.setNoDelay(true);  // requests are small writes (section 10)
    socket.on("data", (chunk) => this.onData(chunk));
    socket.on("error", (err) => this.failAll(err));
    socket.on("close", () => this.failAll(new Error("connection closed by the server")));
  }

  /** Open a connection. */
  static connect(host, port) {
    return new Promise((resolve, reject) => {
      const socket = net.createConnection({ host, port }, () => {
        socket.off("error", reject);
        resolve(new RecserveClient(socket));
      });
      socket.once("error", reject);
    });
  }

  onData(chunk) {
    this.buffer = this.buffer.length ? Buffer.concat([this.buffer, chunk]) : chunk;
    while (this.buffer.length >= 4) {
      const length = this.buffer.readUInt32BE(0);
      if (this.buffer.length < 4 + length) break;
      const payload = this.buffer.subarray(4, 4 + length);
      this.buffer = this.buffer.subarray(4 + length);
      this.onResponse(decode(payload));
    }
  }

  onResponse(msg) {
    const error = msg.ok ? null
      : new RecserveError(msg.error.code, msg.error.message, msg.id);
    const call = msg.id === null ? undefined : this.pending.get(msg.id);
    if (call === undefined) {  // id nil: a frame the server could not tie to a request
      const waiter = this.unmatchedWaiters.shift();
      if (waiter) waiter.resolve(error ?? msg);
      else this.unmatched.push(error ?? msg);
      if (error) this.lastUnmatched = error;
      return;
    }
    this.pending.delete(msg.id);
    if (error) call.reject(error);
    else call.resolve(msg);
  }

  failAll(err) {
    // After a nil-id error the server may close: report that error, not a bare close.
    const reason = this.closedError ?? this.lastUnmatched ?? err;
    this.closedError = reason;
    for (const call of this.pending.values()) call.reject(reason);
    this.pending.clear();
    for (const waiter of this.unmatchedWaiters) waiter.reject(reason);
    this.unmatchedWaiters = [];
  }

  /** Send `{id, op, ...fields}`; resolves with the response map, rejects with RecserveError. */
  request(op, fields = {}) {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = this.nextId;
    this.nextId = id >= Number.MAX_SAFE_INTEGER ? 1 : id + 1;  // ids stay exact Numbers
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.socket.write(frame({ id, op, ...fields }));
    });
  }

  /** Send one frame around arbitrary payload bytes (for testing a server's error path). */
  sendRawPayload(payload) {
    const head = Buffer.alloc(4);
    head.writeUInt32BE(payload.length, 0);
    this.socket.write(Buffer.concat([head, payload]));
  }

  /** The next response that carried id nil (an error the server could not tie to a request). */
  nextUnmatched() {
    if (this.unmatched.length) return Promise.resolve(this.unmatched.shift());
    if (this.closedError) return Promise.reject(this.closedError);
    return new Promise((resolve, reject) => this.unmatchedWaiters.push({ resolve, reject }));
  }

  ping() { return this.request("ping"); }

  models() { return this.request("models"); }

  /**
   * Score `candidates` candidates. `inputs` maps input names to typed arrays, `tensor(...)`,
   * plain arrays or `{values, lengths, weights}` maps of those. Resolves with
   * `{ model, version, scores: Float32Array, shape }`. `priority`: "high", "normal" or "low".
   */
  async infer(model, candidates, inputs, { version, deadlineMs, priority } = {}) {
    const fields = { model, candidates, inputs };
    if (version !== undefined) fields.version = version;  // optional keys are left out
    if (deadlineMs !== undefined) fields.deadline_ms = deadlineMs;
    if (priority !== undefined) fields.priority = priority;
    const msg = await this.request("infer", fields);
    const { data, shape } = fromTypedArray(msg.scores);
    return { model: msg.model, version: msg.version, scores: data, shape };
  }

  close() { this.socket.end(); this.socket.destroy(); }
}

// ------------------------------------------------------------ the demonstration program

function rng(seed) {  // mulberry32: a small seeded PRNG so runs are reproducible
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Random valid inputs for `n` candidates, from one model description of `models`. */
export function randomInputs(model, n, random) {
  const ints = (count, rows) => BigInt64Array.from({ length: count },
    () => BigInt(Math.floor(random() * rows)));
  const floats = (count) => Float32Array.from({ length: count }, () => random() * 4 - 2);
  const inputs = {};
  for (const input of model.inputs) {
    if (input.kind === "dense") {
      inputs[input.name] = input.scope === "request" ? tensor(floats(input.dim))
        : tensor(floats(n * input.dim), [n, input.dim]);
      continue;
    }
    const bags = input.scope === "request" ? 1 : n;
    const lengths = Int32Array.from({ length: bags },
      () => Math.floor(random() * (input.max_bag + 1)));
    const total = lengths.reduce((a, b) => a + b, 0);
    const entry = { values: ints(total, input.rows) };
    if (input.scope === "candidate") entry.lengths = lengths;
    if (input.weighted) entry.weights = floats(total);
    inputs[input.name] = entry;
  }
  return inputs;
}

function plain(v) {  // inputs as JSON: typed arrays to (nested) lists
  if (v instanceof Tensor) {
    const flat = Array.from(v.data, Number);
    if (v.shape.length === 1) return flat;
    const [, d] = v.shape;
    return Array.from({ length: v.shape[0] }, (_, i) => flat.slice(i * d, (i + 1) * d));
  }
  if (ArrayBuffer.isView(v)) return Array.from(v, Number);
  return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plain(x)]));
}

function parseArgs(argv) {
  const args = { host: "127.0.0.1", port: 7700, candidates: 5, seed: 1, examples: 0 };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, "");
    if (!(key in args) && key !== "request") throw new Error(`unknown option ${argv[i]}`);
    args[key] = key === "host" || key === "request" ? argv[i + 1] : Number(argv[i + 1]);
  }
  return args;
}

async function errorOf(promise) {
  try {
    return { ok: true, response: await promise };
  } catch (err) {
    if (!(err instanceof RecserveError)) throw err;
    return { ok: false, code: err.code, message: err.serverMessage, id: err.id };
  }
}

/** PROTOCOL.md section 9's messages, packed by this encoder, as hex (to check against it). */
export function workedExamples() {
  const hex = (m) => frame(m).toString("hex");
  const inputs = {
    watch_history: [17, 4021, 388], country: [42], device: [3], hour_of_day: [21],
    member_dense: [0.5, -1.0, 0.0, 2.0].map((x) => new F64(x)),  // the doc sends float64
    title_id: { values: [101, 2048], lengths: [1, 1] },
    genres: { values: [3, 7, 12], lengths: [2, 1] },
    title_dense: tensor(Float32Array.of(0.5, 0.25, 1.0, 0.0, -0.5, 2.0), [2, 3]),
  };
  const scores = { dtype: "f4", shape: [2], data: Buffer.from("7bf71d3fb65e203f", "hex") };
  return {
    ping_request: hex({ id: 1, op: "ping" }),
    ping_response: hex({ id: 1, ok: true, protocol: 1, server: "recserve 0.1.0" }),
    infer_request: hex({ id: 2, op: "infer", model: "demo", candidates: 2, inputs }),
    infer_response: hex({ id: 2, ok: true, model: "demo", version: 1, scores }),
    infer_response_scores: Array.from(fromTypedArray(scores).data),
    typed_vector: encode(tensor(Float32Array.of(0.5, 0.25))).toString("hex"),
  };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  if (args.examples) {
    process.stdout.write(JSON.stringify(workedExamples()) + "\n");
    return;
  }
  const client = await RecserveClient.connect(args.host, args.port);
  const out = {};
  const pong = await client.ping();
  out.ping = { protocol: pong.protocol, server: pong.server };
  const listing = await client.models();
  out.models = listing.models.map((m) => ({ name: m.name, version: m.version }));
  out.limits = listing.limits;
  const model = listing.models[0];
  const inputs = args.request
    ? JSON.parse(fs.readFileSync(args.request, "utf8")).inputs
    : randomInputs(model, args.candidates, rng(args.seed));
  // Three requests in flight at once on one connection, answered by id in any order.
  const [result, , again] = await Promise.all([client.infer(model.name, args.candidates, inputs),
    client.ping(), client.infer(model.name, args.candidates, inputs)]);
  out.infer = { model: result.model, version: result.version, inputs: plain(inputs),
    shape: result.shape, scores: Array.from(result.scores) };
  out.pipelined_scores = Array.from(again.scores);
  // Malformed 1: an id outside its table (a typed error carrying the request's id).
  const sparse = model.inputs.find((i) => i.kind === "sparse" && i.scope === "candidate");
  const bad = { ...inputs };
  bad[sparse.name] = { values: BigInt64Array.from({ length: args.candidates },
    () => BigInt(sparse.rows)), lengths: Int32Array.from({ length: args.candidates }, () => 1) };
  out.out_of_table = await errorOf(client.infer(model.name, args.candidates, bad));
  // Malformed 2: a payload that is not a map (answered with id nil; the connection goes on).
  client.sendRawPayload(encode([1, 2, 3]));
  const unmatched = await client.nextUnmatched();
  out.not_a_map = { code: unmatched.code, message: unmatched.serverMessage, id: unmatched.id };
  out.ping_after = (await client.ping()).protocol;
  client.close();
  process.stdout.write(JSON.stringify(out) + "\n");
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((err) => {
    process.stderr.write(`recserve-client: ${err.stack ?? err}\n`);
    process.exit(1);
  });
}
