// GroupMQ (per-group FIFO on Redis): `node peer_groupmq.cjs enqueue W.json`, then workers:
// `node peer_groupmq.cjs work CONCURRENCY`. A job's group is its account.
const Redis = require("ioredis");
const { Queue, Worker } = require("groupmq");
const { REDIS_URL, job, jobs, untilTerm } = require("./record.cjs");

const redis = new Redis(REDIS_URL.href, { maxRetriesPerRequest: null });
const queue = new Queue({ redis, namespace: "bench", jobTimeoutMs: 30_000 });

async function enqueue(path) {
  const planned = jobs(path);
  const first = Date.now() - planned.length; // in the past: due now, in push order
  for (const [i, [account, seq]] of planned.entries()) {
    await queue.add({ groupId: String(account), data: { account, seq }, orderMs: first + i });
  }
  await redis.quit();
}

function work(concurrency) {
  const worker = new Worker({
    queue,
    concurrency,
    handler: async (reserved) => job(reserved.data.account, reserved.data.seq),
  });
  untilTerm(worker);
  worker.run();
}

const [mode, arg] = process.argv.slice(2);
if (mode === "enqueue") enqueue(arg);
else work(Number(arg));
