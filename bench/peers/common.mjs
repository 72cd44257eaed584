// What the Node drivers (rabbitmq.mjs, nats.mjs, securebroker.mjs) share: config parsing, latency samples,
// the paced publish loop, the worker-process protocol and the parent's orchestration of a run.
// A driver supplies only what is specific to its broker, as a `peer` object passed to
// driverMain (see the fields documented there).
//
// Load generation: the parent process forks worker processes (child_process.fork) from the
// driver's own script. Publishers are spread round robin over `pub_procs` processes and consumers
// over `con_procs` processes; each publisher and each consumer has its own connection.

import { fork } from 'node:child_process';
import os from 'node:os';
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';

// Wall clock in ms with sub-ms precision; the same clock in every process on this machine.
export const now = () => performance.timeOrigin + performance.now();
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export const makeLog =
  (tag) =>
  (...a) =>
    process.stderr.write(`[${tag} ${process.pid}] ${a.join(' ')}\n`);

const errorText = (e) => String(e && e.message ? e.message : e);

// ---------------------------------------------------------------- helpers shared by all roles

export class F64 {
  // Growable Float64Array for latency samples.
  constructor(cap = 1024) {
    this.a = new Float64Array(cap);
    this.n = 0;
  }
  push(v) {
    if (this.n === this.a.length) {
      const b = new Float64Array(this.a.length * 2);
      b.set(this.a);
      this.a = b;
    }
    this.a[this.n++] = v;
  }
  view() {
    return this.a.subarray(0, this.n);
  }
}

export function percentiles(arrays) {
  let total = 0;
  for (const a of arrays) total += a.length;
  if (total === 0) return null;
  const all = new Float64Array(total);
  let o = 0;
  for (const a of arrays) {
    all.set(a, o);
    o += a.length;
  }
  all.sort();
  const at = (q) => all[Math.min(total - 1, Math.max(0, Math.ceil(q * total) - 1))];
  const r3 = (x) => Math.round(x * 1000) / 1000;
  return { p50: r3(at(0.5)), p99: r3(at(0.99)), p999: r3(at(0.999)), max: r3(all[total - 1]) };
}

export function cpuMeter() {
  const c0 = process.cpuUsage();
  const t0 = now();
  return () => {
    const c = process.cpuUsage(c0);
    const wall = now() - t0;
    return wall > 0 ? (c.user + c.system) / 1000 / wall : 0;
  };
}

// CPU seconds (user + system) this process has used since it started.
export function cpuTotal() {
  const c = process.cpuUsage();
  return (c.user + c.system) / 1e6;
}

export function split(total, parts) {
  const base = Math.floor(total / parts);
  return Array.from({ length: parts }, (_, i) => base + (i < total % parts ? 1 : 0));
}

// The common driver config (see README.md); `options(o)` adds the peer's own fields from
// `options`, `url` is the default server.
export function parseConfig(raw, { url, options }) {
  const c = JSON.parse(raw);
  const o = c.options || {};
  const cfg = {
    workload: String(c.workload || 'W2').toUpperCase(),
    url: c.url || url,
    size: Math.max(8, Number(c.size ?? 1024)),
    messages: Math.max(0, Number(c.messages ?? 10000)),
    duration_s: Math.max(1, Number(c.duration_s ?? 30)),
    publishers: Math.max(1, Number(c.publishers ?? 1)),
    consumers: Math.max(0, Number(c.consumers ?? 0)),
    inflight: Math.max(1, Number(c.inflight ?? 1)),
    rate: Math.max(0, Number(c.rate ?? 0)),
    subscriptions: Math.max(1, Number(c.subscriptions ?? 5)),
    options: o,
    ...options(o),
    prefetch: Math.max(1, Number(o.prefetch ?? 256)),
    drain_timeout_s: Math.max(1, Number(o.drain_timeout_s ?? 20)),
  };
  if (!['W1', 'W2', 'W3', 'W4', 'W5'].includes(cfg.workload)) {
    throw new Error(`unknown workload ${cfg.workload}`);
  }
  if (cfg.workload === 'W1') {
    cfg.publishers = 1;
    cfg.inflight = 1;
  }
  if (cfg.workload === 'W1' || cfg.workload === 'W2') cfg.consumers = 0;
  if (['W3', 'W4', 'W5'].includes(cfg.workload) && cfg.consumers < 1) cfg.consumers = 1;
  // W4: `consumers` is per subscription (every subscription gets at least one consumer).
  cfg.total_consumers =
    cfg.workload === 'W4' ? cfg.consumers * cfg.subscriptions : cfg.consumers;
  cfg.pub_procs = Math.max(1, Math.min(cfg.publishers, Number(o.pub_procs ?? 2)));
  cfg.con_procs = Math.max(0, Math.min(cfg.total_consumers, Number(o.con_procs ?? 2)));
  return cfg;
}

// ---------------------------------------------------------------- worker roles

// One publisher's send loop: keeps up to `spec.inflight` publishes outstanding, paced to `p.rate`
// when set, until its quota, the deadline or `closed()`. `publish(buf, done)` sends one payload
// and calls `done(err)` when the broker confirms (err null) or refuses it; `what` names the
// confirms in the log. Returns the publisher's stats; the caller adds `error` and closes.
export async function pacedPublish(spec, p, deadline, measure, { publish, closed, what, log }) {
  const template = randomBytes(spec.size);
  const K = spec.inflight;
  const quota = p.quota;
  const interval = p.rate > 0 ? 1000 / p.rate : 0;
  const lat = measure ? new F64(Math.min(quota, 1 << 20) || 1) : null;
  const st = { published: 0, confirmed: 0, nacked: 0, start: now(), end: 0, lat: null };
  let inflight = 0;
  let timer = null;
  await new Promise((resolve) => {
    let finished = false;
    const finish = () => {
      if (!finished) {
        finished = true;
        resolve();
      }
    };
    const stopSending = () => st.published >= quota || now() >= deadline || closed();
    const send = (t) => {
      const buf = Buffer.allocUnsafe(spec.size);
      template.copy(buf);
      buf.writeDoubleLE(t, 0);
      inflight++;
      st.published++;
      publish(buf, (err) => {
        const tc = now();
        inflight--;
        if (err) st.nacked++;
        else {
          st.confirmed++;
          if (lat) lat.push(tc - t);
          st.end = tc;
        }
        pump();
      });
    };
    const pump = () => {
      if (finished) return;
      if (stopSending()) {
        if (inflight === 0) finish();
        return;
      }
      while (inflight < K && !stopSending()) {
        const t = now();
        if (interval > 0) {
          const due = st.start + st.published * interval;
          if (due > t) {
            if (!timer) {
              timer = setTimeout(() => {
                timer = null;
                pump();
              }, Math.max(0, due - t - 0.5));
            }
            return;
          }
        }
        send(t);
      }
    };
    // Wait for outstanding confirms at most drain_timeout after the deadline.
    const guard = setTimeout(finish, deadline - now() + spec.drain_timeout_s * 1000);
    guard.unref();
    pump();
  });
  if (timer) clearTimeout(timer);
  if (inflight > 0) log(`publisher gave up waiting for ${inflight} ${what}`);
  if (!st.end) st.end = now();
  st.lat = lat ? lat.view() : null;
  return st;
}

export function consumerStats(measure) {
  return { delivered: 0, acked: 0, first: 0, last: 0, lat: measure ? new F64() : null };
}

// Count one delivery: `sentAt()` reads the send time from the payload, `ack()` acks it.
export function countDelivery(st, sentAt, ack) {
  const t = now();
  st.delivered++;
  if (st.lat) st.lat.push(t - sentAt());
  ack();
  st.acked++;
  if (!st.first) st.first = t;
  st.last = t;
}

async function workerMain(peer) {
  // Protocol with the parent: init -> ready; go -> (progress...) ; stop/(publish end) -> done.
  const { log } = peer;
  let spec = null;
  const send = (m) => process.send && process.send(m);
  process.on('disconnect', () => process.exit(0));
  const hard = setTimeout(() => {
    log('worker watchdog fired');
    process.exit(3);
  }, 10 * 60 * 1000);
  hard.unref();
  let consumers = [];
  let stopped = null;
  const stopPromise = new Promise((r) => (stopped = r));
  let goResolve = null;
  const goPromise = new Promise((r) => (goResolve = r));
  process.on('message', (m) => {
    if (m.type === 'init') {
      spec = m.spec;
      init().catch((e) => send({ type: 'fail', error: errorText(e) }));
    } else if (m.type === 'go') goResolve(m);
    else if (m.type === 'stop') stopped();
  });
  async function init() {
    if (spec.role === 'consumer') {
      for (const q of spec.queues) {
        consumers.push(await peer.startConsumer(spec, q, spec.measure_e2e));
      }
      send({ type: 'ready' });
      await goPromise;
      const cpu = cpuMeter();
      for (const c of consumers) await c.go();
      const prog = setInterval(() => {
        let acked = 0;
        let last = 0;
        for (const c of consumers) {
          acked += c.st.acked;
          last = Math.max(last, c.st.last);
        }
        send({ type: 'progress', acked, last });
      }, 50);
      await stopPromise;
      clearInterval(prog);
      const cpuFrac = cpu();
      for (const c of consumers) await c.stop();
      const out = { type: 'done', role: 'consumer', cpu: cpuFrac, cpu_s: cpuTotal(), delivered: 0, acked: 0, errors: 0, first: 0, last: 0, lat: [] };
      for (const c of consumers) {
        out.delivered += c.st.delivered;
        out.acked += c.st.acked;
        out.errors += c.st.errors || 0;
        if (c.st.first) out.first = out.first ? Math.min(out.first, c.st.first) : c.st.first;
        out.last = Math.max(out.last, c.st.last);
        if (c.st.lat) out.lat.push(c.st.lat.view());
      }
      send(out);
    } else {
      const links = [];
      for (const _ of spec.pubs) links.push(await peer.openPublisher(spec));
      send({ type: 'ready' });
      const g = await goPromise;
      const cpu = cpuMeter();
      const res = await Promise.all(
        spec.pubs.map((p, i) => peer.publisher(spec, links[i], p, g.deadline, spec.measure_confirm)),
      );
      const out = { type: 'done', role: 'publisher', cpu: cpu(), cpu_s: cpuTotal(), published: 0, confirmed: 0, nacked: 0, start: Infinity, end: 0, lat: [], errors: [] };
      for (const r of res) {
        out.published += r.published;
        out.confirmed += r.confirmed;
        out.nacked += r.nacked;
        out.start = Math.min(out.start, r.start);
        out.end = Math.max(out.end, r.end);
        if (r.lat) out.lat.push(r.lat);
        if (r.error) out.errors.push(r.error);
      }
      send(out);
    }
    setTimeout(() => process.exit(0), 100);
  }
}

// ---------------------------------------------------------------- orchestration (parent)

function spawnWorker(script, spec, kids) {
  const child = fork(script, ['--worker'], {
    serialization: 'advanced',
    stdio: ['ignore', 'ignore', 'inherit', 'ipc'],
  });
  const w = { child, spec, ready: null, done: null, progress: { acked: 0, last: 0 }, result: null };
  w.ready = new Promise((res, rej) => {
    w.done = new Promise((dres, drej) => {
      child.on('message', (m) => {
        if (m.type === 'ready') res();
        else if (m.type === 'progress') w.progress = m;
        else if (m.type === 'done') {
          w.result = m;
          dres(m);
        } else if (m.type === 'fail') {
          const e = new Error(m.error);
          rej(e);
          drej(e);
        }
      });
      child.on('exit', (code) => {
        const e = new Error(`worker ${child.pid} exited with ${code} before finishing`);
        rej(e);
        if (!w.result) drej(e);
      });
    });
    w.done.catch(() => {});
  });
  child.send({ type: 'init', spec });
  kids.push(w);
  return w;
}

function withTimeout(p, ms, what) {
  let t;
  return Promise.race([
    p,
    new Promise((_, rej) => {
      t = setTimeout(() => rej(new Error(`timed out after ${Math.round(ms / 1000)} s: ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(t));
}

let currentTopo = null; // for cleanup when the run is interrupted

async function run(peer, cfg, result, kids) {
  const { log } = peer;
  const W = cfg.workload;
  const fan = W === 'W4' ? cfg.subscriptions : 1;
  const topo = await peer.setup(cfg);
  currentTopo = topo;
  try {
    peer.describe(topo, cfg, result);
    const base = {
      url: cfg.url,
      size: cfg.size,
      inflight: cfg.inflight,
      prefetch: cfg.prefetch,
      drain_timeout_s: cfg.drain_timeout_s,
      ...peer.workerSpec(topo, cfg),
      measure_confirm: W !== 'W5',
      measure_e2e: W === 'W3' || W === 'W4',
    };
    // Publishers: each gets a share of `messages` and of the offered `rate`.
    const quotas = split(cfg.messages, cfg.publishers);
    const pubRate = W === 'W3' && cfg.rate > 0 ? cfg.rate / cfg.publishers : 0;
    const pubGroups = Array.from({ length: cfg.pub_procs }, () => []);
    quotas.forEach((q, i) => pubGroups[i % cfg.pub_procs].push({ id: i, quota: q, rate: pubRate }));
    const pubW = pubGroups.map((pubs) =>
      spawnWorker(peer.script, { ...base, role: 'publisher', pubs }, kids),
    );
    // Consumers: W4 gives every subscription `consumers` consumers.
    const targets = peer.consumerTargets(topo);
    const conQueues = [];
    for (let i = 0; i < cfg.total_consumers; i++) conQueues.push(targets[i % targets.length]);
    const conGroups = Array.from({ length: cfg.con_procs }, () => []);
    conQueues.forEach((q, i) => conGroups[i % cfg.con_procs].push(q));
    const conW = conGroups.map((queues) =>
      spawnWorker(peer.script, { ...base, role: 'consumer', queues }, kids),
    );
    result.client_pids = [process.pid, ...kids.map((w) => w.child.pid)];
    await withTimeout(Promise.all(kids.map((w) => w.ready)), 30000, 'workers connecting');
    log(`workers ready: ${pubW.length} publisher proc(s), ${conW.length} consumer proc(s)`);

    const ackedNow = () => conW.reduce((s, w) => s + w.progress.acked, 0);
    const t0 = now();
    let consumeStart = t0;
    if (W === 'W3' || W === 'W4') for (const w of conW) w.child.send({ type: 'go' });
    const deadline = now() + cfg.duration_s * 1000;
    for (const w of pubW) w.child.send({ type: 'go', deadline });
    const pubRes = await withTimeout(
      Promise.all(pubW.map((w) => w.done)),
      (cfg.duration_s + cfg.drain_timeout_s + 15) * 1000,
      'publishers',
    );
    const pubStart = Math.min(...pubRes.map((r) => r.start));
    const pubEnd = Math.max(...pubRes.map((r) => r.end));
    result.published = pubRes.reduce((s, r) => s + r.published, 0);
    result.confirmed = pubRes.reduce((s, r) => s + r.confirmed, 0);
    const nacked = pubRes.reduce((s, r) => s + r.nacked, 0);
    if (nacked) result.notes.push(`${nacked} ${peer.texts.nacked}`);
    const perrs = [...new Set(pubRes.flatMap((r) => r.errors))];
    if (perrs.length) result.notes.push(`${peer.texts.errors}: ${perrs.join('; ')}`);
    result.publish_rate = pubEnd > pubStart ? result.confirmed / ((pubEnd - pubStart) / 1000) : null;
    if (base.measure_confirm) result.confirm_latency_ms = percentiles(pubRes.flatMap((r) => r.lat));
    log(`publish phase: ${result.confirmed} confirmed in ${((pubEnd - pubStart) / 1000).toFixed(2)} s`);

    let conRes = [];
    if (conW.length) {
      if (W === 'W5') {
        consumeStart = now();
        for (const w of conW) w.child.send({ type: 'go' });
      }
      const target = result.confirmed * fan;
      const cdeadline =
        W === 'W5' ? now() + cfg.duration_s * 1000 : now() + cfg.drain_timeout_s * 1000;
      while (ackedNow() < target && now() < cdeadline) await sleep(20);
      if (ackedNow() < target) {
        result.notes.push(
          `consumers stopped at the time limit with ${ackedNow()} of ${target} acked`,
        );
      }
      for (const w of conW) w.child.send({ type: 'stop' });
      conRes = await withTimeout(Promise.all(conW.map((w) => w.done)), 20000, 'consumers');
      result.delivered = conRes.reduce((s, r) => s + r.delivered, 0);
      result.acked = conRes.reduce((s, r) => s + r.acked, 0);
      const last = Math.max(...conRes.map((r) => r.last));
      result.consume_rate = last > consumeStart ? result.acked / ((last - consumeStart) / 1000) : null;
      if (base.measure_e2e) result.e2e_latency_ms = percentiles(conRes.flatMap((r) => r.lat));
      const hot = conRes.filter((r) => r.cpu > 0.85);
      if (hot.length) {
        result.notes.push(
          `load generator CPU-bound: consumer proc(s) at ${hot.map((r) => Math.round(r.cpu * 100) + '%').join(', ')} CPU`,
        );
      }
      result.notes.push(
        `consume phase from ${W === 'W5' ? 'consumer start' : 'first publish'} to last ack: ${((last - consumeStart) / 1000).toFixed(2)} s`,
      );
    }
    result.notes.push(
      `client CPU per proc: publishers ${pubRes.map((r) => Math.round(r.cpu * 100) + '%').join('/')}` +
        (conW.length ? `, consumers ${conW.map((w) => Math.round((w.result?.cpu ?? 0) * 100) + '%').join('/')}` : ''),
    );
    {
      const cores = os.cpus().length;
      const conCpu = conW.reduce((sum, w) => sum + (w.result?.cpu ?? 0), 0);
      const pubCpu = pubRes.reduce((sum, r) => sum + r.cpu, 0);
      const pubSecs = Math.max(0.001, (pubEnd - pubStart) / 1000);
      const consumeSecs = Math.max(0.001, (now() - consumeStart) / 1000);
      // CPU seconds the client spent, as cores busy over the whole run (publish + consume phases).
      const used = (pubCpu * pubSecs + conCpu * consumeSecs) / Math.max(pubSecs, (now() - t0) / 1000);
      if (used > cores * 0.4) {
        result.notes.push(
          `load generator used ~${used.toFixed(1)} of ${cores} cores: the client shares the machine's CPU with the server, which bounds these numbers`,
        );
      }
    }
    const hotp = pubRes.filter((r) => r.cpu > 0.85);
    if (hotp.length) {
      result.notes.push(
        `load generator CPU-bound: publisher proc(s) at ${hotp.map((r) => Math.round(r.cpu * 100) + '%').join(', ')} CPU`,
      );
    }
    result.notes.push(
      `client: Node ${process.version} ${peer.texts.client}, ${cfg.publishers} publisher connection(s) in ${pubW.length} proc(s), ` +
        `${cfg.total_consumers} consumer connection(s) in ${conW.length} proc(s), inflight ${cfg.inflight}/publisher` +
        (pubRate ? `, offered ${cfg.rate} msg/s` : ''),
    );
    if (peer.summarize) peer.summarize(result, { cfg, pubRes, conRes });
    result.duration_s = (now() - t0) / 1000;
  } finally {
    for (const w of kids) if (w.child.exitCode === null) w.child.kill('SIGTERM');
    currentTopo = null;
    await peer.teardown(topo);
  }
}

async function main(peer) {
  const { log } = peer;
  const result = {
    peer: peer.peer,
    workload: null,
    published: 0,
    confirmed: 0,
    delivered: 0,
    acked: 0,
    duration_s: 0,
    publish_rate: null,
    consume_rate: null,
    confirm_latency_ms: null,
    e2e_latency_ms: null,
    client_pids: [process.pid],
    notes: [],
    error: null,
    ...peer.resultExtra,
  };
  const kids = [];
  let cfg;
  const emit = () => {
    const r3 = (x) => (x == null ? null : Math.round(x * 1000) / 1000);
    result.duration_s = r3(result.duration_s);
    result.publish_rate = r3(result.publish_rate);
    result.consume_rate = r3(result.consume_rate);
    process.stdout.write(JSON.stringify({ ...result, notes: result.notes.join('; ') }) + '\n');
  };
  let aborting = false;
  const abort = async (sig) => {
    if (aborting) return;
    aborting = true;
    for (const w of kids) if (w.child.exitCode === null) w.child.kill('SIGKILL');
    result.error = `interrupted by ${sig}`;
    const topo = currentTopo;
    currentTopo = null;
    if (topo) await Promise.race([peer.teardown(topo), sleep(5000)]);
    emit();
    process.exit(1);
  };
  process.on('SIGINT', abort);
  process.on('SIGTERM', abort);
  try {
    cfg = parseConfig(process.argv[2] || '{}', peer.config);
    if (peer.peerName) result.peer = peer.peerName(cfg);
    result.workload = cfg.workload;
    const watchdog = setTimeout(
      () => {
        log('watchdog: run exceeded its time bound');
        abort('watchdog');
      },
      (cfg.duration_s * 2 + cfg.drain_timeout_s * 2 + 90) * 1000,
    );
    watchdog.unref();
    await run(peer, cfg, result, kids);
  } catch (e) {
    result.error = errorText(e);
    log('error:', result.error);
  }
  emit();
  process.exit(result.error ? 1 : 0);
}

// Entry point of a driver script: the parent (`node driver.mjs '<json>'`) or a forked worker
// (`--worker`). `peer` holds what is specific to the broker:
//   script        the driver's own file, forked for the workers
//   log           makeLog(tag)
//   peer          the initial `peer` of the result; peerName(cfg), when given, replaces it
//   resultExtra   fields appended to the result line (default none)
//   config        { url: default server, options(o): the peer's own config fields }
//   setup(cfg) -> topo, teardown(topo)   declare and delete the run's queues / stream
//   describe(topo, cfg, result)          the run's first note(s) (and any extra result fields)
//   workerSpec(topo, cfg)                fields added to every worker's spec
//   consumerTargets(topo)                the queues / durables consumers are spread over
//   openPublisher(spec), publisher(spec, link, p, deadline, measure), startConsumer(spec, q, measure)
//   texts         { nacked, errors, client }: wording of the notes on failed publishes and client
//   summarize(result, {cfg, pubRes, conRes})   optional: extra result fields from the workers'
//                 `done` messages (counts, `errors`, `cpu_s` = each process's CPU seconds)
export function driverMain(peer) {
  return process.argv[2] === '--worker' ? workerMain(peer) : main(peer);
}
