"""Read-only views of the queue for people: one account's state, the dead letters."""

from dataclasses import dataclass
from typing import Any, cast

import orjson
from redis.asyncio.client import Pipeline

from app.queue import Queue, enqueued_ns


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


async def account_state(queue: Queue, account: int) -> AccountState:
    """Backlog, the event in flight, the owner's fencing token and lease, and settled counts."""
    keys = queue.keys
    async with queue.node_of(account).pipeline(transaction=True) as tx:
        tx.llen(keys.pending(account))
        tx.lindex(keys.in_flight(account), 0)
        tx.get(keys.lock(account))
        tx.get(keys.fence(account))
        tx.pttl(keys.lock(account))
        tx.hgetall(keys.totals(account))
        backlog, body, held, fenced, lease_ms, totals = await tx.execute()
    totals = cast(dict[bytes, bytes], totals)
    in_flight = None
    if body is not None:
        event = orjson.loads(body)
        seq = event["seq"]
        in_flight = {"seq": seq, "event_id": event["id"], "enqueued_ns": enqueued_ns(seq)}
    owner = None
    if held is not None:
        owner = {"token": int(fenced) - int(held) + 1, "lease_remaining_ms": max(0, lease_ms)}
    last = totals.get(b"last_acked_seq")
    return AccountState(
        account_id=account,
        backlog=backlog,
        in_flight=in_flight,
        owner=owner,
        last_acked_seq=int(last) if last is not None else None,
        acked=int(totals.get(b"acked", 0)),
        dead=int(totals.get(b"dead", 0)),
    )


async def dead_letters(queue: Queue, offset: int, limit: int) -> tuple[int, list[Any]]:
    """The total number of dead letters and the page [offset, offset + limit), oldest first
    over all shards."""
    keys = queue.keys

    def read(pipe: Pipeline, shard: int) -> None:
        pipe.llen(keys.dead(shard))
        pipe.lrange(keys.dead(shard), 0, offset + limit - 1)

    shards = await queue.each_shard(read)
    total = sum(length for length, _ in shards)
    entries = [orjson.loads(entry) for _, page in shards for entry in page]
    entries.sort(key=lambda entry: entry["dead_ns"])
    return total, entries[offset : offset + limit]
