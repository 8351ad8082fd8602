// Runs a BullMQ Worker until it has finished <count> jobs (completed or
// failed for good), then prints what it saw as JSON.
// usage: node worker.js <redis-url> <queue> <count>
const { Worker } = require('bullmq');
const [url, name, count] = process.argv.slice(2);
const u = new URL(url);
const seen = [];
const w = new Worker(name, async (job) => {
  if (job.name === 'fail') throw new Error('node says no');
  return { doubled: job.data.x * 2, by: 'node' };
}, { connection: { host: u.hostname, port: Number(u.port) } });
const done = () => {
  if (seen.length >= Number(count)) {
    w.close().then(() => { console.log(JSON.stringify(seen)); process.exit(0); });
  }
};
w.on('completed', (job, rv) => { seen.push({ id: job.id, name: job.name, returnvalue: rv }); done(); });
w.on('failed', (job, err) => {
  if (job.attemptsMade >= (job.opts.attempts || 1)) { seen.push({ id: job.id, failedReason: err.message }); done(); }
});
setTimeout(() => { console.error('timeout; saw ' + JSON.stringify(seen)); process.exit(2); }, 15000);
