// Reads jobs back through BullMQ's own Queue: state, returnvalue,
// attemptsMade, failedReason, and the queue's counts.
// usage: node inspect.js <redis-url> <queue> <id>...
const { Queue } = require('bullmq');
const [url, name, ...ids] = process.argv.slice(2);
(async () => {
  const u = new URL(url);
  const q = new Queue(name, { connection: { host: u.hostname, port: Number(u.port) } });
  const out = { counts: await q.getJobCounts(), jobs: {} };
  for (const id of ids) {
    const j = await q.getJob(id);
    out.jobs[id] = j && { name: j.name, data: j.data, state: await j.getState(), returnvalue: j.returnvalue,
      attemptsMade: j.attemptsMade, failedReason: j.failedReason, progress: j.progress,
      logs: (await q.getJobLogs(id)).logs };
  }
  await q.close();
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
