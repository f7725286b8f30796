"""The consumer registry: heartbeats with busy slots, live consumers, the metrics hash the
consumers fold their tallies into, and the reaper's lock.

A consumer folds what its slots measured into one Redis hash with its heartbeat, every
HEARTBEAT_S (HINCRBY of each histogram bucket, count and sum), so supervisord's numprocs
consumers need no port each, and restarting one resets nothing. HISTOGRAMS names the fields.
"""

import time
from typing import cast

from app.engine.queue import Queue

HEARTBEAT_S = 1.0  # how often a consumer sends its heartbeat, busy slots and tally
HEARTBEATS_KEPT_S = 3600.0  # a consumer silent this long is forgotten
# Seconds; the handler takes about 1 s, an event waits from seconds to the whole backlog.
HISTOGRAMS = {
    "processing": (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0),
    "wait": (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0),
    "delivery": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
}
# Per histogram, the hash fields of its buckets (by upper bound, +Inf last), count and sum.
FIELDS = {
    name: (*(f"{name}:{b:g}" for b in bounds), f"{name}:+Inf", f"{name}:count", f"{name}:sum")
    for name, bounds in HISTOGRAMS.items()
}
LEASE_LOST = "lease_lost"  # the metrics hash's count of events whose owner lost its lease
DELIVERED = "delivered:"  # and its count of HTTP deliveries by outcome, `delivered:5xx`


async def heartbeat(
    queue: Queue, member: str, busy: int, counts: dict[str, int], sums: dict[str, float]
) -> None:
    """Record a live consumer `host:pid:slots` with the time of this heartbeat and its busy
    slots, fold its measurements since the last one into the metrics hash, and forget the
    consumers silent for HEARTBEATS_KEPT_S (they died without unregistering)."""
    keys, now = queue.keys, time.time()
    async with queue.nodes.for_key(keys.consumers).pipeline(transaction=False) as pipe:
        pipe.zadd(keys.consumers, {member: now})
        pipe.hset(keys.busy, member.rsplit(":", 1)[0], busy)
        for field, count in counts.items():
            pipe.hincrby(keys.metrics, field, count)
        for field, total in sums.items():
            pipe.hincrbyfloat(keys.metrics, field, total)
        pipe.zremrangebyscore(keys.consumers, "-inf", now - HEARTBEATS_KEPT_S)
        await queue.timed(pipe.execute())


async def unregister(queue: Queue, member: str) -> None:
    """Forget a consumer that stopped."""
    keys = queue.keys
    async with queue.nodes.for_key(keys.consumers).pipeline(transaction=False) as pipe:
        pipe.zrem(keys.consumers, member)
        pipe.hdel(keys.busy, member.rsplit(":", 1)[0])
        await queue.timed(pipe.execute())


async def live_consumers(queue: Queue, within_s: float) -> dict[str, int]:
    """`host:pid` -> slots of each consumer that sent a heartbeat within the last `within_s`."""
    return {name: slots for name, (slots, _, _) in (await consumers(queue, within_s)).items()}


async def consumers(queue: Queue, within_s: float) -> dict[str, tuple[int, int, float]]:
    """`host:pid` -> (slots, busy slots, seconds since its heartbeat) of each consumer that
    sent one within the last `within_s`."""
    now, keys = time.time(), queue.keys
    async with queue.nodes.for_key(keys.consumers).pipeline(transaction=False) as pipe:
        pipe.zrangebyscore(keys.consumers, now - within_s, "+inf", withscores=True)
        pipe.hgetall(keys.busy)
        members, busy = await queue.timed(pipe.execute())
    found = {}
    for member, at in cast(list[tuple[bytes, float]], members):
        name, slots = member.decode().rsplit(":", 1)
        found[name] = (int(slots), int(busy.get(name.encode(), 0)), max(0.0, now - at))
    return found


async def measurements(queue: Queue) -> dict[str, float]:
    """What the consumers folded into the metrics hash (FIELDS and LEASE_LOST name them)."""
    key = queue.keys.metrics
    folded = cast(dict[bytes, bytes], await queue.timed(queue.nodes.for_key(key).hgetall(key)))
    return {field.decode(): float(value) for field, value in folded.items()}


async def try_reaper_lock(queue: Queue, ttl_s: float) -> bool:
    """Whether this caller runs the reaper now (one consumer per interval)."""
    ttl_ms = max(1, round(ttl_s * 1000))
    key = queue.keys.reaper
    return bool(await queue.timed(queue.nodes.for_key(key).set(key, b"1", nx=True, px=ttl_ms)))
