"""Read-only views of the queue for people: one account's state, the dead letters."""

from dataclasses import dataclass
from typing import Any, cast

import orjson

from app.queue import FENCE, LOCK, Queue


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
    layout = keys.account(account)
    lock, fence = layout[LOCK], layout[FENCE]
    async with queue.redis.pipeline(transaction=True) as tx:
        tx.llen(keys.pending(account))
        tx.lindex(keys.in_flight(account), 0)
        tx.get(lock)
        tx.get(fence)
        tx.pttl(lock)
        tx.hgetall(keys.totals(account))
        backlog, body, held, fenced, lease_ms, totals = await tx.execute()
    totals = cast(dict[bytes, bytes], totals)
    in_flight = None
    if body is not None:
        event = orjson.loads(body)
        in_flight = {"seq": event["seq"], "event_id": event["id"], "enqueued_ns": event["enq_ns"]}
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
    """The total number of dead letters and the page [offset, offset + limit), oldest first."""
    async with queue.redis.pipeline(transaction=True) as tx:
        tx.llen(queue.keys.dead)
        tx.lrange(queue.keys.dead, offset, offset + limit - 1)
        total, page = await tx.execute()
    return total, [orjson.loads(entry) for entry in page]
