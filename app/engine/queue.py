"""The engine: push, claim (MULTI INCR+EXPIRE), take, ack, nack, renew, release, reap.

Accounts are spread over SHARDS shards (`Keys`); every script and every MULTI touches one
shard, so one Redis and a Redis Cluster run this same code. Calls go to the master of the
shard's hash slot (`Nodes.for_hash_slot`), one pipelined round trip per master where a step
spans shards.
"""

import asyncio
import collections
import contextlib
import functools
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from app.engine import upgrade
from app.engine.connection import TRANSIENT, Nodes, backoff, timed
from app.engine.events import (
    ClaimInterrupted,
    Event,
    NewEvent,
    Next,
    PushResult,
    Won,
    body_after_seq,
    dead_entry,
    step_of,
)
from app.engine.guard import Guard
from app.engine.keys import ACCOUNT_KINDS, Keys
from app.engine.scripts import Scripts, missing
from app.engine.settles import Settles
from app.engine.shards import each_shard, every
from app.engine.wakeups import Wakeups
from app.settings import Settings

T = TypeVar("T")
Arg = bytes | int | str
# Positions in Keys.account().
PENDING, LOCK, STATE, SEQ = (
    ACCOUNT_KINDS.index(kind) for kind in ("user", "lock", "totals", "seq")
)
REAP_CHUNK = 500


class Queue:
    """Per-account ordered queue over the shards; every multi-key step is one Lua script."""

    def __init__(self, nodes: Nodes, settings: Settings) -> None:
        self.nodes = nodes
        self.keys = Keys(settings.namespace, settings.shards)
        self._timeout_s = settings.socket_timeout_s
        self.scripts = Scripts(
            nodes, self._timeout_s, settings.account_idle_ms, settings.replica_acks
        )
        self._order = settings.claim_order
        self._lease_ms = settings.lease_ms
        # Score difference that makes a slot switch accounts: events of backlog for `longest`
        # (a consumer raises it for handlers much faster than a claim).
        self.switch_margin = settings.switch_margin if self._order == "longest" else 1
        # The most events a claim, take or settle hands out to one slot at once (a consumer
        # sets it from its handler's pace, up to BATCH_MAX).
        self.batch_size = 1
        self._dedupe_ms = max(1, round(settings.dedupe_seconds * 1000))
        self._hash_slot = [self.keys.hash_slot(shard) for shard in range(settings.shards)]
        self._push_keys = [
            [key.encode() for key in (*self.keys.shard_keys(shard)[:3], self.keys.paused(shard))]
            for shard in range(settings.shards)
        ]
        # Encoded once per account: redis-py would encode every key of every call again.
        self.account_keys: Callable[[int], list[bytes]] = functools.lru_cache(maxsize=1 << 16)(
            lambda account: [key.encode() for key in self.keys.account(account)]
        )
        # The best ready score in any shard as of this process's latest look ('' for none):
        # ack and nack compare it with the account's own, beside the score of its own shard.
        self.best_elsewhere = ""
        self._wakeups = Wakeups(nodes, self.keys.wake_channel, self.timed)
        self._opened = False
        # Until when (unix ms) per-account ids of an older version may be alive (0: never).
        self._legacy_ids_until_ms = 0.0
        self.guard = Guard(nodes, self.timed, settings.allow_eviction)
        self._cap = settings.max_backlog_per_account or 0
        self._settles = Settles(self, settings)

    async def open(self, connections: int = 1) -> None:
        """Learn where the shards live, check the namespace's number of shards (recording it
        on first use), load the functions where a master lacks them, and open `connections`
        connections to every master."""
        await self.nodes.start()
        await self.guard.check_eviction()
        await asyncio.gather(*(self.scripts.ensure(master) for master in self.nodes.masters()))
        ids_since_ms = await self.guard.check_layout(self.keys)
        self._legacy_ids_until_ms = ids_since_ms + 2 * self._dedupe_ms if ids_since_ms else 0.0
        await upgrade.move_legacy(self)
        self._opened = True
        with contextlib.suppress(*TRANSIENT):
            pings = [master.ping() for master in self.nodes.masters() for _ in range(connections)]
            await self.timed(asyncio.gather(*pings))

    async def ping(self) -> None:
        """Every master answers (else a connection fault)."""
        await self.timed(asyncio.gather(*(master.ping() for master in self.nodes.masters())))

    async def aclose(self) -> None:
        await self._wakeups.aclose()
        await self.nodes.aclose()

    def node(self, shard: int) -> Redis:
        """The client of the master that serves `shard`."""
        return self.nodes.for_hash_slot(self._hash_slot[shard])

    def node_of(self, account: int) -> Redis:
        """The client of the master that serves `account`."""
        return self.node(self.keys.shard_of(account))

    async def push_many(self, events: Sequence[NewEvent]) -> list[PushResult]:
        """Queue events, one script call per shard in one round trip per master; results in
        the order given. Each shard's part is queued whole or not at all: after an error,
        sending the same batch again is safe, as event ids already accepted are duplicates.
        Refused whole (RedisFull) when it would take a master above HIGH_WATER of its
        maxmemory; an event whose account already has MAX_BACKLOG_PER_ACCOUNT pending is
        refused on its own (`refused`, nothing of it stored). A master's fault is raised."""
        results = await self.push_each(events)
        for result in results:
            if result.fault is not None:
                raise result.fault
        return results

    async def push_each(self, events: Sequence[NewEvent]) -> list[PushResult]:
        """As `push_many`, but shard by shard: when a master fails (a connection fault, too
        few replicas for REPLICA_ACKS), the events of its shards come back with that `fault`
        (not known to be stored: send them again) and the other shards' events are queued."""
        if not self._opened:  # the API starts while Redis is down: check the shards first
            await self.open()
        bucket = self.dedupe_bucket()
        by_shard: dict[int, list[int]] = {}
        for i, event in enumerate(events):
            by_shard.setdefault(self.keys.shard_of(event.account), []).append(i)
        parts = [
            (self.node(shard), *self._push_args(shard, [events[i] for i in picks], bucket))
            for shard, picks in by_shard.items()
        ]
        adding: dict[Redis, int] = {}
        for node, _, args in parts:
            adding[node] = adding.get(node, 0) + sum(len(a) for a in args if isinstance(a, bytes))
        rooms = await _each([self.guard.room(node, size) for node, size in adding.items()])
        down = {n: r for n, r in zip(adding, rooms, strict=True) if isinstance(r, Exception)}
        sending = [part for part in parts if part[0] not in down]
        calls = [self.scripts.call(node, "push", keys, args) for node, keys, args in sending]
        sent = iter(await _each(calls))
        results: list[PushResult] = [PushResult(False, 0)] * len(events)
        for (node, _, _), picks in zip(parts, by_shard.values(), strict=True):
            reply: Any = down[node] if node in down else next(sent)
            for n, i in enumerate(picks):
                if isinstance(reply, Exception):
                    results[i] = PushResult(False, 0, fault=reply)
                else:
                    code = reply[2 * n]
                    results[i] = PushResult(code == 1, int(reply[2 * n + 1]), code == 2)
        return results

    def dedupe_bucket(self) -> int:
        """The dedupe time bucket of now: an event id is remembered in its bucket's hash and
        looked up there and in the one before."""
        return time.time_ns() // 1_000_000 // self._dedupe_ms

    def _push_args(
        self, shard: int, events: Sequence[NewEvent], bucket: int
    ) -> tuple[list[bytes | str], list[str | int | bytes]]:
        """KEYS and ARGV of push.lua for one shard's events."""
        legacy = time.time_ns() // 1_000_000 < self._legacy_ids_until_ms
        keys: list[bytes | str] = [*self._push_keys[shard]]
        keys += (self.keys.ids(shard, b) for b in (bucket, bucket - 1))
        args: list[str | int | bytes] = [
            2 * self._dedupe_ms,
            self._order,
            random.randrange(1 << 31),
            self._cap,
            b"1" if legacy else b"0",
        ]
        numbers: dict[int, int] = {}
        for event in events:
            number = numbers.get(event.account)
            if number is None:
                number = numbers[event.account] = len(numbers) + 1
                own = self.account_keys(event.account)
                keys += (own[PENDING], own[LOCK], own[SEQ])
                if legacy:
                    keys += (self.keys.legacy_ids(event.account, b) for b in (bucket, bucket - 1))
            args += (
                number,
                event.account,
                event.event_id,
                body_after_seq(event.event_id, event.payload),
            )
        return keys, args

    async def claim(self, n: int, block_s: float) -> list[Event | Won]:
        """Claim up to `n` accounts, best first over all shards, and take a batch of each (up
        to `batch_size` events from the head).

        Reads the tops of every shard's ready index (one pipelined round trip per master).
        When all are empty it waits up to `block_s` for a shard to announce work (pub/sub, no
        polling), and returns nothing. Otherwise it locks the best `n` with the MULTI
        INCR+EXPIRE block, one per shard, in parallel: the INCR that returns 1 wins, and the
        fence HINCRBY beside it is the winner's token. The take script runs in the same block
        (taking the account out of the ready index), so a claim costs two round trips. A
        random claim id marks what this claim took; when a MULTI's reply is lost,
        `ClaimInterrupted` carries it and that shard's accounts for `resume_claim`.
        """
        self._wakeups.clear()
        ranked = await self._tops(n, n)
        if not ranked:
            if block_s > 0:
                await self._wakeups.wait(block_s)
            return []
        chosen: dict[int, list[int]] = {}
        for _, shard, account in ranked[:n]:
            chosen.setdefault(shard, []).append(account)
        claim_id = os.urandom(8).hex()
        parts = await asyncio.gather(
            *(self._lock(shard, accounts, claim_id) for shard, accounts in chosen.items()),
            return_exceptions=True,
        )
        claimed = [item for part in parts if isinstance(part, list) for item in part]
        for part in parts:
            if isinstance(part, BaseException) and not isinstance(part, TRANSIENT):
                raise part
        lost = [
            account
            for part, accounts in zip(parts, chosen.values(), strict=True)
            if isinstance(part, TRANSIENT)
            for account in accounts
        ]
        if lost:
            fault = next(part for part in parts if isinstance(part, BaseException))
            raise ClaimInterrupted(lost, claim_id, cast(Exception, fault), claimed)
        return claimed

    async def _lock(self, shard: int, accounts: list[int], claim_id: str) -> list[Event | Won]:
        """One shard's claim MULTI; what it won, taken."""
        node = self.node(shard)

        def multi(pipe: Pipeline) -> None:
            pipe.execute_command("MULTI")
            for account in accounts:
                keys = self.account_keys(account)
                pipe.incr(keys[LOCK])
                pipe.pexpire(keys[LOCK], self._lease_ms, nx=True)
                pipe.hincrby(keys[STATE], "fence", 1)
                argv = self._argv(account, "claim", claim_id, self.batch_size)
                self.scripts.queue(pipe, "take", keys, argv)
            pipe.execute_command("EXEC")

        # MULTI, what it queued and EXEC, in one round trip on one connection of the shard's
        # master (so a WAIT of REPLICA_ACKS can follow on the same connection).
        replies = (await self.scripts.send(node, multi))[-1]
        if isinstance(replies, Exception):  # EXECABORT: a command was refused, nothing ran
            raise replies
        claimed: list[Event | Won] = []
        # Four replies per account: INCR of the lock, PEXPIRE, HINCRBY of the fence, the take.
        parts = [replies[i : i + 4] for i in range(0, len(replies), 4)]
        for account, (lock, _, token, taken) in zip(accounts, parts, strict=True):
            if lock != 1:
                continue
            if isinstance(taken, Exception):  # a missing function (new master, restart), a fault
                claimed.append(Won(account, token))
                continue
            step = step_of(account, int(taken[-1]), taken[:-1])
            if isinstance(step, Event):
                claimed.append(step)
        if any(missing(part[3]) for part in parts):
            with contextlib.suppress(*TRANSIENT):
                await self.scripts.load(node)
        return claimed

    async def _tops(self, n: int, claiming: int) -> list[tuple[float, int, int]]:
        """(score, shard, account) of the best ready accounts of every shard, best first:
        exact for the best `n` and for the best that `claiming` claims would leave waiting
        (remembered). A shard is read for twice its share of those; one whose last entry
        read still ranks above the last of them may hold more, and is read again for all."""
        need = max(n, claiming + 1)
        share = min(need, max(2, -(-2 * need // self.keys.shards)))
        tops = await self._ready_tops(share)
        ranked = sorted(tops)
        if share < need:
            cutoff = ranked[need - 1][0] if len(ranked) >= need else float("inf")
            last = {shard: score for score, shard, _ in ranked}  # ranked: a shard's worst last
            count = collections.Counter(shard for _, shard, _ in ranked)
            # Unread entries of a shard rank after its last one read: only a shard whose last
            # one beats the cutoff may hold better ones (ties with it are as good).
            short = {s for s, c in count.items() if c == share and last[s] < cutoff}
            if short:
                ranked = sorted(
                    [entry for entry in ranked if entry[1] not in short]
                    + await self._ready_tops(need, sorted(short))
                )
        self.best_elsewhere = repr(ranked[claiming][0]) if len(ranked) > claiming else ""
        return ranked

    async def _ready_tops(
        self, count: int, shards: Sequence[int] | None = None
    ) -> list[tuple[float, int, int]]:
        """(score, shard, account) of the best `count` ready accounts of each shard."""
        tops = await each_shard(
            self,
            lambda pipe, shard: pipe.zrange(self.keys.ready(shard), 0, count - 1, withscores=True),
            shards,
        )
        wanted = range(self.keys.shards) if shards is None else shards
        return [
            (score, shard, int(member))
            for shard, (entries,) in zip(wanted, tops, strict=True)
            for member, score in entries
        ]

    async def look(self) -> None:
        """Update this process's view of the best waiting account (for the ack's decision)
        while no slot is idle to claim it."""
        await self._tops(1, 0)

    async def resume_claim(self, accounts: Sequence[int], claim_id: str) -> list[Event]:
        """The events a claim whose reply was lost took; the accounts it did not win and no
        one holds go back into the ready index. Safe to call again."""
        replies = await every(
            [self._script(a, "take", self._argv(a, "resume", claim_id, 1)) for a in accounts]
        )
        found = [
            step_of(account, int(reply[-1]), reply[:-1])
            for account, reply in zip(accounts, replies, strict=True)
            if reply[0] == b"event"
        ]
        return [event for event in found if isinstance(event, Event)]

    async def take(self, account: int, token: int) -> Next:
        """Take a batch from the head of an owned account (after a retry backoff); sent again,
        the same batch and attempt."""
        return await self._call("take", account, token, (b"", self.batch_size))

    # ack and nack hand back the script call's coroutine rather than awaiting it: every frame
    # between a slot and its reply is resumed once per event, so the per-event path keeps few.

    def ack(self, event: Event, want_next: bool = True, count: int = 0) -> Awaitable[Next]:
        """Settle the batch of `event` (its first) as handled: all of it, or its first `count`
        events (the others go back to the head uncounted). Hands back the account's next batch
        when it should go on."""
        return self._settles.add(b"ack", event, want_next, count or len(event.batch))

    def nack(
        self, event: Event, error: str, dead: bool, want_next: bool = True, handled: int = 0
    ) -> Awaitable[Next]:
        """Settle the batch of `event` (its first): its first `handled` events as handled, the
        next one as failed, back to the head for a retry or into dead letters when `dead` (each
        shard keeps the newest DEAD_LETTERS_MAX; with POISON_POLICY=park a dead letter pauses
        its account); the events after it go back to the head uncounted."""
        failed = event.batch[handled]
        entry = dead_entry(failed, error) if dead else b""
        return self._settles.add(b"nack", event, want_next, handled, entry)

    async def pause(self, account: int) -> tuple[str, bool]:
        """Hold `account`: not claimed until resumed; its owner releases it after the current
        event. Returns why it was already paused ('' if it was not) and whether it is held."""
        before, held = await self._script(account, "pause", (account,))
        return before.decode(), bool(held)

    async def resume(self, account: int) -> str:
        """Make a paused or parked account claimable at once; returns why it was paused ('' if
        it was not)."""
        before, _ = await self._script(account, "resume", self._argv(account, 0))
        return str(before.decode())

    async def settle_dead(
        self, shard: int, replay: bool, entries: Sequence[tuple[int, str, bytes, bytes]]
    ) -> int:
        """Replay or purge (`replay` False) dead letters of one shard, given as (account, id,
        entry exactly as read, body to queue again); each account's newest first. Entries no
        longer stored as read are skipped. Returns how many were settled."""
        keys: list[bytes | str] = [self.keys.dead(shard), self.keys.dead_order(shard)]
        keys += self._push_keys[shard]
        args: list[Arg] = [
            b"replay" if replay else b"purge",
            self._order,
            random.randrange(1 << 31),
        ]
        numbers: dict[int, int] = {}
        for account, letter, entry, body in entries:
            number = numbers.get(account)
            if number is None:
                number = numbers[account] = len(numbers) + 1
                own = self.account_keys(account)
                keys += (own[PENDING], own[LOCK], own[STATE])
            args += (number, account, letter, entry, body)
        return int(await self.scripts.call(self.node(shard), "dead", keys, args))

    async def release(
        self, account: int, token: int, event: Event | None = None, ran: bool = True
    ) -> Next:
        """Give an owned account up; the in-flight `event` goes back to the head, and its
        attempt is not counted when it never `ran`."""
        seq, attempt = (event.seq, event.attempt) if event else (0, 0)
        return await self._call("release", account, token, (seq, attempt, b"1" if ran else b"0"))

    async def renew(self, held: Sequence[tuple[int, int]]) -> list[bool]:
        """Extend the leases of (account, token) pairs; False where the lease was already lost."""
        renewed = await every([self._script(a, "renew", (t, self._lease_ms)) for a, t in held])
        return [bool(r) for r in renewed]

    async def reap(self) -> int:
        """Make orphaned accounts (work, no owner, not ready) ready again, and forget the
        pauses of accounts whose state has expired (they hold nothing); how many were reaped."""
        counts = await every([self._reap_shard(shard) for shard in range(self.keys.shards)])
        return sum(counts)

    async def _reap_shard(self, shard: int) -> int:
        reaped = await self._sweep(shard, "sscan", self.keys.active(shard), "reap")
        await self._sweep(shard, "hscan", self.keys.paused(shard), "forget_pause")
        return reaped

    async def _sweep(self, shard: int, scan: str, key: str, script: str) -> int:
        """`script` on every account `scan` (sscan, or hscan's fields) finds in `key`,
        REAP_CHUNK at a time; the sum of its replies."""
        total, cursor, node = 0, 0, self.node(shard)
        while True:
            cursor, found = await self.timed(getattr(node, scan)(key, cursor, count=REAP_CHUNK))
            calls = [
                self._script(int(a), script, (int(a), self._order, self._rand())) for a in found
            ]
            total += sum(int(r) for r in await every(calls))
            if cursor == 0:
                return total

    async def _call(self, name: str, account: int, token: int, args: tuple[Arg, ...]) -> Next:
        reply = await self._script(account, name, self._argv(account, token, *args))
        return step_of(account, token, reply)

    def _script(self, account: int, name: str, args: Sequence[Arg]) -> Awaitable[Any]:
        """One account script on the account's master (auto-pipelined with the others)."""
        return self.scripts.call(self.node_of(account), name, self.account_keys(account), args)

    def _rand(self) -> str:
        """A random ready score for CLAIM_ORDER=random; '0', unused, for the other orders."""
        return repr(random.random()) if self._order == "random" else "0"

    def _argv(self, account: int, token: int | str, *args: Arg) -> tuple[Arg, ...]:
        """ARGV of every account script but reap and renew: 1 account, 2 fencing token (or
        take's mode), 3 claim order, 4 random score, then the script's own."""
        return (account, token, self._order, self._rand(), *args)

    async def timed(self, round_trip: Awaitable[T]) -> T:
        """`round_trip`, bounded by the Redis timeout; a fault is told to `Nodes.noticed` (a
        cluster's slot may have moved) and raised."""
        try:
            return await timed(self._timeout_s, round_trip)
        except TRANSIENT as exc:
            self.nodes.noticed(exc)
            raise


@contextlib.asynccontextmanager
async def open_queue(
    settings: Settings,
    max_connections: int = 64,
    consumer: bool = False,
    connections: int = 1,
    ride_out_s: float = 0.0,
) -> AsyncIterator["Queue"]:
    """A `Queue` on REDIS_URL, checked (`Queue.open`, connection faults ridden out for up to
    `ride_out_s`) and closed at the end. The one way an entrypoint reaches Redis."""
    queue = Queue(Nodes(settings, max_connections, consumer), settings)
    deadline, pauses = time.monotonic() + ride_out_s, backoff()
    try:
        while True:
            try:
                await queue.open(connections)
                break
            except TRANSIENT:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(next(pauses))
        yield queue
    finally:
        await queue.aclose()


async def _each(calls: Sequence[Awaitable[T]]) -> list[T | Exception]:
    """The results of all `calls`, run together; a connection fault in place of a result,
    any other error raised once all have finished."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, TRANSIENT):
            raise result
    return cast(list[T | Exception], results)
