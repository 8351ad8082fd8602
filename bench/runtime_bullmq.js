// bench/runtime_bullmq.js -- the BullMQ (Node) side of bench/runtime.sh: the
// same 3-step chain as bench/runtime.lua, on plain BullMQ (the `bullmq`
// package pinned in bench/package.json).
//
//   node bench/runtime_bullmq.js --url redis://127.0.0.1:PORT/0 [--quick] [--no-multi]
//
// The chain, two ways (each step a no-op adding one field: a = n + 1,
// b = a + 1, c = b + 1; every result is checked, c == n + 3), three queues
// s1, s2, s3 with one Worker each at concurrency 50, all in ONE Node process:
//   * flow: a FlowProducer flow per chain: step3 (queue s3) has child step2
//     (s2) which has child step1 (s1); children run before their parent, so
//     the steps run s1, s2, s3 and the top job completes when the chain is
//     done. Each step reads its child's value with job.getChildrenValues().
//     3 jobs per chain.
//   * steps: step-by-step: the s1 worker adds the s2 job, the s2 worker adds
//     the s3 job (queue.add from inside the processor). 3 jobs per chain.
// The producer waits for the top (flow) / last (steps) job through a
// QueueEvents on s3 ('completed'/'failed' events, one listener dispatching by
// job id; the ids are set by the producer so the waiter exists before the add).
// Measures, per way: sequential latency (2,000; --quick 200; after 50 warm-up
// chains; add + wait, one chain at a time) p50 / p99 / mean / max ms, and
// throughput with 2,000 chains in flight (all added at once without awaiting
// each, then all awaited), in rounds (5; --quick 1; after one warm-up batch of
// 500); over those rounds also redis-server main-thread CPU and commands per
// chain (INFO before and after) and this process's CPU per chain. Unless --no-multi, the flow throughput again with the workers in 2
// other Node processes (this script with --worker, concurrency 50 each), 3
// rounds (--quick 1). Removal as am2z's QueueRuntime: top-level jobs keep the
// last 1,000 completed, intermediate jobs are removed when done.
// Prints human-readable lines and "RESULT <key> <value>" lines.
'use strict';
const { Queue, Worker, QueueEvents, FlowProducer } = require('bullmq');
const { spawn } = require('node:child_process');
const fs = require('node:fs');

const opt = { quick: false, worker: false, multi: true,
  url: process.env.AM2Z_BENCH_REDIS_URL || 'redis://127.0.0.1:6379/0',
  base: null, mode: 'flow', concurrency: 50, phaseLimitMs: null, seq: null, batch: 2000, rounds: null, multiRounds: null };
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  const val = () => {
    if (i + 1 >= process.argv.length) throw new Error(`${a} needs a value`);
    return process.argv[++i];
  };
  if (a === '--quick') opt.quick = true;
  else if (a === '--worker') opt.worker = true;
  else if (a === '--no-multi') opt.multi = false;
  else if (a === '--url') opt.url = val();
  else if (a === '--base') opt.base = val();
  else if (a === '--mode') opt.mode = val();
  else if (a === '--concurrency') opt.concurrency = Number(val());
  else if (a === '--seq') opt.seq = Number(val());
  else if (a === '--phase-limit-ms') opt.phaseLimitMs = Number(val());
  else if (a === '--batch') opt.batch = Number(val());
  else if (a === '--rounds') opt.rounds = Number(val());
  else if (a === '--multi-rounds') opt.multiRounds = Number(val());
  else throw new Error(`unknown argument ${a}`);
}

const N_SEQ = opt.seq || (opt.quick ? 200 : 2000);
const WARMUP_SEQ = 50;
const WARMUP_BATCH = 500;
const BATCH = opt.batch;
const ROUNDS = opt.rounds || (opt.quick ? 1 : 5);
const MULTI_ROUNDS = opt.multiRounds || (opt.quick ? 1 : 3);
const WORKER_PROCS = 2;
const u = new URL(opt.url);
const connection = { host: u.hostname, port: Number(u.port || 6379), db: Number((u.pathname || '/0').slice(1) || 0) };
const now = () => performance.now();
const fmt = (x, d) => x.toFixed(d);

function statusKiB(field) {
  try {
    const m = fs.readFileSync('/proc/self/status', 'utf8').match(new RegExp(`${field}:\\s+(\\d+)`));
    return m ? Number(m[1]) : 0;
  } catch (e) { return 0; }
}

const qnames = (base) => [`${base}-s1`, `${base}-s2`, `${base}-s3`];
const parse = (v) => (typeof v === 'string' ? JSON.parse(v) : v);

// The three workers of one way; returns { close, failed() }.
function startWorkers(base, mode) {
  const [n1, n2, n3] = qnames(base);
  const wopts = { connection, concurrency: opt.concurrency };
  let procs;
  const extra = [];
  if (mode === 'flow') {
    const child = async (job) => Object.values(await job.getChildrenValues())[0];
    procs = [
      async (job) => ({ n: job.data.n, a: job.data.n + 1 }),
      async (job) => { const s = await child(job); return { ...s, b: s.a + 1 }; },
      async (job) => { const s = await child(job); return { ...s, c: s.b + 1 }; },
    ];
  } else if (mode === 'steps') {
    const q2 = new Queue(n2, { connection });
    const q3 = new Queue(n3, { connection });
    extra.push(q2, q3);
    procs = [
      async (job) => {
        const s = { ...job.data.s, a: job.data.s.n + 1 };
        await q2.add('step2', { id: job.data.id, s }, { jobId: `${job.data.id}-2`, removeOnComplete: true });
        return null;
      },
      async (job) => {
        const s = { ...job.data.s, b: job.data.s.a + 1 };
        await q3.add('step3', { id: job.data.id, s }, { jobId: job.data.id, removeOnComplete: 1000 });
        return null;
      },
      async (job) => ({ ...job.data.s, c: job.data.s.b + 1 }),
    ];
  } else {
    throw new Error(`unknown mode ${mode}`);
  }
  let failed = 0;
  let firstError = null;
  const workers = [n1, n2, n3].map((n, i) => {
    const w = new Worker(n, procs[i], wopts);
    w.on('failed', (job, e) => { failed++; firstError = firstError || (e && e.message); });
    w.on('error', (e) => { console.error(`worker ${n} error: ${e && e.message}`); });
    return w;
  });
  return {
    workers,
    ready: () => Promise.all(workers.map((w) => w.waitUntilReady())),
    failed: () => failed,
    firstError: () => firstError,
    close: async () => {
      await Promise.all(workers.map((w) => w.close()));
      await Promise.all(extra.map((q) => q.close()));
    },
  };
}

// ------------------------------------------------------ worker process mode

async function workerMode() {
  const ws = startWorkers(opt.base, opt.mode);
  await ws.ready();
  let completed = 0;
  for (const w of ws.workers) w.on('completed', () => { completed++; });
  process.stdout.write('READY\n');
  const limit = setTimeout(() => process.exit(2), 300000);
  // the orchestrator holds our stdin: its end means the orchestrator is gone
  process.stdin.on('end', () => process.exit(2));
  process.stdin.on('error', () => process.exit(2));
  process.stdin.resume();
  process.on('SIGTERM', async () => {
    clearTimeout(limit);
    await ws.close();
    process.stdout.write(`WORKER completedJobs ${completed} failedJobs ${ws.failed()} ` +
      `hwm_kib ${statusKiB('VmHWM')}\n`);
    process.exit(0);
  });
}

// ------------------------------------------------------ orchestrator mode

// The producer side of one way: add(id, n) starts a chain, wait(id) is its
// completion (rejects on failure).
async function producer(base, mode) {
  const [n1, n2, n3] = qnames(base);
  const ev = new QueueEvents(n3, { connection, lastEventId: '0' }); // fresh stream: miss nothing
  const pending = new Map();
  const early = new Map();
  const settle = (jobId, ok, v) => {
    const p = pending.get(jobId);
    if (p) { pending.delete(jobId); if (ok) p.resolve(v); else p.reject(new Error(v)); } else early.set(jobId, [ok, v]);
  };
  ev.on('completed', ({ jobId, returnvalue }) => settle(jobId, true, returnvalue));
  ev.on('failed', ({ jobId, failedReason }) => settle(jobId, false, failedReason));
  await ev.waitUntilReady();
  let add;
  const closers = [() => ev.close()];
  if (mode === 'flow') {
    const flow = new FlowProducer({ connection });
    closers.push(() => flow.close());
    add = (id, n) => flow.add({
      name: 'step3', queueName: n3, data: {}, opts: { jobId: id, removeOnComplete: 1000 },
      children: [{
        name: 'step2', queueName: n2, data: {}, opts: { removeOnComplete: true },
        children: [{ name: 'step1', queueName: n1, data: { n }, opts: { removeOnComplete: true } }],
      }],
    });
  } else {
    const q1 = new Queue(n1, { connection });
    closers.push(() => q1.close());
    add = (id, n) => q1.add('step1', { id, s: { n } }, { jobId: `${id}-1`, removeOnComplete: true });
  }
  const wait = (id) => new Promise((resolve, reject) => {
    const e = early.get(id);
    if (e) { early.delete(id); if (e[0]) resolve(e[1]); else reject(new Error(e[1])); } else pending.set(id, { resolve, reject });
  });
  const counts = async () => {
    const out = [];
    for (const n of [n1, n2, n3]) {
      const q = new Queue(n, { connection });
      const c = await q.getJobCounts('waiting', 'waiting-children', 'active', 'completed', 'failed');
      await q.close();
      out.push(`${n.slice(-2)}${JSON.stringify(c)}`);
    }
    return out.join(' ');
  };
  return { add, wait, counts, close: async () => { for (const c of closers) await c(); } };
}

class Timeout extends Error {}

// Resolves to p, or after ms rejects with Timeout: progress() and the queue
// counts (given 3 s: Redis itself may be what hangs).
function deadline(p, ms, progress, pr) {
  let t;
  return Promise.race([p, new Promise((_, reject) => {
    t = setTimeout(async () => {
      const d = `did not finish in ${fmt(ms / 1000, 1)} s; ${progress()}`;
      let c;
      let t3;
      const limit = new Promise((resolve) => { t3 = setTimeout(() => resolve('no answer in 3 s'), 3000); });
      try { c = await Promise.race([pr.counts(), limit]); } catch (e) { c = `(${e.message})`; }
      clearTimeout(t3);
      reject(new Timeout(`${d}; queue counts: ${c}`));
    }, ms);
  })]).finally(() => clearTimeout(t));
}

// Waits for p at most ms (closing connections to a Redis that hangs would not end).
function bounded(p, ms) {
  let t;
  return Promise.race([p.catch(() => {}), new Promise((resolve) => { t = setTimeout(resolve, ms); })])
    .finally(() => clearTimeout(t));
}

// A phase's deadline: at least 60 s; --phase-limit-ms sets it.
function phaseLimit(ms) { return opt.phaseLimitMs || Math.max(60000, ms); }

function check(v, n, bad) {
  let s;
  try { s = parse(v); } catch (e) { s = null; }
  if (s && s.c === n + 3) return;
  bad.count++;
  bad.first = bad.first || `wrong result: ${JSON.stringify(v)}`;
}

const pct = (sorted, p) => sorted[Math.max(0, Math.ceil(sorted.length * p) - 1)];

async function sequential(pr, label, n, tag, key, result) {
  const lat = [];
  const bad = { count: 0, first: null };
  let done = 0;
  const run = async () => {
    for (let i = 1; i <= n; i++) {
      const id = `${tag}${i}`;
      const t0 = now();
      const w = pr.wait(id);
      await pr.add(id, i);
      let v;
      try { v = await w; } catch (e) { bad.count++; bad.first = bad.first || e.message; }
      lat.push(now() - t0);
      if (v !== undefined) check(v, i, bad);
      done = i;
    }
  };
  await deadline(run(), phaseLimit(n * 50), () => `${label} sequential: ${done} of ${n} chains done`, pr);
  if (!key) return;
  lat.sort((a, b) => a - b);
  const mean = lat.reduce((a, b) => a + b, 0) / lat.length;
  console.log(`bullmq    ${label}: sequential chains (add + wait, ${n} one after another): p50 ${fmt(pct(lat, 0.5), 3)} ms  ` +
    `p99 ${fmt(pct(lat, 0.99), 3)} ms  mean ${fmt(mean, 3)} ms  max ${fmt(lat[lat.length - 1], 3)} ms  ` +
    `(${bad.count} failed or wrong${bad.first ? '; first: ' + bad.first : ''})`);
  result(`${key}_p50_ms`, fmt(pct(lat, 0.5), 3));
  result(`${key}_p99_ms`, fmt(pct(lat, 0.99), 3));
  result(`${key}_mean_ms`, fmt(mean, 3));
  result(`${key}_max_ms`, fmt(lat[lat.length - 1], 3));
  result(`${key}_bad`, String(bad.count));
}

async function batch(pr, label, n, tag) {
  const bad = { count: 0, first: null };
  let done = 0;
  const t0 = now();
  const run = async () => {
    const waits = [];
    const adds = [];
    for (let i = 1; i <= n; i++) {
      const id = `${tag}-${i}`;
      waits.push(pr.wait(id).then((v) => { check(v, i, bad); done++; },
        (e) => { bad.count++; bad.first = bad.first || e.message; done++; }));
      adds.push(pr.add(id, i));
    }
    await Promise.all(adds);
    await Promise.all(waits);
  };
  await deadline(run(), phaseLimit(n * 30), () => `${label} batch of ${n}: ${done} of ${n} chains done`, pr);
  return { ms: now() - t0, bad };
}

// Redis's own counters (main-thread CPU seconds, commands processed), from
// INFO on a connection of this script's; null when unavailable.
let infoConn = null;
async function redisCounters() {
  try {
    if (!infoConn) {
      const IORedis = require('ioredis');
      infoConn = new IORedis({ ...connection, lazyConnect: false, maxRetriesPerRequest: 1 });
    }
    const s = await infoConn.info('all');
    const num = (k) => { const m = s.match(new RegExp(`${k}:([\\d.]+)`)); return m ? Number(m[1]) : null; };
    const u = num('used_cpu_user_main_thread') ?? num('used_cpu_user');
    const sy = num('used_cpu_sys_main_thread') ?? num('used_cpu_sys');
    return { cpu: (u || 0) + (sy || 0), cmds: num('total_commands_processed') || 0 };
  } catch (e) { return null; }
}

async function throughput(pr, label, rounds, tag, key, result, ownCpu) {
  const r0 = await redisCounters();
  const c0 = process.cpuUsage();
  let totalMs = 0;
  let totalBad = 0;
  let first = null;
  const per = [];
  for (let k = 1; k <= rounds; k++) {
    const { ms, bad } = await batch(pr, label, BATCH, `${tag}${k}`);
    totalMs += ms;
    totalBad += bad.count;
    first = first || bad.first;
    per.push(BATCH * 1000 / ms);
  }
  const c1 = process.cpuUsage(c0);
  const r1 = await redisCounters();
  const rate = rounds * BATCH * 1000 / totalMs;
  const n = rounds * BATCH;
  let cost = null;
  if (r0 && r1) {
    const cpu = ownCpu ? `; this process ${fmt((c1.user + c1.system) / n, 0)} us CPU per chain` : '';
    cost = (`bullmq    ${label}: per chain, over these rounds: redis-server ${fmt((r1.cpu - r0.cpu) * 1e6 / n, 0)} us ` +
      `CPU (main thread), ${fmt((r1.cmds - r0.cmds) / n, 1)} commands${cpu}`);
    result(`${key}_redis_us`, fmt((r1.cpu - r0.cpu) * 1e6 / n, 1));
    result(`${key}_redis_cmds`, fmt((r1.cmds - r0.cmds) / n, 1));
    if (ownCpu) result(`${key}_proc_us`, fmt((c1.user + c1.system) / n, 1));
  }
  const sorted = [...per].sort((a, b) => a - b);
  console.log(`bullmq    ${label}: throughput, ${BATCH} chains in flight x ${rounds} rounds: ${fmt(rate, 0)} chains/s ` +
    `(${fmt(rate * 3, 0)} jobs/s at 3 jobs per chain; rounds ${per.map((x) => fmt(x, 0)).join(', ')} chains/s; ` +
    `${totalBad} failed or wrong${first ? '; first: ' + first : ''})`);
  if (cost) console.log(cost);
  result(`${key}_chains_s`, fmt(rate, 1));
  result(`${key}_best_chains_s`, fmt(sorted[sorted.length - 1], 1));
  result(`${key}_worst_chains_s`, fmt(sorted[0], 1));
  result(`${key}_bad`, String(totalBad));
}

async function oneProcess(runId, mode, label, keyp, result) {
  const base = `bb${runId}${mode}`;
  const ws = startWorkers(base, mode);
  await ws.ready();
  const pr = await producer(base, mode);
  try {
    await sequential(pr, label, WARMUP_SEQ, 'w', null, result);
    await sequential(pr, label, N_SEQ, 's', `${keyp}seq`, result);
    await batch(pr, `${label} warm-up`, WARMUP_BATCH, 'wb');
    await throughput(pr, label, ROUNDS, 'r', `${keyp}tp`, result, true);
    if (ws.failed()) console.log(`bullmq    ${label}: ${ws.failed()} failed jobs; first: ${ws.firstError()}`);
  } finally {
    await bounded(pr.close().then(() => ws.close()), 5000);
  }
}

async function multiProcess(runId, mode, label, keyp, result) {
  const base = `bb${runId}${mode}m`;
  const children = [];
  const outs = [];
  const exits = [];
  for (let w = 0; w < WORKER_PROCS; w++) {
    const child = spawn(process.execPath, [__filename, '--worker', '--url', opt.url, '--base', base,
      '--mode', mode, '--concurrency', String(opt.concurrency)], { stdio: ['pipe', 'pipe', 'pipe'] });
    outs[w] = '';
    child.stdout.on('data', (d) => { outs[w] += d; });
    child.stderr.on('data', (d) => { outs[w] += d; });
    exits[w] = new Promise((resolve) => child.on('close', (code) => resolve(code)));
    children.push(child);
  }
  let pr = null;
  try {
    const t0 = now();
    while (!outs.every((o) => o.includes('READY'))) { // bounded: 30 s
      if (now() - t0 > 30000) throw new Error(`worker processes did not start:\n${outs.join('\n')}`);
      await new Promise((r) => setTimeout(r, 20));
    }
    pr = await producer(base, mode);
    await sequential(pr, `${label} warm-up`, WARMUP_SEQ, 'w', null, result);
    await batch(pr, `${label} warm-up`, WARMUP_BATCH, 'wb');
    await throughput(pr, label, MULTI_ROUNDS, 'r', `${keyp}tp2`, result);
  } finally {
    if (pr) await bounded(pr.close(), 5000);
    for (const c of children) c.kill('SIGTERM');
    const kill = setTimeout(() => children.forEach((c) => c.kill('SIGKILL')), 20000);
    const codes = await Promise.all(exits);
    clearTimeout(kill);
    console.log('bullmq    ' + codes.map((c, w) => `worker ${w + 1}: exit ${c}, ` +
      ((outs[w].match(/WORKER ([^\n]*)/) || [])[1] || outs[w])).join('; '));
  }
}

async function main() {
  const runId = `${Date.now().toString(16)}${process.pid.toString(16)}`;
  const results = [];
  const result = (k, v) => results.push([k, v]);
  console.log(`bullmq ${require('bullmq/package.json').version} 3-step chain benchmark: ${N_SEQ} sequential, ` +
    `${BATCH} in flight x ${ROUNDS} rounds (${opt.multi ? BATCH : 'no run'} x ${MULTI_ROUNDS} rounds with ` +
    `${WORKER_PROCS} worker processes), worker concurrency ${opt.concurrency}, Redis ${opt.url}` +
    `${opt.quick ? ' (--quick)' : ''}`);
  let status = 0;
  const parts = [
    () => oneProcess(runId, 'flow', '1 process, FlowProducer', 'flow_', result),
    () => oneProcess(runId, 'steps', '1 process, step-by-step', 'steps_', result),
  ];
  if (opt.multi) parts.push(() => multiProcess(runId, 'flow', `FlowProducer, producer + ${WORKER_PROCS} worker processes`, 'flow_', result));
  for (const part of parts) {
    try {
      await part();
    } catch (e) {
      status = e instanceof Timeout ? 3 : 1;
      console.log(`bullmq    ${e instanceof Timeout ? 'TIMEOUT: ' + e.message : 'ERROR: ' + (e && e.stack)}`);
      break; // what hung may still run against the same redis-server; later parts would measure that
    }
  }
  if (infoConn) infoConn.disconnect();
  result('rss_mib', fmt(statusKiB('VmHWM') / 1024, 1));
  console.log(`bullmq    process peak RSS (VmHWM, producer + 1-process workers): ${fmt(statusKiB('VmHWM') / 1024, 1)} MiB`);
  for (const [k, v] of results) console.log(`RESULT ${k} ${v}`);
  return status;
}

if (opt.worker) {
  if (!opt.base) throw new Error('--worker needs --base');
  workerMode().catch((e) => { console.error(e); process.exit(1); });
} else {
  main().then((s) => process.exit(s), (e) => { console.error(e); process.exit(1); });
}
