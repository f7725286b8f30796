// What every Node peer's job does (the counterpart of ../record.py): after sleeping
// $PEER_SLEEP seconds (0: a no-op job) it appends one JSON line (account, seq, started_ns,
// finished_ns, pid) to $PEER_RECORDS with O_APPEND, so lines of many processes never
// interleave. The harness counts order violations from them with evq's own report code.
const fs = require("fs");

const SLEEP_MS = 1000 * Number(process.env.PEER_SLEEP || "0");
const REDIS_URL = new URL(process.env.REDIS_URL || "redis://127.0.0.1:6379/0");
const records = fs.openSync(process.env.PEER_RECORDS || "records.jsonl", "a");
const epochNs = BigInt(Date.now()) * 1000000n - process.hrtime.bigint();
const nowNs = () => epochNs + process.hrtime.bigint();

async function job(account, seq) {
  const started = nowNs();
  if (SLEEP_MS) await new Promise((done) => setTimeout(done, SLEEP_MS));
  const line = `{"account":${account},"seq":${seq},"started_ns":${started},`
    + `"finished_ns":${nowNs()},"pid":${process.pid}}\n`;
  fs.writeSync(records, line);
}

// (account, seq) in push order, from the workload file: a JSON list of account ids.
function jobs(path) {
  const seqs = new Map();
  return JSON.parse(fs.readFileSync(path, "utf8")).map((account) => {
    const seq = (seqs.get(account) || 0) + 1;
    seqs.set(account, seq);
    return [account, seq];
  });
}

// Run `worker` until SIGTERM, then close it (it finishes its jobs in flight).
function untilTerm(worker) {
  process.on("SIGTERM", async () => {
    await worker.close();
    process.exit(0);
  });
}

module.exports = { REDIS_URL, job, jobs, untilTerm };
