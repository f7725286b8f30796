"""Read-only views of the queue for people: one account's state, one event's."""

from dataclasses import dataclass
from typing import Any, cast

import orjson

from app.engine.queue import Queue, enqueued_ns


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
        tx.lindex(keys.in_flight(account), 0)
        tx.get(keys.lock(account))
        tx.get(keys.fence(account))
        tx.pttl(keys.lock(account))
        tx.hgetall(keys.totals(account))
        tx.hget(keys.paused(keys.shard_of(account)), str(account))
        backlog, body, held, fenced, lease_ms, totals, paused = await tx.execute()
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
        paused=paused.decode() if paused else None,
    )


async def event_state(queue: Queue, account: int, event_id: str) -> dict[str, Any] | None:
    """Where one event is: `pending` at `position` (1 runs next), `in_flight` (attempt, and the
    owner's token and lease while one holds it), `dead` (its error), or `acked`. None when
    evq does not know it: never accepted, or settled and forgotten (its id outlived the
    dedupe window, or its dead letter was purged)."""
    keys = queue.keys
    shard = keys.shard_of(account)
    bucket = queue.dedupe_bucket()
    async with queue.node_of(account).pipeline(transaction=True) as tx:
        for b in (bucket, bucket - 1):
            tx.hget(keys.dedupe(account, b), event_id)
        tx.lindex(keys.in_flight(account), 0)
        tx.hmget(keys.attempt(account), "n", "token")
        tx.get(keys.lock(account))
        tx.get(keys.fence(account))
        tx.pttl(keys.lock(account))
        tx.lrange(keys.pending(account), 0, -1)
        tx.hget(keys.totals(account), "last_acked_seq")
        tx.lrange(keys.dead(shard), 0, -1)
        (
            seen,
            seen_before,
            flying,
            (attempt, taker),
            held,
            fenced,
            lease_ms,
            pending,
            last,
            dead,
        ) = await tx.execute()
    found: dict[str, Any] = {"account_id": account, "event_id": event_id}
    if flying is not None and (event := orjson.loads(flying))["id"] == event_id:
        owner = None
        if held is not None and int(fenced) - int(held) + 1 == int(taker or 0):
            owner = {"token": int(taker), "lease_remaining_ms": max(0, lease_ms)}
        return {
            **found,
            "state": "in_flight",
            "seq": event["seq"],
            "attempt": int(attempt or 1),
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
    letters = [e for e in map(orjson.loads, dead) if e["account"] == account]
    for entry in reversed(letters):
        if entry["event_id"] == event_id:
            return {
                **found,
                "state": "dead",
                "seq": entry["seq"],
                "attempts": entry["attempts"],
                "error": entry["error"],
                "dead_ns": entry["dead_ns"],
                "replays": entry.get("replays", 0),
            }
    seq = seen or seen_before
    if seq is not None and last is not None and int(seq) <= int(last):
        return {**found, "state": "acked", "seq": int(seq)}
    return None
