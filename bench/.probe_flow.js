'use strict';
const { Queue, Worker, QueueEvents, FlowProducer } = require('bullmq');
const connection = { host: '127.0.0.1', port: 26399 };
const mode = process.argv[2] || 'single';
const now = () => performance.now();
async function main() {
  const base = 'p' + Date.now();
  const [n1, n2, n3] = [base + '-s1', base + '-s2', base + '-s3'];
  const child = async (job) => Object.values(await job.getChildrenValues())[0];
  const procs = [async (job) => ({ n: job.data.n, a: job.data.n + 1 }),
    async (job) => { const s = await child(job); return { ...s, b: s.a + 1 }; },
    async (job) => { const s = await child(job); return { ...s, c: s.b + 1 }; }];
  const ws = [n1, n2, n3].map((n, i) => new Worker(n, procs[i], { connection, concurrency: 50 }));
  await Promise.all(ws.map((w) => w.waitUntilReady()));
  const flow = new FlowProducer({ connection });
  const mk = (id, n) => ({ name: 'step3', queueName: n3, data: {}, opts: { jobId: id, removeOnComplete: 1000 },
      children: [{ name: 'step2', queueName: n2, data: {}, opts: { removeOnComplete: true },
        children: [{ name: 'step1', queueName: n1, data: { n }, opts: { removeOnComplete: true } }] }] });
  for (let round = 0; round < 4; round++) {
    let done = 0; let fin; const all = new Promise((r) => { fin = r; });
    const N = 2000;
    const h = () => { if (++done === N) fin(); };
    ws[2].on('completed', h);
    const t0 = now();
    if (mode === 'bulk') { await flow.addBulk(Array.from({ length: N }, (_, i) => mk(`r${round}-${i}`, i))); }
    else { await Promise.all(Array.from({ length: N }, (_, i) => flow.add(mk(`r${round}-${i}`, i)))); }
    const t1 = now();
    await all;
    const t2 = now();
    ws[2].off('completed', h);
    console.log(mode, 'round', round, 'add ms', (t1 - t0).toFixed(0), 'total ms', (t2 - t0).toFixed(0), 'chains/s', (N * 1000 / (t2 - t0)).toFixed(0), 'rss MiB', (process.memoryUsage().rss/1048576).toFixed(0));
  }
  process.exit(0);
}
main();
