"""Helpers of the process-level tests: push, inspect Redis, read and check the event log."""

import asyncio
import collections
import signal
from collections.abc import Sequence
from pathlib import Path
from subprocess import Popen

import redis as sync_redis

from app.generator import workload
from app.keys import Keys
from app.queue import NewEvent, PushResult, open_queue
from app.report import Attempt, order_violations, read_log
from tests.support import settings, wait_for

KEYS = Keys("evq", settings("redis://").shards)


def push(url: str, events: Sequence[NewEvent]) -> list[PushResult]:
    """Queue events through the engine, as the generator does."""

    async def main() -> list[PushResult]:
        async with open_queue(settings(url)) as queue:
            return await queue.push_many(events)

    return asyncio.run(main())


def push_workload(url: str, events: int, accounts: int, seed: int = 1) -> list[NewEvent]:
    """Queue a bursty workload; returns what was pushed."""
    plan = [
        NewEvent(a, f"e{i}", {"i": i})
        for i, a in enumerate(workload("bursty", events, accounts, seed))
    ]
    push(url, plan)
    return plan


def counter(url: str, name: str) -> int:
    client = sync_redis.Redis.from_url(url)
    values = [client.hget(KEYS.stats(shard), name) for shard in range(KEYS.shards)]
    client.close()
    return sum(int(value or 0) for value in values)


def held(url: str) -> int:
    """How many events Redis holds pending or in flight."""
    client = sync_redis.Redis.from_url(url)
    lists = [
        *client.scan_iter(match="{evq:*}:user:*"),
        *client.scan_iter(match="{evq:*}:inflight:*"),
    ]
    count = sum(int(client.llen(key)) for key in lists)
    client.close()
    return count


def dead_letters(url: str) -> list[bytes]:
    """Every shard's dead letters."""
    client = sync_redis.Redis.from_url(url)
    entries = [e for shard in range(KEYS.shards) for e in client.lrange(KEYS.dead(shard), 0, -1)]
    client.close()
    return entries


def live_consumers(url: str) -> int:
    """How many consumer processes have registered their heartbeat."""
    client = sync_redis.Redis.from_url(url)
    count = int(client.zcard(KEYS.consumers))
    client.close()
    return count


def seq_of(body: bytes) -> int:
    """The seq of a stored event body (the push script writes it first)."""
    return int(body.split(b'"seq":')[1].split(b",")[0])


def in_flight(url: str) -> dict[int, int]:
    """account -> seq of every event currently in flight."""
    client = sync_redis.Redis.from_url(url)
    found = {}
    for key in client.scan_iter(match="{evq:*}:inflight:*"):
        for body in client.lrange(key, 0, -1):
            found[int(key.rsplit(b":", 1)[1])] = seq_of(body)
    client.close()
    return found


def attempts(log: Path) -> list[Attempt]:
    return read_log([log]).attempts


def assert_all_acked_once_in_order(log: Path, expected: int) -> list[Attempt]:
    """I1 and I2 from the log: every event acked exactly once, per-account order kept."""
    found = attempts(log)
    acked = collections.Counter((a.account, a.seq) for a in found if a.outcome == "ack")
    assert len(acked) == expected, f"{len(acked)} distinct events acked, expected {expected}"
    twice = [key for key, n in acked.items() if n > 1]
    assert not twice, f"acked more than once: {twice[:5]}"
    assert order_violations(found) == []
    return found


def graceful_stop(procs: Sequence[Popen[bytes]], timeout: float = 15) -> None:
    """SIGTERM every consumer and require a clean exit 0."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        assert proc.wait(timeout=timeout) == 0, proc.stderr.read() if proc.stderr else ""


def wait_burst(procs: Sequence[Popen[bytes]], timeout: float = 60) -> None:
    """Wait for burst-mode consumers to drain and exit 0."""
    for proc in procs:
        assert proc.wait(timeout=timeout) == 0, proc.stderr.read() if proc.stderr else ""


def wait_settled(url: str, total: int, timeout: float) -> None:
    wait_for(
        lambda: counter(url, "acked") + counter(url, "dead") >= total,
        timeout,
        f"{total} events acked or dead",
    )
