// bench/queue_bullmq.js -- the BullMQ (Node) side of bench/queue.sh: the same
// measurements as bench/queue.lua, with the real `bullmq` package pinned in
// bench/package.json.
//
//   node bench/queue_bullmq.js --url redis://127.0.0.1:PORT/0 [--quick]
//
// consume: N no-op jobs (20,000; --quick 2,000) added with queue.addBulk in
// chunks of 1,000 to a fresh queue, then consumed by ONE worker process (this
// script again with --worker) at concurrency 1, 10 and 100; timed in the
// worker from `new Worker` to the N-th "completed" event. Worker peak RSS is
// that process's VmHWM. round trip: queue.add + job.waitUntilFinished(
// queueEvents), one job at a time (2,000; --quick 200; after 20 warm-up round
// trips), with a concurrency-1 worker in its own process.
// Prints human-readable lines and "RESULT <key> <value>" lines.
'use strict';
const { Queue, Worker, QueueEvents } = require('bullmq');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const opt = { quick: false, worker: false, url: process.env.AM2Z_BENCH_REDIS_URL || 'redis://127.0.0.1:6379/0',
  queue: null, n: null, concurrency: 1, limitMs: 300000, chunk: 1000 };
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  const val = () => {
    if (i + 1 >= process.argv.length) throw new Error(`${a} needs a value`);
    return process.argv[++i];
  };
  if (a === '--quick') opt.quick = true;
  else if (a === '--worker') opt.worker = true;
  else if (a === '--url') opt.url = val();
  else if (a === '--queue') opt.queue = val();
  else if (a === '--n') opt.n = Number(val());
  else if (a === '--concurrency') opt.concurrency = Number(val());
  else if (a === '--limit-ms') opt.limitMs = Number(val());
  else throw new Error(`unknown argument ${a}`);
}

const N = opt.n || (opt.quick ? 2000 : 20000);
const ROUND_TRIPS = opt.quick ? 200 : 2000;
const WARMUP = 20;
const RT_TTL = 1000; // waitUntilFinished ttl (ms) after the first round trip; same as bench/queue.lua
const CONCURRENCIES = [1, 10, 100];
const u = new URL(opt.url);
const connection = { host: u.hostname, port: Number(u.port || 6379), db: Number((u.pathname || '/0').slice(1) || 0) };
const now = () => performance.now();

function statusKiB(field) {
  try {
    const m = fs.readFileSync('/proc/self/status', 'utf8').match(new RegExp(`${field}:\\s+(\\d+)`));
    return m ? Number(m[1]) : 0;
  } catch (e) { return 0; }
}

// ------------------------------------------------------ worker process mode

async function workerMode() {
  let done = 0;
  let failed = 0;
  let tEnd = null;
  let finish;
  const finished = new Promise((resolve) => { finish = resolve; });
  const limit = setTimeout(() => finish(false), opt.limitMs);
  const t0 = now();
  const w = new Worker(opt.queue, async () => undefined, { connection, concurrency: opt.concurrency });
  w.on('completed', () => {
    done++;
    if (done === N) { tEnd = now(); finish(true); }
  });
  w.on('failed', () => { failed++; });
  w.on('error', (e) => { console.error('worker error: ' + (e && e.message)); });
  const ok = await finished;
  clearTimeout(limit);
  const elapsed = (tEnd || now()) - t0;
  await w.close();
  const out = { ok, done, failed, elapsed_ms: elapsed, jobs_per_s: done * 1000 / elapsed,
    hwm_kib: statusKiB('VmHWM'), rss_kib: statusKiB('VmRSS'),
    max_rss_kib: process.resourceUsage().maxRSS };
  process.stdout.write('WORKER ' + JSON.stringify(out) + '\n');
  process.exit(ok ? 0 : 2);
}

// ------------------------------------------------------ orchestrator mode

// Starts a worker process; returns a promise of its result.
function startWorker(queue, n, concurrency) {
  return new Promise((resolve, reject) => {
    const args = [__filename, '--worker', '--url', opt.url, '--queue', queue, '--n', String(n),
      '--concurrency', String(concurrency), '--limit-ms', String(opt.limitMs)];
    const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d) => { out += d; });
    child.stderr.on('data', (d) => { out += d; });
    const kill = setTimeout(() => child.kill('SIGKILL'), opt.limitMs + 15000);
    child.on('close', (code) => {
      clearTimeout(kill);
      const m = out.match(/WORKER (\{.*\})/);
      if (code !== 0 || !m) {
        reject(new Error(`worker process (queue ${queue}, concurrency ${concurrency}) exited ${code}:\n${out}`));
      } else {
        resolve(JSON.parse(m[1]));
      }
    });
  });
}

const fmt = (x, d) => x.toFixed(d);
const pad = (s, n) => String(s).padStart(n);

async function main() {
  const runId = `${Date.now()}-${process.pid}`;
  const results = [];
  const result = (k, v) => results.push([k, v]);
  console.log(`bullmq ${require('bullmq/package.json').version} queue benchmark: N = ${N} no-op jobs, ` +
    `${ROUND_TRIPS} round trips, Redis ${opt.url}${opt.quick ? ' (--quick)' : ''}`);

  let maxHwm = 0;
  for (const c of CONCURRENCIES) {
    const name = `bench-bullmq-${runId}-c${c}`;
    const q = new Queue(name, { connection });
    const t0 = now();
    let added = 0;
    while (added < N) {
      const list = [];
      for (let i = added + 1; i <= Math.min(added + opt.chunk, N); i++) list.push({ name: 'noop', data: { i } });
      const jobs = await q.addBulk(list);
      added += jobs.length;
    }
    const addMs = now() - t0;
    const waiting = await q.getWaitingCount();
    if (waiting !== N) throw new Error(`expected ${N} waiting jobs, found ${waiting}`);
    const r = await startWorker(name, N, c);
    const counts = await q.getJobCounts('completed', 'waiting', 'active', 'failed');
    await q.close();
    if (counts.completed !== N) throw new Error(`concurrency ${c}: ${JSON.stringify(counts)} (expected ${N} completed)`);
    maxHwm = Math.max(maxHwm, r.hwm_kib);
    console.log(`bullmq    concurrency ${pad(c, 3)}: ${pad(fmt(r.jobs_per_s, 0), 8)} jobs/s  (${N} jobs in ` +
      `${fmt(r.elapsed_ms / 1000, 2)} s; added at ${fmt(N * 1000 / addMs, 0)} jobs/s; ` +
      `worker peak RSS ${fmt(r.hwm_kib / 1024, 1)} MiB)`);
    result(`jobs_s_c${c}`, fmt(r.jobs_per_s, 1));
    result(`add_s_c${c}`, fmt(N * 1000 / addMs, 1));
    result(`rss_mib_c${c}`, fmt(r.hwm_kib / 1024, 1));
  }
  result('rss_mib', fmt(maxHwm / 1024, 1));

  {
    const name = `bench-bullmq-${runId}-rt`;
    const q = new Queue(name, { connection });
    const ev = new QueueEvents(name, { connection });
    await ev.waitUntilReady();
    await q.waitUntilReady();
    const workerDone = startWorker(name, WARMUP + ROUND_TRIPS, 1);
    workerDone.catch(() => {});
    const lat = [];
    let slow = 0;
    for (let i = 1; i <= WARMUP + ROUND_TRIPS; i++) {
      const t0 = now();
      const job = await q.add('noop', { i });
      const t1 = now();
      // the first wait also covers the worker process starting
      await job.waitUntilFinished(ev, i === 1 ? 30000 : RT_TTL);
      const t2 = now();
      if (i > WARMUP) {
        lat.push(t2 - t0);
        if (t2 - t1 >= RT_TTL * 0.9) slow++;
      }
    }
    await workerDone;
    await ev.close();
    await q.close();
    lat.sort((a, b) => a - b);
    const pct = (p) => lat[Math.max(0, Math.ceil(lat.length * p) - 1)];
    const mean = lat.reduce((a, b) => a + b, 0) / lat.length;
    console.log(`bullmq    round trip (add + waitUntilFinished, ${lat.length} sequential): p50 ${fmt(pct(0.5), 3)} ms  ` +
      `p99 ${fmt(pct(0.99), 3)} ms  mean ${fmt(mean, 3)} ms  max ${fmt(lat[lat.length - 1], 3)} ms  ` +
      `(${slow} took ${RT_TTL} ms or more)`);
    result('rt_p50_ms', fmt(pct(0.5), 3));
    result('rt_p99_ms', fmt(pct(0.99), 3));
    result('rt_mean_ms', fmt(mean, 3));
    result('rt_max_ms', fmt(lat[lat.length - 1], 3));
    result('rt_slow', String(slow));
  }
  console.log(`bullmq    worker peak RSS (VmHWM, max over the consume phases): ${fmt(maxHwm / 1024, 1)} MiB`);
  for (const [k, v] of results) console.log(`RESULT ${k} ${v}`);
}

if (opt.worker) {
  if (!opt.queue) throw new Error('--worker needs --queue');
  workerMode().catch((e) => { console.error(e); process.exit(1); });
} else {
  main().then(() => process.exit(0), (e) => { console.error(e); process.exit(1); });
}
