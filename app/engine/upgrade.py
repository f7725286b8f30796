"""What a process moves, once, when it opens a queue that an older version wrote: the dead
letters kept in one list per shard (now a hash by id and an order), the attempt hashes
kept apart from each account's state (now fields of its state hash, which also mirrors the
account's pause), and the lists a batch in flight moved to (it now stays at the head). Safe
to run from many processes at once. Stop the consumers of the older version first: they
would go on writing the old layout."""

import asyncio
import re
import time
from typing import TYPE_CHECKING

from app.engine.shards import each_shard

if TYPE_CHECKING:
    from app.engine.queue import Queue

MOVE_CHUNK = 500  # old-layout dead letters moved per script call
SCAN_COUNT = 1000  # keys a SCAN step looks at
# Per-account keys of older versions: taken over by the state hash, and the in-flight list
# whose batch now stays at the head of the pending list.
LEGACY_KINDS = ("attempt", "fence", "inflight")


async def move_legacy(queue: "Queue") -> None:
    """Both moves."""
    await move_dead_letters(queue)
    await move_attempts(queue)


async def move_dead_letters(queue: "Queue") -> int:
    """Move the dead letters an older version kept in one list per shard into the hash and
    order kept now, MOVE_CHUNK per script call; how many were moved. One pipelined read per
    master when there is nothing to move."""
    keys = queue.keys
    lengths = await each_shard(queue, lambda pipe, shard: pipe.llen(keys.legacy_dead(shard)))
    moved = 0
    for shard, (waiting,) in enumerate(lengths):
        names = [keys.legacy_dead(shard), keys.dead(shard), keys.dead_order(shard)]
        left = int(waiting)
        while left:
            after = int(
                await queue.scripts.call(queue.node(shard), "dead_move", names, (MOVE_CHUNK,))
            )
            moved, left = moved + max(0, left - after), after
    return moved


async def move_attempts(queue: "Queue") -> int:
    """Move every attempt hash and fence of a version before the state hash into its
    account's state hash, and every in-flight list back to the head of its pending list
    (`attempt_move.lua`), and mirror every pause in the state; how many accounts had one to
    move. It scans each master once per namespace: when it has, the
    namespace's marker says so, and a later open reads only that."""
    keys = queue.keys
    marker = queue.nodes.for_key(keys.state_since)
    if await queue.timed(marker.exists(keys.state_since)):
        return 0
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", f"{{{keys.namespace}:") + "*}:*"
    moved = 0
    for master in queue.nodes.masters():
        cursor = 0
        while True:
            cursor, found = await queue.timed(master.scan(cursor, pattern, SCAN_COUNT))
            accounts = {account for key in found if (account := _legacy_account(key))}
            calls = [
                queue.scripts.call(
                    queue.node_of(account),
                    "attempt_move",
                    [
                        *queue.account_keys(account),
                        keys.legacy_attempt(account),
                        keys.legacy_fence(account),
                        keys.legacy_in_flight(account),
                    ],
                    (),
                )
                for account in accounts
            ]
            moved += sum(int(reply) for reply in await asyncio.gather(*calls))
            if cursor == 0:
                break
    # Accounts paused before the state hash mirrored their pause get the mirror (pause.lua
    # sets it on an account already paused, without changing why).
    pauses = await each_shard(queue, lambda pipe, shard: pipe.hkeys(keys.paused(shard)))
    await asyncio.gather(
        *(queue.pause(int(account)) for (accounts,) in pauses for account in accounts)
    )
    await queue.timed(marker.set(keys.state_since, time.time_ns() // 1_000_000))
    return moved


def _legacy_account(key: bytes | str) -> int | None:
    """The account of an attempt hash, a fence or an in-flight list of an older layout,
    `{<tag>}:<kind>:<account>`; None for any other key."""
    kind, _, account = (
        (key.decode() if isinstance(key, bytes) else key).rpartition("}:")[2].partition(":")
    )
    return int(account) if kind in LEGACY_KINDS and account.isdigit() else None
