// BullMQ (no per-group order in its open-source edition): `node peer_bullmq.cjs enqueue
// W.json`, then workers: `node peer_bullmq.cjs work CONCURRENCY`. Finished jobs are removed,
// as evq removes acked events.
const { Queue, Worker } = require("bullmq");
const { REDIS_URL, job, jobs, untilTerm } = require("./record.cjs");

const connection = {
  host: REDIS_URL.hostname,
  port: Number(REDIS_URL.port || 6379),
  maxRetriesPerRequest: null,
};

async function enqueue(path) {
  const queue = new Queue("bench", { connection });
  const planned = jobs(path);
  for (let i = 0; i < planned.length; i += 500) {
    await queue.addBulk(planned.slice(i, i + 500).map(([account, seq]) => ({
      name: "job",
      data: { account, seq },
      opts: { removeOnComplete: true },
    })));
  }
  await queue.close();
}

function work(concurrency) {
  const worker = new Worker("bench", async (j) => job(j.data.account, j.data.seq), {
    connection,
    concurrency,
  });
  untilTerm(worker);
}

const [mode, arg] = process.argv.slice(2);
if (mode === "enqueue") enqueue(arg);
else work(Number(arg));
