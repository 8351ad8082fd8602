// Adds jobs of every kind with BullMQ's own Queue, prints their ids as JSON.
// usage: node producer.js <redis-url> <queue>
const { Queue } = require('bullmq');
const [url, name] = process.argv.slice(2);
(async () => {
  const u = new URL(url);
  const q = new Queue(name, { connection: { host: u.hostname, port: Number(u.port) } });
  const ids = {};
  ids.standard = (await q.add('double', { x: 21 })).id;
  ids.delayed = (await q.add('double', { x: 5 }, { delay: 300 })).id;
  ids.prioritized = (await q.add('double', { x: 7 }, { priority: 3 })).id;
  ids.custom = (await q.add('double', { x: 1 }, { jobId: 'custom-job' })).id;
  ids.failing = (await q.add('fail', { x: 0 }, { attempts: 3, backoff: { type: 'exponential', delay: 50 } })).id;
  await q.close();
  console.log(JSON.stringify(ids));
})().catch((e) => { console.error(e); process.exit(1); });
