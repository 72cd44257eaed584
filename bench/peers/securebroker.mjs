#!/usr/bin/env node
// securebroker driver for the benchmark, speaking the native protocol (docs/protocol.md) from Node
// so that the load generator costs about what the RabbitMQ and NATS drivers cost (see README.md
// beside this file). `securebroker bench` uses it by default; `--sb-client python` selects the
// Python SDK driver (securebroker/bench/sbdriver.py) instead.
//
//   node bench/peers/securebroker.mjs '{"workload":"W2","url":"127.0.0.1:7878","size":1024,
//        "messages":100000,"duration_s":30,"publishers":4,"consumers":0,"inflight":64,"rate":0,
//        "subscriptions":5,"options":{"tls":{"cert":"client.pem","key":"client.key",
//        "ca":"ca.pem","token":"<JWT>"},"topic":"bench.w2","subscriptions_names":["bench.w2.s0"]}}'
//
// Prints ONE JSON line on stdout at the end; progress and logs go to stderr.
// What goes on the wire is what the Python SDK (securebroker/client.py) sends for the same calls:
// preamble + HELLO with the bearer token; one PUBLISH per message carrying a fresh UUIDv4
// idempotency key (the SDK's default), with up to `inflight` unconfirmed per publisher (like the
// Python driver's `inflight` concurrent `client.publish` calls); SUBSCRIBE with credit `inflight`
// and no later CREDIT (acks free the window); one ACK item per message, the acks of one read
// from the socket coalesced into one ACK frame (the SDK's _AckBatcher coalesces one event-loop
// turn). A message counts as acked when its SETTLED result is ok, i.e. when the ack is durable.
//
// Topology: the runner creates the topic and subscriptions and passes their names in `options`
// (`topic`, `subscriptions_names`); the driver leaves them alone. Without them the driver creates
// a topic and its subscriptions under a unique prefix through ADMIN and deletes them at the end.
//
// Load generation: the parent process forks worker processes (child_process.fork). Publishers are
// spread round robin over `pub_procs` processes and consumers over `con_procs` processes; each
// publisher and each consumer has its own TLS connection. Config parsing, the publish loop, the
// worker processes and the orchestration of a run are shared with rabbitmq.mjs in common.mjs.

import { randomBytes, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import tls from 'node:tls';
import { fileURLToPath } from 'node:url';
import { Packr } from 'msgpackr';
import { F64, driverMain, makeLog, now, pacedPublish } from './common.mjs';

const log = makeLog('securebroker');

// ---------------------------------------------------------------- the native protocol

const CLIENT_NAME = 'securebroker-node-bench/0.1';
// "SBRK", major version 1 (u16 BE), CR LF
const PREAMBLE = Buffer.from([0x53, 0x42, 0x52, 0x4b, 0x00, 0x01, 0x0d, 0x0a]);
const HEADER = 10; // u32 length, u8 type, u8 flags, u32 request id
const MAX_FRAME = 1_114_112; // no server sends a client a larger frame (protocol.md §11)
const MAX_RID = 0xffffffff;

const T = {
  HELLO: 1,
  WELCOME: 2,
  OK: 4,
  ERROR: 5,
  PUBLISH: 6,
  CONFIRM: 8,
  SUBSCRIBE: 9,
  SUBSCRIBED: 10,
  DELIVER: 12,
  ACK: 13,
  SETTLED: 15,
  UNSUBSCRIBE: 18,
  PING: 19,
  PONG: 20,
  ADMIN: 21,
  ADMIN_RESULT: 22,
  CLOSE: 23,
};
const NAMES = Object.fromEntries(Object.entries(T).map(([k, v]) => [v, k]));

// Plain MessagePack maps with string keys, smallest headers: the same bytes msgspec writes.
const packr = new Packr({ useRecords: false, mapsAsObjects: true, variableMapSize: true });

function encodeFrame(type, body, rid) {
  const b = packr.pack(body);
  const out = Buffer.allocUnsafe(HEADER + b.length);
  out.writeUInt32BE(6 + b.length, 0);
  out[4] = type;
  out[5] = 0;
  out.writeUInt32BE(rid, 6);
  b.copy(out, HEADER);
  return out;
}

class BrokerError extends Error {
  constructor(body) {
    super(`${body?.name || 'error'}: ${body?.message || ''}`);
    this.code = body?.name || 'error';
    this.retryable = !!body?.retryable;
  }
}

// One connection: mutual TLS 1.3, preamble, HELLO -> WELCOME; pipelined requests matched by
// request id; DELIVERs handed to `onDeliver(body)`; `onChunk()` runs after the frames of each read.
class Link {
  static open(spec, { onDeliver = null, onChunk = null } = {}) {
    const link = new Link(spec, onDeliver, onChunk);
    return link.ready.then(() => link);
  }

  constructor(spec, onDeliver, onChunk) {
    const { host, port } = hostPort(spec.url);
    const t = spec.tls;
    this.onDeliver = onDeliver;
    this.onChunk = onChunk;
    this.pending = new Map(); // rid -> (err, type, body) => void
    this.nextRid = 2; // 1 is the HELLO
    this.partial = null;
    this.corked = false;
    this.dead = null; // why the connection is gone, once it is
    this.closeReason = null;
    this.welcome = null;
    this.uncork = () => {
      this.corked = false;
      this.sock.uncork();
    };
    this.ready = new Promise((resolve, reject) => {
      this.pending.set(1, (err, type, body) => {
        if (err) reject(err);
        else if (type !== T.WELCOME) reject(new Error(`expected WELCOME, got ${NAMES[type]}`));
        else {
          this.welcome = body;
          if (body.heartbeat_ms > 0) {
            // Like the SDK: a PING every heartbeat/2 (at least 0.5 s apart), whatever else is sent.
            const every = Math.max(body.heartbeat_ms / 2, 500);
            this.heartbeat = setInterval(() => this.send(T.PING, {}, 0), every);
            this.heartbeat.unref();
          }
          resolve();
        }
      });
    });
    const timer = setTimeout(
      () => this.fail(new Error(`no WELCOME from ${host}:${port} within 30 s`)),
      30000,
    );
    this.ready.then(
      () => clearTimeout(timer),
      () => clearTimeout(timer),
    );
    this.sock = tls.connect({
      host,
      port,
      // As the Python SDK (server_hostname = host): SNI and the name checked are the host; an IP
      // address is checked against the certificate's IP SANs (Node sends no SNI for an IP).
      servername: isIP(host) ? undefined : host,
      cert: readFileSync(t.cert),
      key: readFileSync(t.key),
      ca: readFileSync(t.ca),
      minVersion: 'TLSv1.3',
    });
    this.sock.setNoDelay(true);
    this.sock.on('secureConnect', () => {
      const hello = { client: CLIENT_NAME };
      if (t.token) hello.token = t.token;
      this.sock.write(Buffer.concat([PREAMBLE, encodeFrame(T.HELLO, hello, 1)]));
    });
    this.sock.on('data', (chunk) => this.onData(chunk));
    this.sock.on('error', (e) => this.fail(e));
    this.sock.on('close', () =>
      this.fail(new Error(`connection closed${this.closeReason ? ` (${this.closeReason})` : ''}`)),
    );
  }

  fail(err) {
    if (this.dead) return;
    this.dead = err;
    clearInterval(this.heartbeat);
    const waiting = [...this.pending.values()];
    this.pending.clear();
    for (const cb of waiting) cb(err);
    this.sock.destroy();
  }

  // Write one frame; the frames written in one tick leave in one TLS write.
  send(type, body, rid) {
    if (this.dead) return false;
    if (!this.corked) {
      this.corked = true;
      this.sock.cork();
      process.nextTick(this.uncork);
    }
    this.sock.write(encodeFrame(type, body, rid));
    return true;
  }

  // Send a request; `cb(err, type, body)` gets its reply (an ERROR reply is `err`).
  request(type, body, cb) {
    if (this.dead) {
      cb(this.dead);
      return;
    }
    const rid = this.nextRid;
    this.nextRid = rid === MAX_RID ? 2 : rid + 1;
    this.pending.set(rid, cb);
    this.send(type, body, rid);
  }

  call(type, body) {
    return new Promise((resolve, reject) =>
      this.request(type, body, (err, t, b) => (err ? reject(err) : resolve({ type: t, body: b }))),
    );
  }

  onData(chunk) {
    let buf = this.partial ? Buffer.concat([this.partial, chunk]) : chunk;
    this.partial = null;
    let pos = 0;
    try {
      while (buf.length - pos >= 4) {
        const len = buf.readUInt32BE(pos);
        if (len < 6 || len > MAX_FRAME) throw new Error(`bad frame length ${len}`);
        const stop = pos + 4 + len;
        if (stop > buf.length) break;
        const type = buf[pos + 4];
        if (buf[pos + 5] !== 0) throw new Error(`frame flags ${buf[pos + 5]} are not 0`);
        const rid = buf.readUInt32BE(pos + 6);
        const body = packr.unpack(buf.subarray(pos + HEADER, stop));
        if (body === null || typeof body !== 'object') {
          throw new Error(`${NAMES[type]} body is not a map`);
        }
        pos = stop;
        this.onFrame(type, rid, body);
      }
    } catch (e) {
      this.fail(new Error(`protocol error from the server: ${e.message}`));
      return;
    }
    if (pos < buf.length) this.partial = buf.subarray(pos);
    if (this.onChunk) this.onChunk();
  }

  onFrame(type, rid, body) {
    switch (type) {
      case T.DELIVER:
        if (this.onDeliver) this.onDeliver(body);
        return;
      case T.PING:
        this.send(T.PONG, {}, rid);
        return;
      case T.CLOSE:
        this.closeReason = body.reason || `code ${body.code}`;
        return;
      default:
        break;
    }
    const cb = this.pending.get(rid);
    if (cb) {
      this.pending.delete(rid);
      if (type === T.ERROR) cb(new BrokerError(body));
      else cb(null, type, body);
    } else if (type === T.ERROR) {
      // request id 0: connection-level (the server closes); otherwise a consumer the server
      // stopped, told on its SUBSCRIBE's request id.
      const err = new BrokerError(body);
      if (rid === 0) this.fail(err);
      else log('broker error:', err.message);
    } else if (type !== T.PONG) {
      this.fail(new Error(`unexpected ${NAMES[type] || `frame type ${type}`} (request id ${rid})`));
    }
  }

  // Graceful close as the SDK does it: CLOSE, then close the TLS connection.
  async close() {
    if (this.dead) return;
    this.send(T.CLOSE, { code: 0, reason: 'client closing' }, 0);
    clearInterval(this.heartbeat);
    await new Promise((resolve) => {
      const t = setTimeout(resolve, 2000);
      this.sock.once('close', () => {
        clearTimeout(t);
        resolve();
      });
      this.sock.end();
    });
    this.fail(new Error('closed by the client'));
  }
}

function hostPort(url) {
  const m = /^(?:[a-z]+:\/\/)?(\[[^\]]+\]|[^:/]+):(\d+)\/?$/.exec(url);
  if (!m) throw new Error(`url must be host:port, got ${JSON.stringify(url)}`);
  return { host: m[1].replace(/^\[|\]$/g, ''), port: Number(m[2]) };
}

// ---------------------------------------------------------------- topology

function needTls(cfg) {
  const t = cfg.tls;
  if (!t || !t.cert || !t.key || !t.ca) {
    throw new Error(
      'options.tls must give the client certificate, key and CA: {"cert","key","ca","token"}',
    );
  }
}

async function admin(link, op, args) {
  const r = await link.call(T.ADMIN, { op, args });
  return r.body.result;
}

async function setup(cfg) {
  needTls(cfg);
  let link;
  try {
    link = await Link.open(cfg);
  } catch (e) {
    throw new Error(`cannot connect to securebroker at ${cfg.url}: ${e.message}`);
  }
  const nsubs = cfg.workload === 'W4' ? cfg.subscriptions : 1;
  if (cfg.topic) {
    const subs = cfg.subscriptions_names;
    if (!Array.isArray(subs) || subs.length < nsubs) {
      await link.close();
      throw new Error(
        `options.subscriptions_names must name ${nsubs} subscription(s) of ${cfg.topic}`,
      );
    }
    return { link, topic: cfg.topic, subs: subs.slice(0, nsubs), owned: false };
  }
  const topic = `sbbench.${Date.now().toString(36)}${randomBytes(3).toString('hex')}`;
  const topo = { link, topic, subs: [], owned: true };
  try {
    await admin(link, 'topic.create', { name: topic });
    for (let i = 0; i < nsubs; i++) {
      const name = `${topic}.s${i}`;
      await admin(link, 'subscription.create', { name, topic });
      topo.subs.push(name);
    }
  } catch (e) {
    await teardown(topo);
    throw e;
  }
  return topo;
}

async function teardown(topo) {
  if (!topo || topo.tornDown) return;
  topo.tornDown = true;
  const { link } = topo;
  try {
    if (topo.owned && !link.dead) {
      for (const s of topo.subs) {
        await admin(link, 'subscription.delete', { name: s, force: true }).catch((e) =>
          log('delete', s, e.message),
        );
      }
      await admin(link, 'topic.delete', { name: topo.topic, force: true }).catch((e) =>
        log('delete', topo.topic, e.message),
      );
      log('deleted topic', topo.topic, 'and', topo.subs.length, 'subscription(s)');
    }
  } finally {
    await link.close().catch(() => {});
  }
}

// ---------------------------------------------------------------- worker roles

async function openPublisher(spec) {
  return Link.open(spec);
}

async function publisher(spec, link, p, deadline, measure) {
  const topic = spec.topic;
  let firstError = null;
  const st = await pacedPublish(spec, p, deadline, measure, {
    // The SDK's Client.publish: one PUBLISH, one item, a fresh idempotency key (UUIDv4 text).
    publish: (payload, done) =>
      link.request(
        T.PUBLISH,
        { message: { topic, payload, idempotency_key: randomUUID() } },
        (err, type, body) => {
          if (!err && (type !== T.CONFIRM || !body.results || body.results.length !== 1)) {
            err = new Error(`expected CONFIRM with 1 result, got ${NAMES[type]}`);
          }
          if (err && !firstError) firstError = err.message;
          done(err);
        },
      ),
    closed: () => !!link.dead,
    what: 'confirms',
    log,
  });
  st.error = link.dead ? link.dead.message : firstError;
  await link.close().catch(() => {});
  return st;
}

async function startConsumer(spec, subscription, measure) {
  const st = { delivered: 0, acked: 0, errors: 0, first: 0, last: 0 };
  st.lat = measure ? new F64() : null;
  let items = []; // acks of the current read, sent as one ACK frame (or max_batch-sized frames)
  let consumerId = null;
  let link = null;
  const settled = (n) => (err, type, body) => {
    if (err || type !== T.SETTLED) {
      st.errors += n;
      return;
    }
    const t = now();
    for (const r of body.results) {
      if (r.ok) st.acked++;
      else st.errors++;
    }
    if (!st.first) st.first = t;
    st.last = t;
  };
  const flush = () => {
    if (!items.length) return;
    const batch = Math.max(1, Math.min(1000, link.welcome.max_batch || 1000));
    for (let i = 0; i < items.length; i += batch) {
      const part = items.slice(i, i + batch);
      link.request(T.ACK, { items: part }, settled(part.length));
    }
    items = [];
  };
  const onDeliver = (m) => {
    if (m.consumer !== consumerId) return;
    const t = now();
    st.delivered++;
    if (st.lat && m.payload && m.payload.length >= 8) st.lat.push(t - m.payload.readDoubleLE(0));
    const { subscription: sub, message_id, lease_token } = m;
    items.push({ subscription: sub, message_id, lease_token });
  };
  link = await Link.open(spec, { onDeliver, onChunk: flush });
  return {
    st,
    async go() {
      const r = await link.call(T.SUBSCRIBE, { subscription, credit: spec.credit });
      consumerId = r.body.consumer;
    },
    async stop() {
      if (consumerId !== null && !link.dead) {
        await Promise.race([
          link.call(T.UNSUBSCRIBE, { consumer: consumerId }).catch(() => {}),
          new Promise((r) => setTimeout(r, 2000)),
        ]);
      }
      if (link.dead) st.errors++; // lost before we closed it
      await link.close().catch(() => {});
    },
  };
}

// ---------------------------------------------------------------- the run

// Credit per consumer: the same number of unacked messages the peers' consumers may hold
// (`prefetch`, 256 by default: RabbitMQ basic.qos, the NATS pull batch), unless `credit` says
// otherwise; at most 10,000 (protocol.md §7).
const creditOf = (cfg) => Math.min(10000, Math.max(1, Number(cfg.credit ?? cfg.prefetch)));

function describe(topo, cfg, result) {
  const W = cfg.workload;
  result.notes.push(
    `topic ${topo.owned ? 'created by the driver' : 'given in options'}` +
      (W === 'W4' ? ` with ${topo.subs.length} subscriptions` : '') +
      ', native protocol over mutual TLS 1.3, one PUBLISH per message with a UUIDv4 ' +
      'idempotency key (confirm = committed in PostgreSQL)' +
      (cfg.total_consumers
        ? `, credit ${creditOf(cfg)} per consumer, one ack per message ` +
          '(the acks of one socket read coalesced into one ACK frame)'
        : ''),
  );
}

function summarize(result, { pubRes, conRes }) {
  result.errors =
    pubRes.reduce((s, r) => s + r.nacked, 0) + conRes.reduce((s, r) => s + (r.errors || 0), 0);
  const own = process.cpuUsage();
  const cpu =
    (own.user + own.system) / 1e6 +
    pubRes.reduce((s, r) => s + (r.cpu_s || 0), 0) +
    conRes.reduce((s, r) => s + (r.cpu_s || 0), 0);
  const n = Math.max(result.confirmed, result.acked, 1);
  result.client_cpu_us_per_message = Math.round((cpu * 1e6 * 10) / n) / 10;
  result.notes.push(`driver CPU ${cpu.toFixed(2)} s in all its processes over their whole life`);
}

driverMain({
  script: fileURLToPath(import.meta.url),
  log,
  peer: 'securebroker',
  resultExtra: { errors: 0, client_cpu_us_per_message: null },
  config: {
    url: '127.0.0.1:7878',
    options: (o) => ({
      tls: o.tls || null,
      topic: o.topic || null,
      subscriptions_names: o.subscriptions_names || null,
      credit: o.credit ?? null,
    }),
  },
  setup,
  teardown,
  describe,
  summarize,
  workerSpec: (topo, cfg) => ({
    tls: cfg.tls,
    topic: topo.topic,
    credit: creditOf(cfg),
  }),
  consumerTargets: (topo) => topo.subs,
  openPublisher,
  publisher,
  startConsumer,
  texts: {
    nacked: 'publishes refused by the broker (ERROR instead of CONFIRM)',
    errors: 'publisher errors',
    client: 'native protocol (msgpackr)',
  },
});
