"""Operator actions on dead letters: list, replay and purge, by account or event id or all.

Each shard keeps its dead letters in a hash by id (`<account>:<event_id>`) with their order in
a sorted set, so one dead letter is read, replayed or purged in a few commands however many
there are. Selections that name no id (an account's, or all) are read with HSCAN, a bounded
step at a time. The API and the CLI call these, so both do exactly the same thing."""

import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import orjson
from redis.asyncio.client import Pipeline

from app.engine.events import body_after_seq
from app.engine.shards import each_shard

if TYPE_CHECKING:
    from app.engine.queue import Queue

CHUNK = 500  # dead letters per script call or scan step: Redis never stalls on thousands


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


def letter_id(account: int, event_id: str) -> str:
    """The field of a dead letter in its shard's hash (as _lib.lua's nack writes it)."""
    return f"{account}:{event_id}"


async def dead_letters(
    queue: "Queue", offset: int = 0, limit: int | None = None, selection: Selection | None = None
) -> tuple[int, list[dict[str, Any]]]:
    """How many dead letters `selection` matches, and the page [offset, offset + limit) of
    them, oldest first over all shards. Without a filter, each shard's size is the count and
    only the first offset + limit ids of each shard are read (the dashboard asks every
    second)."""
    selection = selection or Selection()
    end = None if limit is None else offset + limit
    if selection == Selection() and end is not None:
        keys = queue.keys

        def read(pipe: Pipeline, shard: int) -> None:
            pipe.hlen(keys.dead(shard))
            pipe.zrange(keys.dead_order(shard), 0, end - 1)

        shards = await each_shard(queue, read)
        total = sum(size for size, _ in shards)
        wanted = {shard: ids for shard, (_, ids) in enumerate(shards) if ids}
        pages = await each_shard(
            queue, lambda pipe, shard: pipe.hmget(keys.dead(shard), wanted[shard]), wanted
        )
        chosen = [orjson.loads(entry) for (found,) in pages for entry in found if entry]
    else:
        chosen = [entry for _, _, entry, _ in await _matching(queue, selection)]
        total = len(chosen)
    chosen.sort(key=lambda entry: entry["dead_ns"])
    return total, chosen[offset:end]


async def find(queue: "Queue", account: int, event_id: str) -> dict[str, Any] | None:
    """The dead letter of one event, or None: one HGET."""
    keys = queue.keys
    node = queue.node_of(account)
    raw = await queue.timed(
        node.hget(keys.dead(keys.shard_of(account)), letter_id(account, event_id))
    )
    return None if raw is None else dict(orjson.loads(raw))


async def replay(queue: "Queue", selection: Selection) -> int:
    """Queue the selected dead letters again, ids and payloads intact, each at the head of its
    account's list in seq order (ahead of what is pending); a parked account goes on. Their
    deliveries are logged as replays. Returns how many were replayed."""
    return await _replay_or_purge(queue, selection, replay=True)


async def purge(queue: "Queue", selection: Selection) -> int:
    """Delete the selected dead letters; returns how many."""
    return await _replay_or_purge(queue, selection, replay=False)


async def _replay_or_purge(queue: "Queue", selection: Selection, replay: bool) -> int:
    by_shard: dict[int, list[tuple[int, int, str, bytes, bytes]]] = {}
    for shard, letter, entry, raw in await _matching(queue, selection):
        body = _body(entry) if replay else b""
        by_shard.setdefault(shard, []).append((entry["account"], -entry["seq"], letter, raw, body))
    done = 0
    for shard, items in by_shard.items():
        # Per account newest first: each goes to the head, so they end up in seq order.
        items.sort()
        calls = [(account, letter, raw, body) for account, _, letter, raw, body in items]
        for start in range(0, len(calls), CHUNK):
            done += await queue.settle_dead(shard, replay, calls[start : start + CHUNK])
    return done


async def _matching(
    queue: "Queue", selection: Selection
) -> list[tuple[int, str, dict[str, Any], bytes]]:
    """(shard, id, parsed entry, entry as stored) of every dead letter `selection` matches:
    by HMGET when it names the account and the ids, else by HSCAN over the shards it may
    touch (an account's with MATCH on its prefix)."""
    keys = queue.keys
    if selection.account is not None and selection.event_ids is not None:
        shard = keys.shard_of(selection.account)
        ids = [letter_id(selection.account, event_id) for event_id in selection.event_ids]
        node = queue.node(shard)
        found = []
        for start in range(0, len(ids), CHUNK):
            part = ids[start : start + CHUNK]
            raws = cast(list[bytes | None], await queue.timed(node.hmget(keys.dead(shard), part)))
            found += [(shard, i, raw) for i, raw in zip(part, raws, strict=True) if raw]
        return [(shard, i, orjson.loads(raw), raw) for shard, i, raw in found]
    if selection.account is not None:
        shards, match = [keys.shard_of(selection.account)], f"{selection.account}:*"
    else:
        shards, match = list(range(keys.shards)), "*"
    out = []
    for shard in shards:
        node = queue.node(shard)
        async for letter, raw in node.hscan_iter(keys.dead(shard), match=_glob(match), count=CHUNK):
            entry = orjson.loads(raw)
            if entry in selection:
                out.append((shard, letter.decode(), entry, raw))
    return out


def _glob(pattern: str) -> str:
    """`pattern` with the glob characters of an account id escaped, but a trailing `*`."""
    head, star = (pattern[:-1], "*") if pattern.endswith("*") else (pattern, "")
    return re.sub(r"([\\[\]*?])", r"\\\1", head) + star


def _body(entry: dict[str, Any]) -> bytes:
    """The pending-list body of a dead letter queued again: its seq, id and payload as they
    were, and how many times it has been replayed."""
    tail = body_after_seq(entry["event_id"], entry["payload"], entry.get("replays", 0) + 1)
    return b'{"seq":%d,%b' % (entry["seq"], tail)
