"""The local Redis Cluster: 3 masters and 3 replicas from the same redis-server package, on
`base`..`base`+5 (cluster bus on +10000), AOF on, state in `<var>/cluster/<port>`.

Created once; after `down` the nodes come back from their nodes.conf with their data.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import redis as sync_redis

from stack.servers import NODES, free_block, pings, redis_binary, wait_for

# A master unreachable this long (ms) is failed over to its replica (Redis' default: 15000).
NODE_TIMEOUT_MS = 3000
SETTLE_S = 30.0


def ports(base: int) -> list[int]:
    return [base + i for i in range(NODES)]


def node_dir(var: Path, port: int) -> Path:
    return var / "cluster" / str(port)


def up(var: Path, base: int, node_timeout_ms: int = NODE_TIMEOUT_MS) -> None:
    """Start the nodes that are not answering, create the cluster on first use, and wait until
    it is settled: every hash slot served, 3 replicas linked, no AOF rewrite under way (one
    would slow the first writes of a test or a benchmark)."""
    binary = redis_binary()
    for port in ports(base):
        where = node_dir(var, port)
        where.mkdir(parents=True, exist_ok=True)
        if pings(port):
            print(f"node {port}: already answering")
            continue
        subprocess.run(
            [
                binary, "--port", str(port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes", "--cluster-node-timeout", str(node_timeout_ms),
                # A master's outage stops only its own hash slots, not the whole cluster.
                "--cluster-require-full-coverage", "no",
                "--cluster-config-file", "nodes.conf", "--dir", str(where),
                "--appendonly", "yes", "--save", "", "--maxmemory-policy", "noeviction",
                "--lazyfree-lazy-expire", "yes",
                "--shutdown-on-sigterm", "now", "--daemonize", "yes",
                "--pidfile", str(where / "redis.pid"), "--logfile", str(where / "redis.log"),
            ],
            check=True,
        )  # fmt: skip
        try:
            wait_for(lambda port=port: pings(port), 5, f"node {port}")  # type: ignore[misc]
        except AssertionError:
            raise SystemExit(f"node {port} did not start: see {where / 'redis.log'}") from None
    first = sync_redis.Redis(port=base)
    try:
        if int(first.cluster("info")["cluster_slots_assigned"]) == 0:
            _create(var, base)
        deadline = time.monotonic() + SETTLE_S
        while not _settled(base):
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"cluster not settled after {SETTLE_S:g} s: see {var}/cluster/*/redis.log"
                )
            time.sleep(0.1)
    finally:
        first.close()
    span = f"127.0.0.1:{base}-{base + NODES - 1}"
    print(f"cluster: 3 masters + 3 replicas on {span}, AOF in {var / 'cluster'}")


def _create(var: Path, base: int) -> None:
    done = subprocess.run(
        ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports(base)),
         "--cluster-replicas", "1", "--cluster-yes"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    log = var / "cluster" / "create.log"
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"cluster create failed: see {log}")


def _settled(base: int) -> bool:
    clients = {port: sync_redis.Redis(port=port, decode_responses=True) for port in ports(base)}
    try:
        info = clients[base].cluster("info")
        nodes = clients[base].execute_command("CLUSTER NODES")  # type: ignore[no-untyped-call]
        replicas = sum("slave" in node["flags"] for node in nodes.values())
        if info["cluster_state"] != "ok" or replicas != NODES // 2:
            return False
        for client in clients.values():
            node = client.info()
            if node["aof_rewrite_in_progress"] or node["aof_rewrite_scheduled"]:
                return False
            if node["role"] == "slave" and node["master_link_status"] != "up":
                return False
        return True
    except sync_redis.RedisError:
        return False
    finally:
        for client in clients.values():
            client.close()


def down(var: Path, base: int) -> None:
    """Stop every node at once, each flushing its own AOF: one by one, a master would wait for
    replicas that are already gone. A node busy with its first AOF refuses a SIGTERM, so it is
    asked again every second; after 30 s it is killed."""
    pids = {}
    for port in ports(base):
        pid = _signal(node_dir(var, port) / "redis.pid", signal.SIGTERM)
        if pid is None:
            print(f"node {port}: not running (or not started by make cluster-up)")
        else:
            pids[port] = pid
            print(f"node {port}: stopping")
    for port, pid in pids.items():
        for tick in range(300):
            if not _alive(pid):
                break
            if tick % 10 == 9:
                _signal(node_dir(var, port) / "redis.pid", signal.SIGTERM)
            time.sleep(0.1)
        else:
            _kill(pid, signal.SIGKILL)
            print(f"node pid {pid} did not stop within 30 s: killed")
    if pids:
        print("cluster: stopped")


def _signal(pidfile: Path, number: int) -> int | None:
    """Send signal `number` to the process of `pidfile`; its pid, or None when none runs."""
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return None
    return pid if _kill(pid, number) else None


def _kill(pid: int, number: int) -> bool:
    try:
        os.kill(pid, number)
    except ProcessLookupError:
        return False
    return True


def _alive(pid: int) -> bool:
    return _kill(pid, 0)


class LocalCluster:
    """A local cluster on a free block of ports with its state in `var`, for tests and
    benchmarks: `start`, `stop`, and clients of its masters."""

    def __init__(self, var: Path, base: int | None = None) -> None:
        self.var = var
        self.base = free_block() if base is None else base
        self.url = f"redis+cluster://127.0.0.1:{self.base}"

    def start(self) -> None:
        up(self.var, self.base)

    def stop(self) -> None:
        down(self.var, self.base)

    def masters(self) -> list[sync_redis.Redis]:
        """A client of each master, as the cluster sees them now."""
        client = sync_redis.Redis(port=self.base)
        nodes = client.execute_command("CLUSTER NODES")  # type: ignore[no-untyped-call]
        client.close()
        found = [address for address, node in nodes.items() if "master" in node["flags"]]
        return [
            sync_redis.Redis(port=int(address.split(":")[1].split("@")[0])) for address in found
        ]
