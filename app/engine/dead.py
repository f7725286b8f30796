"""Operator actions on dead letters: list, replay and purge, by account or event id or all.

The API and the CLI call these, so both do exactly the same thing."""

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio.client import Pipeline

from app.engine.events import body_after_seq
from app.engine.queue import Queue
from app.engine.shards import each_shard

CHUNK = 500  # dead letters per script call: thousands are settled without stalling Redis


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters: of one account, with one of these event ids, both, or (neither
    given) all of them."""

    account: int | None = None
    event_ids: Collection[str] | None = None

    def __contains__(self, entry: dict[str, Any]) -> bool:
        if self.account is not None and entry["account"] != self.account:
            return False
        return self.event_ids is None or entry["event_id"] in self.event_ids


async def dead_letters(
    queue: Queue, offset: int = 0, limit: int | None = None, selection: Selection | None = None
) -> tuple[int, list[dict[str, Any]]]:
    """How many dead letters `selection` matches, and the page [offset, offset + limit) of
    them, oldest first over all shards. Without a filter, each shard's length is the count
    and only the first offset + limit of each shard are read (the dashboard asks every
    second)."""
    selection = selection or Selection()
    end = None if limit is None else offset + limit
    if selection == Selection() and end is not None:
        keys = queue.keys

        def read(pipe: Pipeline, shard: int) -> None:
            pipe.llen(keys.dead(shard))
            pipe.lrange(keys.dead(shard), 0, end - 1)

        shards = await each_shard(queue, read)
        total = sum(length for length, _ in shards)
        chosen = [orjson.loads(entry) for _, page in shards for entry in page]
    else:
        chosen = [entry for _, entry, _ in await _matching(queue, selection)]
        total = len(chosen)
    chosen.sort(key=lambda entry: entry["dead_ns"])
    return total, chosen[offset:end]


async def replay(queue: Queue, selection: Selection) -> int:
    """Queue the selected dead letters again, ids and payloads intact, each at the head of its
    account's list in seq order (ahead of what is pending); a parked account goes on. Their
    deliveries are logged as replays. Returns how many were replayed."""
    return await _replay_or_purge(queue, selection, replay=True)


async def purge(queue: Queue, selection: Selection) -> int:
    """Delete the selected dead letters; returns how many."""
    return await _replay_or_purge(queue, selection, replay=False)


async def _replay_or_purge(queue: Queue, selection: Selection, replay: bool) -> int:
    by_shard: dict[int, list[tuple[int, int, bytes, bytes]]] = {}
    for shard, entry, raw in await _matching(queue, selection):
        body = _body(entry) if replay else b""
        by_shard.setdefault(shard, []).append((entry["account"], -entry["seq"], raw, body))
    done = 0
    for shard, items in by_shard.items():
        # Per account newest first: each goes to the head, so they end up in seq order.
        items.sort()
        calls = [(account, raw, body) for account, _, raw, body in items]
        for start in range(0, len(calls), CHUNK):
            done += await queue.settle_dead(shard, replay, calls[start : start + CHUNK])
    return done


async def _matching(queue: Queue, selection: Selection) -> list[tuple[int, dict[str, Any], bytes]]:
    """(shard, parsed entry, entry as stored) of every dead letter `selection` matches."""
    keys = queue.keys
    if selection.account is not None:
        shards = [keys.shard_of(selection.account)]
    else:
        shards = list(range(keys.shards))

    def read(pipe: Pipeline, shard: int) -> None:
        pipe.lrange(keys.dead(shard), 0, -1)

    found = []
    for shard, (entries,) in zip(shards, await each_shard(queue, read, shards), strict=True):
        for raw in entries:
            entry = orjson.loads(raw)
            if entry in selection:
                found.append((shard, entry, raw))
    return found


def _body(entry: dict[str, Any]) -> bytes:
    """The pending-list body of a dead letter queued again: its seq, id and payload as they
    were, and how many times it has been replayed."""
    tail = body_after_seq(entry["event_id"], entry["payload"], entry.get("replays", 0) + 1)
    return b'{"seq":%d,%b' % (entry["seq"], tail)
