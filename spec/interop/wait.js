// Adds one job with BullMQ and waits for it with QueueEvents +
// waitUntilFinished; prints the return value (or the failure) as JSON.
// usage: node wait.js <redis-url> <queue> <x>
const { Queue, QueueEvents } = require('bullmq');
const [url, name, x] = process.argv.slice(2);
(async () => {
  const u = new URL(url);
  const connection = { host: u.hostname, port: Number(u.port) };
  const ev = new QueueEvents(name, { connection });
  await ev.waitUntilReady();
  const q = new Queue(name, { connection });
  const job = await q.add('double', { x: Number(x) });
  console.error('READY ' + job.id);
  try {
    const rv = await job.waitUntilFinished(ev, 10000);
    console.log(JSON.stringify({ ok: true, returnvalue: rv }));
  } catch (e) {
    console.log(JSON.stringify({ ok: false, error: e.message }));
  }
  await q.close(); await ev.close();
})().catch((e) => { console.error(e); process.exit(1); });
