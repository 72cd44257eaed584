#!/usr/bin/env node
// NATS JetStream peer driver for the securebroker benchmark (see README.md beside this file).
//
//   node bench/peers/nats.mjs '{"workload":"W2","url":"nats://127.0.0.1:4222","size":1024,
//        "messages":100000,"duration_s":30,"publishers":4,"consumers":0,"inflight":64,"rate":0,
//        "subscriptions":5,"options":{}}'
//
// Prints ONE JSON line on stdout at the end; progress and logs go to stderr.
// One stream with file storage per run (work-queue retention; interest retention for the W4
// fan-out), publishes awaited for their PubAck, durable pull consumers with explicit acks. The
// stream (and with it its consumers) is deleted at the end, on error too. JetStream acknowledges
// a publish once the message is written to its file store, before fsync: the server fsyncs every
// `sync_interval` (default 2 min). The driver reports the setting it can read in "sync".
//
// Load generation: the parent process forks worker processes (child_process.fork). Publishers are
// spread round robin over `pub_procs` processes and consumers over `con_procs` processes; each
// publisher and each consumer has its own NATS connection. Config parsing, the publish loop, the
// worker processes and the orchestration of a run are shared with rabbitmq.mjs in common.mjs.

import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { AckPolicy, DeliverPolicy, RetentionPolicy, StorageType, connect } from 'nats';
import { consumerStats, countDelivery, driverMain, makeLog, pacedPublish } from './common.mjs';

const START_HINT =
  'nats-server with JetStream must listen on nats://127.0.0.1:4222: start it with ' +
  '`start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 ' +
  '-p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log`';

const log = makeLog('nats');

// ---------------------------------------------------------------- server topology

async function connectOrExplain(url, name) {
  try {
    return await connect({ servers: url, name, maxReconnectAttempts: 0, timeout: 5000 });
  } catch (e) {
    throw new Error(`cannot reach NATS at ${url} (${e.code || e.message}); ${START_HINT}`);
  }
}

async function readSyncSetting(cfg, info) {
  // JetStream acks a publish before fsync; the sync interval is a server setting we can only read
  // through the monitoring endpoint (varz), when nats-server runs with -m / http_port.
  const version = info?.version || 'unknown';
  const dflt = 'default (fsync every 2 min)';
  try {
    const ctl = new AbortController();
    const t = setTimeout(() => ctl.abort(), 1500);
    const r = await fetch(`${cfg.monitor_url.replace(/\/$/, '')}/varz`, { signal: ctl.signal });
    clearTimeout(t);
    const v = await r.json();
    const jc = v?.jetstream?.config || {};
    if (jc.sync_always) return `always (fsync on every write; nats-server ${v.version})`;
    if (jc.sync_interval) {
      const sec = Number(jc.sync_interval) / 1e9;
      return `fsync every ${sec} s (sync_interval from varz; acks before fsync; nats-server ${v.version})`;
    }
    return `${dflt}; varz has no sync_interval, nats-server ${v.version}`;
  } catch {
    const v29 = /^2\.9\./.test(version);
    return v29
      ? `${dflt}: nats-server ${version} has no sync_interval option (monitoring port not enabled, varz not read)`
      : `unknown: monitoring port not enabled, varz not read; nats-server ${version} defaults to fsync every 2 min`;
  }
}

async function setup(cfg) {
  const nc = await connectOrExplain(cfg.url, 'sbbench-admin');
  try {
    if (!nc.info?.jetstream) {
      throw new Error(`JetStream is not enabled on ${cfg.url}; ${START_HINT}`);
    }
    const jsm = await nc.jetstreamManager();
    const id = `${Date.now().toString(36)}${randomBytes(3).toString('hex')}`;
    const stream = `SBBENCH_${id}`;
    const subject = `sbbench.${id}.q`;
    const fanout = cfg.workload === 'W4';
    await jsm.streams.add({
      name: stream,
      subjects: [subject],
      storage: StorageType.File,
      // work queue: a message is removed once acked; W4: kept until every consumer acked it.
      retention: fanout ? RetentionPolicy.Interest : RetentionPolicy.Workqueue,
      num_replicas: 1,
    });
    const durables = [];
    if (cfg.total_consumers > 0) {
      const n = fanout ? cfg.subscriptions : 1;
      const perDurable = fanout ? cfg.consumers : cfg.total_consumers;
      for (let i = 0; i < n; i++) {
        const name = fanout ? `sub${i}` : 'work';
        await jsm.consumers.add(stream, {
          durable_name: name,
          ack_policy: AckPolicy.Explicit,
          deliver_policy: DeliverPolicy.All,
          max_ack_pending: Math.max(1000, cfg.prefetch * perDurable * 2),
        });
        durables.push(name);
      }
    }
    const sync = await readSyncSetting(cfg, nc.info);
    return { nc, jsm, stream, subject, durables, sync, version: nc.info.version };
  } catch (e) {
    await nc.close().catch(() => {});
    throw e;
  }
}

async function teardown(topo) {
  if (!topo || topo.tornDown) return;
  topo.tornDown = true;
  try {
    await topo.jsm.streams.delete(topo.stream);
    log('deleted stream', topo.stream);
  } catch (e) {
    log('teardown failed:', e.message);
  } finally {
    await topo.nc.close().catch(() => {});
  }
}

// ---------------------------------------------------------------- worker roles

async function openPublisher(spec) {
  // One connection; keeps up to `inflight` publishes outstanding, each awaited for its PubAck.
  const nc = await connect({ servers: spec.url, name: 'sbbench-pub', maxReconnectAttempts: 0 });
  return { nc, js: nc.jetstream() };
}

async function publisher(spec, link, p, deadline, measure) {
  const { nc, js } = link;
  let lastErr = null;
  const st = await pacedPublish(spec, p, deadline, measure, {
    publish: (buf, done) =>
      js.publish(spec.subject, buf).then(
        () => done(null),
        (e) => {
          lastErr = e.message;
          done(e);
        },
      ),
    closed: () => nc.isClosed(),
    what: 'PubAcks',
    log,
  });
  st.error = lastErr;
  await nc.close().catch(() => {});
  return st;
}

async function startConsumer(spec, durable, measure) {
  const nc = await connect({ servers: spec.url, name: 'sbbench-con', maxReconnectAttempts: 0 });
  const js = nc.jetstream();
  const consumer = await js.consumers.get(spec.stream, durable);
  const st = consumerStats(measure);
  let msgs = null;
  return {
    st,
    async go() {
      msgs = await consumer.consume({
        max_messages: spec.prefetch,
        callback: (m) =>
          countDelivery(
            st,
            () => {
              const d = m.data;
              return Buffer.from(d.buffer, d.byteOffset, d.byteLength).readDoubleLE(0);
            },
            () => m.ack(),
          ),
      });
    },
    async stop() {
      try {
        if (msgs) msgs.stop();
        await nc.flush();
      } catch {
        // closing anyway
      }
      await nc.close().catch(() => {});
    },
  };
}

// ---------------------------------------------------------------- the run

function describe(topo, cfg, result) {
  const W = cfg.workload;
  result.sync = topo.sync;
  result.notes.push(
    `nats-server ${topo.version}, stream with file storage, 1 replica, ` +
      `${W === 'W4' ? `interest retention, ${cfg.subscriptions} durable pull consumers` : 'work-queue retention'}` +
      `${cfg.total_consumers && W !== 'W4' ? ', one durable pull consumer' : ''}` +
      `${cfg.total_consumers ? `, explicit acks, pull batch ${cfg.prefetch}` : ''}, publishes awaited for PubAck; ` +
      `sync: ${topo.sync}; JetStream acknowledges before fsync, a weaker durability than the other peers`,
  );
}

driverMain({
  script: fileURLToPath(import.meta.url),
  log,
  peer: 'nats-jetstream',
  resultExtra: { sync: null },
  config: {
    url: 'nats://127.0.0.1:4222',
    options: (o) => ({ monitor_url: o.monitor_url || 'http://127.0.0.1:8222' }),
  },
  setup,
  teardown,
  describe,
  workerSpec: (topo) => ({ stream: topo.stream, subject: topo.subject }),
  consumerTargets: (topo) => topo.durables,
  openPublisher,
  publisher,
  startConsumer,
  texts: { nacked: 'publishes failed (no PubAck)', errors: 'publish errors', client: 'nats.js' },
});
