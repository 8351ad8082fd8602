// What Bull Board shows for a queue: its API handler (the one the UI
// fetches) over the BullMQ adapter, plus the workers Bull Board lists.
// usage: node board.js <redis-url> <queue>
const { Queue } = require('bullmq');
const { BullMQAdapter } = require('@bull-board/api/bullMQAdapter');
const { queuesHandler } = require('@bull-board/api/dist/src/handlers/queues');
const [url, name] = process.argv.slice(2);
(async () => {
  const u = new URL(url);
  const queue = new Queue(name, { connection: { host: u.hostname, port: Number(u.port) } });
  const adapter = new BullMQAdapter(queue);
  const res = await queuesHandler({ queues: new Map([[name, adapter]]),
    query: { activeQueue: name, status: 'latest', jobsPerPage: 50 } });
  const q = res.body.queues[0];
  const workers = await queue.getWorkers();
  console.log(JSON.stringify({ counts: q.counts, isPaused: q.isPaused, jobs: q.jobs,
    workers: workers.map((w) => w.rawname) }));
  await queue.close();
})().catch((e) => { console.error(e); process.exit(1); });
