"""The peers, run on a Bench: RQ, Celery, Dramatiq and arq, each in its own venv under
var/peers; GroupMQ and BullMQ (Node), from npm into var/peers/node.

Each peer's jobs live in bench/peers/peer_<name>.py (or node/peer_<name>.cjs) and record
(account, seq, started_ns, finished_ns) through bench/peers/record.py (node/record.cjs). A run
queues the whole workload, then starts the peer's workers with the settings that peer
documents for the case, waits until every job has recorded (or nothing moved for STALL_S), and
stops them. What Redis did for the push and for the drain is measured around each.
"""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from app.workload.report import Attempt
from bench.harness import SCRATCH, Bench, RedisWork
from stack import REPO

PEERS_DIR = REPO / "bench" / "peers"
VENVS = REPO / "var" / "peers"
NODE_DIR_SOURCE = PEERS_DIR / "node"
NODE_DIR = VENVS / "node"
STALL_S = 30.0


@dataclass(frozen=True)
class Peer:
    """How to install a peer and start its workers: `noop` at the peer's stock 2-core
    settings, `sleeping` with `slots` jobs in flight at once."""

    name: str
    noop: str
    sleeping: str
    note: str = ""
    node: bool = False  # from npm (bench/peers/node/package.json), run by `node`

    def settings(self, slots: int) -> str:
        """The worker command lines of both cases, for the results table."""
        cases = [
            " + ".join(
                " ".join(Path(arg).name if "/" in arg else arg for arg in argv)
                for argv in self.workers(case, slots)
            )
            for case in ("noop", "sleeping")
        ]
        return f"no-op: {cases[0]}; W={slots}: {cases[1]}" + (
            f" ({self.note})" if self.note else ""
        )

    def workers(self, case: str, slots: int) -> list[list[str]]:
        """One argv per worker process (the venv's bin/ prepended to the first word)."""
        line = (self.noop if case == "noop" else self.sleeping).format(slots=slots, half=slots // 2)
        argvs = [cmd.split() for cmd in line.split(" && ")]
        if self.node:  # node peer_<name>.cjs work N: the script beside node_modules
            return [["node", str(NODE_DIR / argv[1]), *argv[2:]] for argv in argvs]
        return [[str(self.venv / "bin" / argv[0]), *argv[1:]] for argv in argvs]

    def enqueue(self, plan: Path) -> list[str]:
        """The argv that queues the workload file `plan`."""
        if self.node:
            return ["node", str(NODE_DIR / f"peer_{self.name}.cjs"), "enqueue", str(plan)]
        script = str(PEERS_DIR / f"peer_{self.name}.py")
        return [str(self.venv / "bin" / "python"), script, "enqueue", str(plan)]

    @property
    def venv(self) -> Path:
        return NODE_DIR if self.node else VENVS / self.name

    def install(self) -> None:
        """Create the venv from bench/peers/<name>.txt (or node_modules from
        bench/peers/node/package.json) unless it already holds those pins."""
        if self.node:
            _install_node(self.venv)
            return
        pins = PEERS_DIR / f"{self.name}.txt"
        stamp = self.venv / "pins.txt"
        if stamp.exists() and stamp.read_text() == pins.read_text():
            return
        print(f"peers: installing {self.name} into {self.venv}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(self.venv)], check=True)
        pip = [str(self.venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        subprocess.run([*pip, "-r", str(pins)], env=env, check=True)
        stamp.write_text(pins.read_text())


PEERS = (
    # rq: one job per forked work horse; one worker per core, or one per job in flight.
    Peer("rq", "rq worker-pool -q -n 2 bench", "rq worker-pool -q -n {slots} bench"),
    # celery: prefork with one child per core; threads for jobs that wait.
    Peer(
        "celery",
        "celery -A peer_celery worker -l WARNING -c 2",
        "celery -A peer_celery worker -l WARNING -P threads -c {slots}",
    ),
    # dramatiq: its defaults are one process per core with 8 threads each.
    Peer(
        "dramatiq",
        "dramatiq peer_dramatiq --processes 2 --threads 8",
        "dramatiq peer_dramatiq --processes 2 --threads {half}",
    ),
    # arq: asyncio, one worker per core; max_jobs (default 10) is its in-flight limit.
    Peer(
        "arq",
        "arq peer_arq.WorkerSettings && arq peer_arq.WorkerSettings",
        "arq peer_arq.WorkerSettings && arq peer_arq.WorkerSettings",
        note="max_jobs 10, its default; W=100: 50 per worker",
    ),
    # groupmq: one Node process per core; concurrency is its jobs in flight per worker.
    Peer(
        "groupmq",
        "node peer_groupmq.cjs work 100 && node peer_groupmq.cjs work 100",
        "node peer_groupmq.cjs work {half} && node peer_groupmq.cjs work {half}",
        note="concurrency 100 per worker for the no-op; W=100: 50 per worker",
        node=True,
    ),
    # bullmq: the same; it keeps no order per account.
    Peer(
        "bullmq",
        "node peer_bullmq.cjs work 100 && node peer_bullmq.cjs work 100",
        "node peer_bullmq.cjs work {half} && node peer_bullmq.cjs work {half}",
        note="concurrency 100 per worker for the no-op; W=100: 50 per worker",
        node=True,
    ),
)


def _install_node(where: Path) -> None:
    """npm-install bench/peers/node/package.json (exact versions) into `where`, with the
    peers' scripts beside node_modules (Node resolves packages from the script's folder)."""
    pins = (NODE_DIR_SOURCE / "package.json").read_text()
    stamp = where / "pins.json"
    where.mkdir(parents=True, exist_ok=True)
    for script in NODE_DIR_SOURCE.glob("*.cjs"):
        (where / script.name).write_text(script.read_text())
    if stamp.exists() and stamp.read_text() == pins:
        return
    print(f"peers: installing the Node peers into {where}", file=sys.stderr, flush=True)
    (where / "package.json").write_text(pins)
    npm = ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"]
    subprocess.run(npm, cwd=where, check=True)
    stamp.write_text(pins)


def run(
    b: Bench, peer: Peer, workload: list[int], case: str, slots: int, sleep_s: float
) -> tuple[list[Attempt], dict[str, float]]:
    """Queue `workload` through the peer, drain it with its workers; the jobs' records, and
    Redis commands and CPU us per job of the push and of the drain (`Bench.work`)."""
    b.fresh()
    work = SCRATCH / "peers"
    work.mkdir(parents=True, exist_ok=True)
    plan = work / "workload.json"
    plan.write_text(json.dumps(workload))
    records = work / f"{peer.name}-{case}.jsonl"
    records.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(PEERS_DIR),
        "REDIS_URL": b.server.url,
        "PEER_SLEEP": str(sleep_s),
        "PEER_RECORDS": str(records),
        "PEER_MAX_JOBS": str(slots // 2 if case == "sleeping" else 10),
    }
    with b.work(len(workload)) as push:
        subprocess.run(peer.enqueue(plan), env=env, cwd=work, check=True)
    drain = b.work(len(workload)).start()
    procs = [
        subprocess.Popen(
            argv,
            env=env,
            cwd=work,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for argv in peer.workers(case, slots)
    ]
    try:
        _wait_recorded(records, len(workload))
        drain.stop()
    finally:
        for proc in procs:
            _stop_group(proc)
    return _attempts(records), costs(push, drain)


def costs(push: RedisWork, drain: RedisWork) -> dict[str, float]:
    """Redis commands and CPU us per job (one Redis) of the push and of the drain."""
    return {
        "push_commands_per_job": push.commands_per_item,
        "push_cpu_us_per_job": sum(push.cpu_us_per_item_per_master),
        "drain_commands_per_job": drain.commands_per_item,
        "drain_cpu_us_per_job": sum(drain.cpu_us_per_item_per_master),
    }


def _wait_recorded(records: Path, expected: int) -> None:
    """Until `expected` records exist, or none came for STALL_S."""
    seen, moved = 0, time.monotonic()
    while seen < expected and time.monotonic() - moved < STALL_S:
        time.sleep(0.2)
        now = _count_lines(records)
        if now != seen:
            seen, moved = now, time.monotonic()


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
    except FileNotFoundError:
        return 0


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the worker and its children (forked work horses, pool processes); then kill."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _attempts(records: Path) -> list[Attempt]:
    """The records as acked attempts, so that evq's report code counts their violations."""
    if not records.exists():
        return []
    out = []
    for line in records.read_text().splitlines():
        r = json.loads(line)
        out.append(
            Attempt(
                account=r["account"],
                seq=r["seq"],
                event_id="",
                attempt=1,
                outcome="ack",
                host="",
                pid=r["pid"],
                slot=0,
                enqueued_ns=r["started_ns"],
                started_ns=r["started_ns"],
                finished_ns=r["finished_ns"],
            )
        )
    return out
