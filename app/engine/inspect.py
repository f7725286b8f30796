"""Read-only views of the queue: totals, one account's state, one event's, what waits, and the
snapshot every view (API, dashboard, `evq top`, /metrics) shows. Nothing here writes."""

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from redis.asyncio.client import Pipeline

from app.engine import registry
from app.engine.dead import letter_id
from app.engine.events import enqueued_ns, seq_of
from app.engine.queue import Queue
from app.engine.shards import each_shard

# The counters of a shard's stats hash, as `stats` sums them.
COUNTED = ("accepted", "refused", "acked", "nacked", "dead", "redelivered", "replayed", "purged")
SAMPLE = 200  # accounts per shard read for the oldest event and the longest backlogs
TOP = 10  # longest backlogs shown
LOOKUP_DEPTH = 100  # pending events an event lookup reads at most (up to 64 KiB each)


@dataclass(frozen=True, slots=True)
class AccountState:
    """What an account looks like right now; `owner` is None while no consumer holds it."""

    account_id: int
    backlog: int
    in_flight: dict[str, Any] | None
    owner: dict[str, int] | None
    last_acked_seq: int | None
    acked: int
    dead: int
    paused: str | None  # 'operator' or 'parked' while it is not claimed


async def account_state(queue: Queue, account: int) -> AccountState:
    """Backlog, the event in flight, the owner's fencing token and lease, and settled counts."""
    keys = queue.keys
    async with queue.node_of(account).pipeline(transaction=True) as tx:
        tx.llen(keys.pending(account))
        tx.lindex(keys.pending(account), 0)
        tx.get(keys.lock(account))
        tx.pttl(keys.lock(account))
        tx.hmget(keys.state(account), "acked", "dead", "last_acked_seq", "fence", "size")
        tx.hget(keys.paused(keys.shard_of(account)), str(account))
        length, body, held, lease_ms, state, paused = await tx.execute()
    acked, dead, last, fenced, size = state
    flying = int(size or 0)  # the batch in flight: the head's first events
    backlog = length - flying
    in_flight = None
    if flying and body is not None:
        event = orjson.loads(body)
        seq = event["seq"]
        in_flight = {"seq": seq, "event_id": event["id"], "enqueued_ns": enqueued_ns(seq)}
    owner = None
    if held is not None:
        owner = {"token": int(fenced) - int(held) + 1, "lease_remaining_ms": max(0, lease_ms)}
    return AccountState(
        account_id=account,
        backlog=backlog,
        in_flight=in_flight,
        owner=owner,
        last_acked_seq=int(last) if last is not None else None,
        acked=int(acked or 0),
        dead=int(dead or 0),
        paused=paused.decode() if paused else None,
    )


async def event_state(
    queue: Queue, account: int, event_id: str, seq: int | None = None
) -> dict[str, Any] | None:
    """Where one event is: `pending` at `position` (1 runs next; None beyond the first
    LOOKUP_DEPTH events of the head, the batch in flight included, which are all a lookup
    reads), `in_flight` (attempt, and the owner's token and lease while one holds it), `dead`
    (its error), or `acked`. None when evq does not know it: never accepted, or settled and
    forgotten (its id outlived the dedupe window, or its dead letter was purged). With its
    `seq`, when the caller knows it (a settling line of the event log says it), an event whose
    id is forgotten is still found acked while its account's last acked seq is there to
    compare. One transaction of bounded cost."""
    keys = queue.keys
    shard = keys.shard_of(account)
    bucket = queue.dedupe_bucket()
    field = f"{account}:{event_id}"
    async with queue.node_of(account).pipeline(transaction=True) as tx:
        for b in (bucket, bucket - 1):
            tx.hget(keys.ids(shard, b), field)
            tx.hget(keys.legacy_ids(account, b), event_id)
        tx.hmget(keys.state(account), "n", "token", "last_acked_seq", "fence", "size")
        tx.get(keys.lock(account))
        tx.pttl(keys.lock(account))
        tx.lrange(keys.pending(account), 0, LOOKUP_DEPTH - 1)
        tx.hget(keys.dead(shard), letter_id(account, event_id))
        (
            seen,
            seen_legacy,
            seen_before,
            seen_before_legacy,
            (attempt, taker, last, fenced, size),
            held,
            lease_ms,
            head,
            dead,
        ) = await tx.execute()
    found: dict[str, Any] = {"account_id": account, "event_id": event_id}
    in_flight = int(size or 0)
    flying, pending = head[:in_flight], head[in_flight:]
    for place, body in enumerate(flying):  # the batch in flight: its first has `attempt`
        if (event := orjson.loads(body))["id"] != event_id:
            continue
        owner = None
        if held is not None and int(fenced) - int(held) + 1 == int(taker or 0):
            owner = {"token": int(taker), "lease_remaining_ms": max(0, lease_ms)}
        return {
            **found,
            "state": "in_flight",
            "seq": event["seq"],
            "attempt": int(attempt or 1) if place == 0 else 1,
            "owner": owner,
            "replays": event.get("r", 0),
        }
    for position, body in enumerate(pending, start=1):
        if (event := orjson.loads(body))["id"] == event_id:
            return {
                **found,
                "state": "pending",
                "seq": event["seq"],
                "position": position,
                "replays": event.get("r", 0),
            }
    known = seen or seen_legacy or seen_before or seen_before_legacy
    if known is None and seq is not None:
        known = b"%d" % seq
    return _elsewhere(found, dead, known, last, len(head) == LOOKUP_DEPTH)


def _elsewhere(
    found: dict[str, Any], dead: bytes | None, seq: bytes | None, last: bytes | None, deeper: bool
) -> dict[str, Any] | None:
    """An event neither in flight nor among the pending events read: a dead letter, acked,
    pending further down (`deeper`: the read stopped at LOOKUP_DEPTH), or not known."""
    if dead is not None:
        entry = orjson.loads(dead)
        return {
            **found,
            "state": "dead",
            "seq": entry["seq"],
            "attempts": entry["attempts"],
            "error": entry["error"],
            "dead_ns": entry["dead_ns"],
            "replays": entry.get("replays", 0),
        }
    if seq is None:
        return None
    if last is not None and int(seq) <= int(last):
        return {**found, "state": "acked", "seq": int(seq)}
    if deeper:
        return {**found, "state": "pending", "seq": int(seq), "position": None, "replays": 0}
    return None


async def stats(queue: Queue) -> dict[str, int]:
    """Counters, summed over the shards: events accepted, refused (MAX_BACKLOG_PER_ACCOUNT),
    acked, nacked, dead-lettered, redelivered, replayed and purged; the backlog (pending and
    in flight, from the counters: accepted + replayed - acked - dead); the sizes of the
    ready indexes, active sets and dead letters; and how many accounts are paused by an
    operator or parked by a poison event."""
    keys = queue.keys

    def read(pipe: Pipeline, shard: int) -> None:
        pipe.hgetall(keys.stats(shard))
        pipe.zcard(keys.ready(shard))
        pipe.scard(keys.active(shard))
        pipe.hlen(keys.dead(shard))
        pipe.hvals(keys.paused(shard))

    sizes = ("ready", "active", "dead_letters", "paused", "parked")
    totals = dict.fromkeys((*COUNTED, "backlog", *sizes), 0)
    for counters, ready, active, dead_letters, paused in await each_shard(queue, read):
        for name in COUNTED:
            totals[name] += int(counters.get(name.encode(), 0))
        totals["ready"] += ready
        totals["active"] += active
        totals["dead_letters"] += dead_letters
        totals["parked"] += paused.count(b"parked")
        totals["paused"] += len(paused) - paused.count(b"parked")
    totals["backlog"] = totals["accepted"] + totals["replayed"] - totals["acked"] - totals["dead"]
    return totals


async def waiting(queue: Queue, id_prefix: str) -> int:
    """How many pending or in-flight events have an event_id starting with `id_prefix`."""
    keys = queue.keys
    members = await each_shard(queue, lambda pipe, shard: pipe.smembers(keys.active(shard)))
    accounts = {shard: [int(a) for a in found] for shard, (found,) in enumerate(members)}

    def read(pipe: Pipeline, shard: int) -> None:
        for account in accounts[shard]:
            pipe.lrange(keys.pending(account), 0, -1)  # the batch in flight is its head

    lists = await each_shard(queue, read, [s for s, found in accounts.items() if found])
    needle = b'"id":' + orjson.dumps(id_prefix)[:-1]
    return sum(needle in body for shard in lists for bodies in shard for body in bodies)


async def drained(queue: Queue) -> bool:
    """True when no account has pending or in-flight events."""
    keys = queue.keys
    sizes = await each_shard(queue, lambda pipe, shard: pipe.scard(keys.active(shard)))
    return not any(size for (size,) in sizes)


@dataclass(frozen=True, slots=True)
class LiveConsumer:
    """A consumer that sent a heartbeat lately, as the views show it."""

    name: str  # host:pid
    slots: int
    busy: int
    heartbeat_age_s: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The queue right now, as every view shows it."""

    at: float  # unix seconds
    stats: dict[str, int]
    consumers: list[LiveConsumer]
    oldest_event_age_s: float | None  # of the sampled accounts; None when nothing waits
    longest: list[tuple[int, int]]  # (account, pending events), longest first, sampled
    measured: dict[str, float]  # the consumers' folded tally

    @property
    def slots(self) -> int:
        return sum(c.slots for c in self.consumers)

    @property
    def busy(self) -> int:
        return sum(c.busy for c in self.consumers)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("measured")
        out["longest"] = [{"account_id": a, "backlog": n} for a, n in self.longest]
        out.update(slots=self.slots, busy=self.busy, lease_losses=self.lease_losses)
        out["deliveries"] = self.deliveries
        return out

    @property
    def deliveries(self) -> dict[str, int]:
        """HTTP deliveries by outcome (`2xx`, `5xx`, `timeout`, ...), when there were any."""
        prefix = registry.DELIVERED
        return {
            field.removeprefix(prefix): int(count)
            for field, count in sorted(self.measured.items())
            if field.startswith(prefix)
        }

    @property
    def lease_losses(self) -> int:
        return int(self.measured.get(registry.LEASE_LOST, 0))


async def snapshot(queue: Queue, live_within_s: float) -> Snapshot:
    """Counters, consumers, and a sample of up to SAMPLE active accounts per shard for the
    oldest unsettled event and the longest backlogs: exact while a shard has fewer active
    accounts, an estimate beyond (like SQS's ApproximateAgeOfOldestMessage)."""
    totals, live, measured, sample = await asyncio.gather(
        stats(queue),
        registry.consumers(queue, live_within_s),
        registry.measurements(queue),
        _sample(queue),
    )
    now = time.time()
    heads = [seq for _, _, seq in sample if seq is not None]
    oldest = max(0.0, now - enqueued_ns(min(heads)) / 1e9) if heads else None
    longest = sorted(((n, a) for a, n, _ in sample if n), reverse=True)[:TOP]
    return Snapshot(
        at=now,
        stats=totals,
        consumers=[LiveConsumer(n, *found) for n, found in sorted(live.items())],
        oldest_event_age_s=oldest,
        longest=[(a, n) for n, a in longest],
        measured=measured,
    )


async def _sample(queue: Queue) -> list[tuple[int, int, int | None]]:
    """(account, events pending or in flight, seq of its oldest unsettled event) of sampled
    accounts (a batch in flight stays at the head of the pending list)."""
    keys = queue.keys
    members = await each_shard(
        queue, lambda pipe, shard: pipe.srandmember(keys.active(shard), SAMPLE)
    )
    accounts = {shard: [int(a) for a in found] for shard, (found,) in enumerate(members)}

    def read(pipe: Pipeline, shard: int) -> None:
        for account in accounts[shard]:
            pipe.llen(keys.pending(account))
            pipe.lindex(keys.pending(account), 0)

    shards = [shard for shard, found in accounts.items() if found]
    out = []
    for shard, replies in zip(shards, await each_shard(queue, read, shards), strict=True):
        for i, account in enumerate(accounts[shard]):
            length, head = replies[2 * i : 2 * i + 2]
            out.append((account, length, seq_of(head) if head else None))
    return out
