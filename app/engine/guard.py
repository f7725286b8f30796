"""Start-up and memory guards: Redis must keep what it is given (noeviction), and pushes stop
short of a master's maxmemory so that claims and acks keep the room they need to drain."""

import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from app.engine.connection import Nodes
from app.engine.events import LayoutMismatch, RedisFull, UnsafeRedis
from app.engine.keys import Keys

HIGH_WATER = 0.9  # share of a master's maxmemory above which pushes are refused
ROOM_CHECK_S = 1.0  # how long a master's memory reading is trusted


class Guard:
    """Checks the namespace's number of shards and every master's eviction policy at start-up,
    and each push against its master's maxmemory. `timed` bounds a round trip (the queue's
    own, so faults are noticed)."""

    def __init__(
        self,
        nodes: Nodes,
        timed: Callable[[Awaitable[Any]], Awaitable[Any]],
        allow_eviction: bool,
    ) -> None:
        self._nodes = nodes
        self._timed = timed
        self._allow_eviction = allow_eviction
        self._memory: dict[Redis, tuple[float, int, int]] = {}  # at, used_memory, maxmemory

    async def check_layout(self, keys: Keys) -> float:
        """The namespace's number of shards, recorded on first use, must be this process's.
        Returns since when (unix ms) every event id is kept in the shards' ids hashes: per-
        account ids of an older version may be alive until DEDUPE_SECONDS x 2 after it (0: a
        namespace made by this version, which never had them)."""
        node = self._nodes.for_key(keys.layout)
        async with node.pipeline(transaction=False) as pipe:
            pipe.set(keys.layout, keys.shards, nx=True)
            pipe.get(keys.layout)
            created, recorded = await self._timed(pipe.execute())
        if int(recorded) != keys.shards:
            raise LayoutMismatch(
                f"namespace {keys.namespace!r} on this Redis has {int(recorded)} shards"
                f" and this process SHARDS={keys.shards}: set SHARDS={int(recorded)}, or"
                " use another EVQ_NAMESPACE (to change it, drain the queue and delete the key"
                f" {keys.layout!r})"
            )
        marker = self._nodes.for_key(keys.ids_since)
        async with marker.pipeline(transaction=False) as pipe:
            pipe.set(
                keys.ids_since, "new" if created else str(time.time_ns() // 1_000_000), nx=True
            )
            pipe.get(keys.ids_since)
            _, since = await self._timed(pipe.execute())
        return 0.0 if since == b"new" else float(since)

    async def check_eviction(self, warn: bool = True) -> None:
        """Every master must keep what it is given: `maxmemory-policy noeviction` (read from
        INFO, which managed services answer where CONFIG is disabled). Any other policy can
        evict queued events, leases or dedupe buckets; EVQ_ALLOW_EVICTION=1 runs anyway, with
        a warning unless `warn` is off (the periodic check of a running process)."""
        for master in self._nodes.masters():
            where = master.connection_pool.connection_kwargs
            address = f"{where.get('host', '?')}:{where.get('port', '?')}"
            memory = await self.memory_info(master)
            if memory is None:
                if not warn:
                    continue
                print(
                    f"evq: WARNING: Redis at {address} answers no INFO (a proxy?), so its"
                    " maxmemory-policy cannot be checked: it must be noeviction",
                    file=sys.stderr,
                )
                continue
            policy = memory.get("maxmemory_policy", "noeviction")
            if policy == "noeviction":
                continue
            message = (
                f"Redis at {address} has maxmemory-policy {policy}: it may evict queued events,"
                " leases and event ids when memory runs short. Set it to noeviction (redis.conf,"
                " or CONFIG SET maxmemory-policy noeviction; on a managed service, its parameter"
                " group), or set EVQ_ALLOW_EVICTION=1 to run anyway and risk losing events"
            )
            if not self._allow_eviction:
                raise UnsafeRedis(message)
            if warn:
                print(f"evq: WARNING: {message}", file=sys.stderr)

    async def memory_info(self, node: Redis) -> dict[str, Any] | None:
        """INFO memory of `node`; None where INFO is not served (some proxies, fakeredis)."""
        try:
            return cast(dict[str, Any], await self._timed(node.info("memory")))
        except ResponseError as exc:
            if "unknown command" not in str(exc):
                raise
            return None

    async def room(self, node: Redis, adding: int) -> None:
        """Raise RedisFull when `adding` more bytes of events would take `node` above
        HIGH_WATER of its maxmemory. The reading is kept for ROOM_CHECK_S and grown by twice
        what is pushed meanwhile (keys, ids, list overhead); near the line it is taken again."""
        now = time.monotonic()
        at, used, limit = self._memory.get(node, (0.0, 0, 0))
        growth = 2 * adding
        stale = now - at > ROOM_CHECK_S or (limit and used + growth > limit * HIGH_WATER)
        if stale:
            memory = await self.memory_info(node) or {}
            at, used = now, int(memory.get("used_memory", 0))
            limit = int(memory.get("maxmemory", 0))
            policy = memory.get("maxmemory_policy", "noeviction")
            if policy != "noeviction" and not self._allow_eviction:
                raise UnsafeRedis(
                    f"Redis switched to maxmemory-policy {policy}: it may evict queued events;"
                    " pushes are refused until it is noeviction again (or EVQ_ALLOW_EVICTION=1)"
                )
        if limit and used + growth > limit * HIGH_WATER:
            self._memory[node] = (at, used, limit)
            raise RedisFull(
                f"Redis uses {used:,} of its maxmemory {limit:,} bytes: this push would take it"
                f" past {HIGH_WATER:.0%}, which pushes leave to the consumers' claims and acks"
            )
        self._memory[node] = (at, used + growth, limit)
