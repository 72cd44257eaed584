#!/usr/bin/env node
// RabbitMQ peer driver for the securebroker benchmark (see README.md beside this file).
//
//   node bench/peers/rabbitmq.mjs '{"workload":"W2","url":"amqp://guest:guest@127.0.0.1:5672",
//        "size":1024,"messages":100000,"duration_s":30,"publishers":4,"consumers":0,"inflight":64,
//        "rate":0,"subscriptions":5,"options":{"queue_type":"classic"}}'
//
// Prints ONE JSON line on stdout at the end; progress and logs go to stderr.
// Durable queue (classic or quorum), persistent messages (deliveryMode 2), publisher confirms on a
// ConfirmChannel, manual acks with prefetch. Each run declares fresh queues under a unique prefix
// and deletes them at the end, on error too.
//
// Load generation: the parent process forks worker processes (child_process.fork). Publishers are
// spread round robin over `pub_procs` processes and consumers over `con_procs` processes; each
// publisher and each consumer has its own AMQP connection and channel. Config parsing, the publish
// loop, the worker processes and the orchestration of a run are shared with nats.mjs in common.mjs.

import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import amqp from 'amqplib';
import { consumerStats, countDelivery, driverMain, makeLog, pacedPublish } from './common.mjs';

const START_HINT =
  'RabbitMQ must listen on amqp://127.0.0.1:5672: start it with `rabbitmq-server -detached` ' +
  '(then wait for `rabbitmqctl await_startup`)';

const log = makeLog('rabbitmq');

// ---------------------------------------------------------------- broker topology

async function setup(cfg) {
  try {
    return await declare(cfg);
  } catch (e) {
    throw new Error(`cannot reach RabbitMQ at ${cfg.url} (${e.code || e.message}); ${START_HINT}`);
  }
}

async function declare(cfg) {
  const prefix = `sbbench-${Date.now().toString(36)}-${randomBytes(3).toString('hex')}`;
  const conn = await amqp.connect(cfg.url);
  conn.on('error', (e) => log('admin connection error:', e.message));
  const ch = await conn.createChannel();
  ch.on('error', (e) => log('admin channel error:', e.message));
  const nq = cfg.workload === 'W4' ? cfg.subscriptions : 1;
  const queues = [];
  for (let i = 0; i < nq; i++) {
    const name = `${prefix}-q${i}`;
    await ch.assertQueue(name, {
      durable: true,
      autoDelete: false,
      arguments: { 'x-queue-type': cfg.queue_type },
    });
    queues.push(name);
  }
  let exchange = '';
  if (cfg.workload === 'W4') {
    exchange = `${prefix}-fanout`;
    await ch.assertExchange(exchange, 'fanout', { durable: true, autoDelete: false });
    for (const q of queues) await ch.bindQueue(q, exchange, '');
  }
  return { conn, ch, prefix, queues, exchange };
}

async function teardown(topo) {
  if (!topo || topo.tornDown) return;
  topo.tornDown = true;
  try {
    let ch = topo.ch;
    try {
      await ch.checkQueue(topo.queues[0]);
    } catch {
      ch = await topo.conn.createChannel(); // channel was closed by an error; open a fresh one
    }
    for (const q of topo.queues) await ch.deleteQueue(q).catch((e) => log('delete', q, e.message));
    if (topo.exchange) await ch.deleteExchange(topo.exchange).catch(() => {});
    log('deleted', topo.queues.length, 'queue(s)', topo.exchange ? 'and the exchange' : '');
  } catch (e) {
    log('teardown failed:', e.message);
  } finally {
    await topo.conn.close().catch(() => {});
  }
}

// ---------------------------------------------------------------- worker roles

async function openPublisher(spec) {
  // One connection + ConfirmChannel; keeps up to `inflight` unconfirmed publishes outstanding.
  const conn = await amqp.connect(spec.url);
  conn.on('error', (e) => log('publisher connection error:', e.message));
  const ch = await conn.createConfirmChannel();
  let chErr = null;
  ch.on('error', (e) => {
    chErr = e;
  });
  return { conn, ch, chErr: () => chErr };
}

async function publisher(spec, link, p, deadline, measure) {
  const { conn, ch } = link;
  const st = await pacedPublish(spec, p, deadline, measure, {
    publish: (buf, done) =>
      ch.publish(spec.exchange, spec.routingKey, buf, { persistent: true }, (err) => done(err)),
    closed: link.chErr,
    what: 'confirms',
    log,
  });
  st.error = link.chErr() ? link.chErr().message : null;
  await conn.close().catch(() => {});
  return st;
}

async function startConsumer(spec, queue, measure) {
  const conn = await amqp.connect(spec.url);
  conn.on('error', (e) => log('consumer connection error:', e.message));
  const ch = await conn.createChannel();
  ch.on('error', (e) => log('consumer channel error:', e.message));
  await ch.prefetch(spec.prefetch);
  const st = consumerStats(measure);
  let tag = null;
  return {
    st,
    async go() {
      const r = await ch.consume(
        queue,
        (msg) => {
          if (!msg) return;
          countDelivery(
            st,
            () => msg.content.readDoubleLE(0),
            () => ch.ack(msg),
          );
        },
        { noAck: false },
      );
      tag = r.consumerTag;
    },
    async stop() {
      if (tag) await ch.cancel(tag).catch(() => {});
      await conn.close().catch(() => {});
    },
  };
}

// ---------------------------------------------------------------- the run

function describe(topo, cfg, result) {
  const W = cfg.workload;
  result.notes.push(
    `queue ${cfg.queue_type}${W === 'W4' ? ` x${cfg.subscriptions} bound to a durable fanout exchange` : ''}, durable, ` +
      'persistent messages (deliveryMode 2), publisher confirms (RabbitMQ confirms persistent ' +
      'messages on durable queues after fsync)' +
      (cfg.total_consumers ? `, manual acks one by one, prefetch ${cfg.prefetch}` : ''),
  );
}

driverMain({
  script: fileURLToPath(import.meta.url),
  log,
  peer: 'rabbitmq-classic',
  peerName: (cfg) => `rabbitmq-${cfg.queue_type}`,
  config: {
    url: 'amqp://guest:guest@127.0.0.1:5672',
    options: (o) => ({ queue_type: o.queue_type === 'quorum' ? 'quorum' : 'classic' }),
  },
  setup,
  teardown,
  describe,
  workerSpec: (topo, cfg) => ({
    exchange: topo.exchange,
    routingKey: cfg.workload === 'W4' ? '' : topo.queues[0],
  }),
  consumerTargets: (topo) => topo.queues,
  openPublisher,
  publisher,
  startConsumer,
  texts: {
    nacked: 'publishes nacked by the broker',
    errors: 'publisher channel errors',
    client: 'amqplib',
  },
});
