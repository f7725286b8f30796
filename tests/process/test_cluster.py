"""evq on a real Redis Cluster: consumer processes across a kill -9, a master killed while
consumers drain and pushes go on, and a process with another SHARDS refused."""

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as sync_redis

from app.api.app import create_app
from app.engine import TRANSIENT, NewEvent, open_queue
from app.engine.inspect import account_state
from app.engine.keys import Keys
from app.workload.client import ApiClient, as_sent
from app.workload.generator import workload
from app.workload.report import Attempt, order_violations
from stack import REPO, cluster
from stack.servers import free_block, wait_for
from tests.api.test_api import Lifespan
from tests.process.helpers import (
    counter,
    engine,
    graceful_stop,
    live_consumers,
    push,
    push_workload,
    wait_burst,
    wait_settled,
)
from tests.support import Consumers, assert_all_acked_once_in_order, attempts, settings


def three_draining(consumers: Consumers, seed: int, acked: int, **settings: object) -> None:
    """Three consumer processes with `settings`, 3,000 bursty events over 300 accounts pushed
    once they are up; returns when `acked` of them are acked."""
    for _ in range(3):
        consumers.start(lease_seconds=2, **settings)
    wait_for(lambda: live_consumers(consumers.url) == 3, 30, "three consumers' heartbeats")
    push_workload(consumers.url, 3000, 300, seed=seed)
    wait_for(lambda: counter(consumers.url, "acked") >= acked, 60, f"{acked} acks")


def test_three_consumers_keep_order_across_a_kill_9(cluster_url: str, tmp_path: Path) -> None:
    """I1, I2 on the cluster: three processes drain 3,000 bursty events over 16 shards on three
    masters; one is killed mid-drain and a fresh one takes over its accounts after the lease.
    Every event is acked once, in seq order. (A batch whose ack the victim got back but had not
    logged yet when killed is in Redis and in its settling lines only: at most one batch per
    slot of the victim, checked there.)"""
    consumers = Consumers(cluster_url, tmp_path / "event.log")
    try:
        three_draining(consumers, seed=5, acked=500, concurrency=20, process_seconds=0.01)
        victim = consumers.procs[0]
        victim.kill()
        victim.wait()
        consumers.start(concurrency=20, process_seconds=0.01, lease_seconds=2)
        # Its heartbeat (the victim's is still counted) means its SIGTERM handler is set.
        wait_for(lambda: live_consumers(cluster_url) == 4, 30, "the replacement's heartbeat")
        wait_settled(cluster_url, 3000, timeout=120)
        graceful_stop(consumers.procs[1:])
    finally:
        consumers.stop_all()
    assert counter(cluster_url, "acked") == 3000
    found = attempts(consumers.event_log)
    acked = collections.Counter((a.account, a.event_id) for a in found if a.outcome == "ack")
    assert max(acked.values()) == 1
    assert order_violations(found) == []
    plan = plan_of(3000, 300, seed=5)
    missing = {(a, f"e{i}") for a, i in plan} - set(acked)
    assert len(missing) <= 20 * 3  # slots x the most a 0.01 s handler's batch holds
    settling = {
        (line["account"], line["event_id"])
        for line in map(json.loads, consumers.event_log.read_text().splitlines())
        if line.get("event") == "event_settling" and line["settling"] == "ack"
    }
    assert missing <= settling
    per_account = collections.Counter(a for a, _ in plan)
    for account, _ in missing:
        assert acked_in_redis(cluster_url, account) == per_account[account]
    assert len({a.pid for a in found}) >= 3  # the victim and the survivors (and maybe the new one)


def test_another_shards_setting_is_refused(redis_url: str, tmp_path: Path) -> None:
    """The number of shards is recorded by the first process; a consumer started with another
    SHARDS exits 2 with a message that names both and the fix, and changes nothing."""
    push(redis_url, [NewEvent(1, "a")])
    env = {**os.environ, "PYTHONPATH": str(REPO), "REDIS_URL": redis_url, "SHARDS": "4"}
    env["EVENT_LOG"] = str(tmp_path / "event.log")
    done = subprocess.run(
        [sys.executable, "-m", "app", "consume"],
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    message = done.stderr.decode()
    assert "has 16 shards and this process SHARDS=4" in message
    assert "Traceback" not in message
    assert counter(redis_url, "accepted") == 1


def assert_tokens_only_grow(found: list[Attempt]) -> None:
    """I8: per account, the fencing tokens of its attempts, in the order they started, never
    go back, and two owners never share one (a token's attempts do not interleave another's)."""
    tokens: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for a in found:
        tokens[a.account].append((a.started_ns, a.token))
    for account, seen in tokens.items():
        in_time = [token for _, token in sorted(seen)]
        assert in_time == sorted(in_time), f"account {account}: a token went back"
        assert all(token > 0 for token in in_time)


def plan_of(events: int, accounts: int, seed: int) -> list[tuple[int, int]]:
    """(account, index) of each event `push_workload` pushes."""
    return [(a, i) for i, a in enumerate(workload("bursty", events, accounts, seed))]


def acked_in_redis(url: str, account: int) -> int:
    return engine(url, lambda queue: account_state(queue, account)).acked


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A cluster of this test's own (it kills a master): VAR and the first port."""
    var, base = tmp_path / "var", free_block()
    try:
        cluster.up(var, base)
        yield var, base
    finally:
        cluster.down(var, base)


class Pusher(threading.Thread):
    """Pushes batches with REPLICA_ACKS=1 until all are accepted, sending a batch again after
    a fault (event ids make that safe)."""

    def __init__(self, url: str, batches: int, accounts: int) -> None:
        super().__init__(daemon=True)
        self.url, self.batches, self.accounts = url, batches, accounts
        self.confirmed = 0
        self.faults = 0

    def run(self) -> None:
        asyncio.run(self._push())

    async def _push(self) -> None:
        async with open_queue(settings(self.url, replica_acks=1)) as queue:
            for batch in range(self.batches):
                events = [NewEvent(a, f"b{batch}-{a}") for a in range(1, self.accounts + 1)]
                while True:
                    try:
                        results = await queue.push_many(events)
                        break
                    except TRANSIENT:
                        self.faults += 1
                        await asyncio.sleep(0.2)
                self.confirmed += len(results)  # queued now, or by an earlier try
                await asyncio.sleep(0.05)


def test_master_killed_mid_drain_loses_nothing_accepted(
    own_cluster: tuple[Path, int], tmp_path: Path
) -> None:
    """Failover: kill -9 a master while three consumers drain and pushes go on, all with
    REPLICA_ACKS=1. Its replica is promoted and the old master rejoins as its replica; every
    accepted event is acked exactly once in seq order, and each account's fencing tokens only
    grow."""
    var, base = own_cluster
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{base + i}" for i in range(3))
    consumers = Consumers(url, tmp_path / "event.log")
    pusher = Pusher(url, batches=60, accounts=50)
    try:
        for _ in range(3):
            consumers.start(concurrency=20, process_seconds=0.02, lease_seconds=15, replica_acks=1)
        wait_for(lambda: live_consumers(url) == 3, 30, "three consumers' heartbeats")
        pusher.start()
        wait_for(lambda: counter(url, "acked") >= 300, 60, "300 acks")
        master = int((var / "cluster" / str(base) / "redis.pid").read_text())
        os.kill(master, signal.SIGKILL)
        # Its replica takes over. With no replica left, REPLICA_ACKS=1 writes to its shards
        # fail until the old master is back, as a replica of the new one.
        time.sleep(1)
        cluster.up(var, base)
        pusher.join(timeout=120)
        assert not pusher.is_alive()
        assert pusher.faults > 0  # the pushes did meet the failover
        wait_settled(url, 3000, timeout=120)
        graceful_stop(consumers.procs)
    finally:
        consumers.stop_all()
    assert pusher.confirmed == 3000
    assert counter(url, "accepted") == 3000  # none queued twice by the batches sent again
    found = assert_all_acked_once_in_order(consumers.event_log, 3000)
    assert_tokens_only_grow(found)
    assert {a.attempt for a in found} <= {1, 2, 3}


def migrate_slot(base: int, slot: int) -> tuple[int, int]:
    """Move `slot` to another master the way `redis-cli --cluster reshard` does (IMPORTING,
    MIGRATING, MIGRATE in batches, SETSLOT NODE); (from port, to port)."""
    seed = sync_redis.Redis(port=base)
    nodes = seed.execute_command("CLUSTER NODES")  # type: ignore[no-untyped-call]
    seed.close()
    masters = {
        int(address.split(":")[1].split("@")[0]): node["node_id"]
        for address, node in nodes.items()
        if "master" in node["flags"]
    }
    owner = sync_redis.Redis(port=base).execute_command(  # type: ignore[no-untyped-call]
        "CLUSTER", "SLOTS"
    )
    source_port = next(int(r[2][1]) for r in owner if r[0] <= slot <= r[1])
    target_port = next(port for port in masters if port != source_port)
    source, target = sync_redis.Redis(port=source_port), sync_redis.Redis(port=target_port)
    target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", masters[source_port])
    source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", masters[target_port])
    while keys := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10):
        source.execute_command("MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", *keys)
        time.sleep(0.01)  # a migration in small steps, so the drain meets it half done
    for port in masters:
        client = sync_redis.Redis(port=port)
        client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", masters[target_port])
        client.close()
    source.close()
    target.close()
    return source_port, target_port


def test_slot_of_a_busy_shard_moved_mid_drain(
    own_cluster: tuple[Path, int], tmp_path: Path
) -> None:
    """Live resharding: the slot of a shard being drained moves to another master, key batch by
    key batch, while three consumers work on it. Calls meeting ASK or TRYAGAIN are sent again
    until the slot has moved; every event is acked once, in seq order."""
    _, base = own_cluster
    url = f"redis+cluster://127.0.0.1:{base}"
    consumers = Consumers(url, tmp_path / "event.log")
    try:
        three_draining(consumers, seed=7, acked=300, concurrency=10, process_seconds=0.02)
        keys = Keys("evq", settings(url).shards)
        busiest = collections.Counter(keys.shard_of(a) for a, _ in plan_of(3000, 300, seed=7))
        shard = busiest.most_common(1)[0][0]
        moved = migrate_slot(base, keys.hash_slot(shard))
        assert counter(url, "acked") < 3000, "the drain ended before the slot moved"
        wait_settled(url, 3000, timeout=120)
        graceful_stop(consumers.procs)
    finally:
        consumers.stop_all()
    assert moved[0] != moved[1]
    assert "redis_faults_ridden_out" in consumers.event_log.read_text()  # it met the move
    assert_tokens_only_grow(assert_all_acked_once_in_order(consumers.event_log, 3000))


async def test_a_dead_master_stops_only_its_own_shards(
    own_cluster: tuple[Path, int], tmp_path: Path
) -> None:
    """REPLICA_ACKS=1 on a cluster that does not require full coverage, one master killed -9
    and its replica promoted with no replica left: batches through the API spanning every
    shard are accepted for the other masters' shards throughout, their events of the dead
    one's answered `unavailable`, never a 503 for the whole batch; once the old master is back
    the client's resends land, and consumers ack everything accepted exactly once, in order."""
    var, base = own_cluster
    url = f"redis+cluster://127.0.0.1:{base}"
    app = create_app(settings(url, replica_acks=1))
    statuses: list[tuple[int, int, int]] = []  # (status, accepted, unavailable) per batch
    async with Lifespan(app) as http:
        client = ApiClient(http, retry_s=120)
        await client.push_many([NewEvent(a, f"before-{a}") for a in range(1, 101)])
        master = int((var / "cluster" / str(base) / "redis.pid").read_text())
        os.kill(master, signal.SIGKILL)
        for batch in range(40):
            events = [NewEvent(a, f"during-{batch}-{a}") for a in range(1, 101)]
            answer = await http.post("/events/batch", json={"events": [as_sent(e) for e in events]})
            body = answer.json() if answer.status_code == 202 else {}
            statuses.append(
                (answer.status_code, body.get("accepted", 0), body.get("unavailable", 0))
            )
            await asyncio.sleep(0.2)

        async def resend() -> None:
            for b in range(40):
                await client.push_many([NewEvent(a, f"during-{b}-{a}") for a in range(1, 101)])

        resending = asyncio.ensure_future(resend())
        await asyncio.to_thread(cluster.up, var, base)
        await asyncio.wait_for(resending, 120)
    partial = [
        i for i, (_, accepted, unavailable) in enumerate(statuses) if accepted and unavailable
    ]
    assert len(partial) >= 5, statuses
    assert all(status == 202 for status, _, _ in statuses), statuses
    consumers = Consumers(url, tmp_path / "event.log")
    try:
        consumers.start(burst=True, concurrency=50, replica_acks=1)
        await asyncio.to_thread(wait_burst, consumers.procs, 120)
    finally:
        consumers.stop_all()
    assert (await asyncio.to_thread(counter, url, "accepted")) == 4100
    assert_all_acked_once_in_order(consumers.event_log, 4100)
