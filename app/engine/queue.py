"""The engine: push, claim (MULTI INCR+EXPIRE), take, ack, nack, renew, release, reap.

Accounts are spread over SHARDS shards (`Keys`); every script and every MULTI touches one
shard, so one Redis and a Redis Cluster run this same code. Calls go to the master of the
shard's slot (`Nodes.for_slot`), one pipelined round trip per master where a step spans shards.
"""

import asyncio
import contextlib
import enum
import functools
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar, cast

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError, OutOfMemoryError, RedisError, ResponseError

from app.engine.connection import TRANSIENT, Nodes, backoff, timed
from app.engine.keys import ACCOUNT_KINDS, Keys
from app.engine.scripts import Scripts
from app.settings import Settings

T = TypeVar("T")
Arg = bytes | int | str
# Positions in Keys.account().
PENDING, LOCK, FENCE, SEQ = (ACCOUNT_KINDS.index(kind) for kind in ("user", "lock", "fence", "seq"))
HIGH_WATER = 0.9  # share of a master's maxmemory above which pushes are refused
ROOM_CHECK_S = 1.0  # how long a master's memory reading is trusted
HEARTBEATS_KEPT_S = 3600.0  # a consumer silent this long is forgotten
REAP_CHUNK = 500


MAX_ACCOUNT_ID = 2**53 - 1  # exact in every JSON client
# The counters of a shard's stats hash, as `stats` sums them.
COUNTED = ("accepted", "refused", "acked", "nacked", "dead", "redelivered", "replayed", "purged")


def body_after_seq(event_id: str, payload: Any, replays: int = 0) -> bytes:
    """A stored event as it follows its opening `{"seq":N,` (push.lua writes that part):
    `"id":...,"p":...}`, and `"r"`, how many times it was replayed, when it was."""
    if replays:
        return b'"id":%b,"p":%b,"r":%d}' % (orjson.dumps(event_id), orjson.dumps(payload), replays)
    return b'"id":%b,"p":%b}' % (orjson.dumps(event_id), orjson.dumps(payload))


def seq_of(body: bytes) -> int:
    """The seq of a stored event, which starts `{"seq":N,`."""
    return int(body[7 : body.index(b",")])


def enqueued_ns(seq: int) -> int:
    """When an event with this seq was queued: a seq is the Redis clock in microseconds at
    the push, raised where needed to stay above the account's previous seq (push.lua)."""
    return seq * 1000


@dataclass(frozen=True, slots=True)
class Event:
    """One delivery of an event to a handler, with its attempt number and fencing token."""

    account: int
    seq: int
    event_id: str
    payload: Any
    attempt: int
    token: int
    replays: int = 0  # how many times an operator replayed it from the dead letters

    @property
    def enqueued_ns(self) -> int:
        return enqueued_ns(self.seq)


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event as a producer hands it in."""

    account: int
    event_id: str
    payload: Any = None


@dataclass(frozen=True, slots=True)
class PushResult:
    """What push made of one event: queued with its seq, a duplicate of an earlier seq, or
    refused (seq 0) because its account's backlog was at MAX_BACKLOG_PER_ACCOUNT."""

    queued: bool
    seq: int
    refused: bool = False

    @property
    def duplicate(self) -> bool:
        return not self.queued and not self.refused


class Step(enum.Enum):
    """What a slot does after a script that did not hand it an event."""

    RELEASED = "released"  # account given up with work left (another slot takes it)
    DRAINED = "drained"  # account given up empty
    RETRY = "retry"  # failed event back at the head, account still owned
    LOST = "lost"  # the lease was gone: the script changed nothing


@dataclass(frozen=True, slots=True)
class Won:
    """An account a claim locked but whose take did not run (the node had lost its scripts):
    its token is the bare fence, not raised to the clock, so the slot gives it back at once
    (`Queue.release`) and a later claim takes it properly."""

    account: int
    token: int


Next = Event | Step
_STEPS = {s.value.encode(): s for s in Step}


class ClaimInterrupted(RedisError):
    """A shard's claim MULTI was sent but its reply was lost: `Queue.resume_claim` finds out
    what it took of `accounts`; `claimed` is what the other shards' MULTIs took."""

    def __init__(
        self, accounts: list[int], claim_id: str, cause: Exception, claimed: list["Event | Won"]
    ) -> None:
        super().__init__(f"claim {claim_id} interrupted: {cause}")
        self.accounts = accounts
        self.claim_id = claim_id
        self.claimed = claimed


class LayoutMismatch(RuntimeError):
    """The namespace was set up with another number of shards than this process has."""


class RedisFull(OutOfMemoryError):
    """A master is above HIGH_WATER of its maxmemory: pushes wait, so claims and acks keep the
    room they need to drain (Redis refuses a MULTI and most writes once it is full)."""


class UnsafeRedis(RuntimeError):
    """Redis may evict keys (maxmemory-policy other than noeviction): queued events could
    vanish, leases and event ids with them."""


class _Claimed(NamedTuple):
    """The replies of one account's part of the claim MULTI."""

    lock: Any
    expire: Any
    token: Any
    taken: Any


def _random_score() -> str:
    return repr(random.random())


def _no_score() -> str:
    return "0"


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
        # Score difference that makes a slot switch accounts: events of backlog for `longest`.
        self._margin = settings.switch_margin if self._order == "longest" else 1
        self._dedupe_ms = max(1, round(settings.dedupe_seconds * 1000))
        self._rand: Callable[[], str] = _random_score if self._order == "random" else _no_score
        self._slot = [self.keys.slot(shard) for shard in range(settings.shards)]
        self._push_keys = [
            [key.encode() for key in (*self.keys.shard_keys(shard)[:3], self.keys.paused(shard))]
            for shard in range(settings.shards)
        ]
        # Encoded once per account: redis-py would encode every key of every call again.
        self._account_keys: Callable[[int], list[bytes]] = functools.lru_cache(maxsize=1 << 16)(
            lambda account: [key.encode() for key in self.keys.account(account)]
        )
        # The best ready score in any shard as of this process's latest look ('' for none):
        # ack and nack compare it with the account's own, beside the score of its own shard.
        self._best_elsewhere = ""
        self._work = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._opened = False
        self._closing = False
        self._allow_eviction = settings.allow_eviction
        self._memory: dict[Redis, tuple[float, int, int]] = {}  # at, used_memory, maxmemory
        self._dead_max = settings.dead_letters_max
        self._cap = settings.max_backlog_per_account or 0
        self._park = b"1" if settings.poison_policy == "park" else b"0"

    async def open(self, connections: int = 1) -> None:
        """Learn where the shards live, check the namespace's number of shards (recording it
        on first use), and open `connections` connections to every master."""
        await self.nodes.start()
        await self._check_eviction()
        layout = self.keys.layout
        node = self.nodes.for_key(layout)
        async with node.pipeline(transaction=False) as pipe:
            pipe.set(layout, self.keys.shards, nx=True)
            pipe.get(layout)
            _, recorded = await self._timed(pipe.execute())
        if int(recorded) != self.keys.shards:
            raise LayoutMismatch(
                f"namespace {self.keys.namespace!r} on this Redis has {int(recorded)} shards"
                f" and this process SHARDS={self.keys.shards}: set SHARDS={int(recorded)}, or"
                " use another EVQ_NAMESPACE (to change it, drain the queue and delete the key"
                f" {layout!r})"
            )
        self._opened = True
        with contextlib.suppress(*TRANSIENT):
            pings = [master.ping() for master in self.nodes.masters() for _ in range(connections)]
            await self._timed(asyncio.gather(*pings))

    async def _check_eviction(self) -> None:
        """Every master must keep what it is given: `maxmemory-policy noeviction` (read from
        INFO, which managed services answer where CONFIG is disabled). Any other policy can
        evict queued events, leases or dedupe buckets; EVQ_ALLOW_EVICTION=1 runs anyway."""
        for master in self.nodes.masters():
            where = master.connection_pool.connection_kwargs
            address = f"{where.get('host', '?')}:{where.get('port', '?')}"
            memory = await self._memory_info(master)
            if memory is None:
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
            print(f"evq: WARNING: {message}", file=sys.stderr)

    async def _memory_info(self, node: Redis) -> dict[str, Any] | None:
        """INFO memory of `node`; None where INFO is not served (some proxies, fakeredis)."""
        try:
            return cast(dict[str, Any], await self._timed(node.info("memory")))
        except ResponseError as exc:
            if "unknown command" not in str(exc):
                raise
            return None

    async def ping(self) -> None:
        """Every master answers (else a connection fault)."""
        await self._timed(asyncio.gather(*(master.ping() for master in self.nodes.masters())))

    async def aclose(self) -> None:
        self._closing = True
        # Cancelled again until it ends: on Python 3.11 a cancel that lands while a Redis
        # call completes can be swallowed.
        while self._listener is not None and not self._listener.done():
            self._listener.cancel()
            await asyncio.wait([self._listener], timeout=0.1)
        await self.nodes.aclose()

    def node(self, shard: int) -> Redis:
        """The client of the master that serves `shard`."""
        return self.nodes.for_slot(self._slot[shard])

    def node_of(self, account: int) -> Redis:
        """The client of the master that serves `account`."""
        return self.node(self.keys.shard_of(account))

    async def push_many(self, events: Sequence[NewEvent]) -> list[PushResult]:
        """Queue events, one script call per shard in one round trip per master; results in
        the order given. Each shard's part is queued whole or not at all: after an error,
        sending the same batch again is safe, as event ids already accepted are duplicates.
        Refused whole (RedisFull) when it would take a master above HIGH_WATER of its
        maxmemory; an event whose account already has MAX_BACKLOG_PER_ACCOUNT pending is
        refused on its own (`refused`, nothing of it stored)."""
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
        await _every([self._room(node, size) for node, size in adding.items()])
        replies = await _every(
            [self.scripts.call(node, "push", keys, args) for node, keys, args in parts]
        )
        results: list[PushResult] = [PushResult(False, 0)] * len(events)
        for picks, reply in zip(by_shard.values(), replies, strict=True):
            for n, i in enumerate(picks):
                code = reply[2 * n]
                results[i] = PushResult(code == 1, int(reply[2 * n + 1]), code == 2)
        return results

    def dedupe_bucket(self) -> int:
        """The dedupe time bucket of now: an event id is remembered in its bucket's hash and
        looked up there and in the one before."""
        return time.time_ns() // 1_000_000 // self._dedupe_ms

    async def _room(self, node: Redis, adding: int) -> None:
        """Raise RedisFull when `adding` more bytes of events would take `node` above
        HIGH_WATER of its maxmemory. The reading is kept for ROOM_CHECK_S and grown by twice
        what is pushed meanwhile (keys, ids, list overhead); near the line it is taken again."""
        now = time.monotonic()
        at, used, limit = self._memory.get(node, (0.0, 0, 0))
        growth = 2 * adding
        stale = now - at > ROOM_CHECK_S or (limit and used + growth > limit * HIGH_WATER)
        if stale:
            memory = await self._memory_info(node) or {}
            at, used = now, int(memory.get("used_memory", 0))
            limit = int(memory.get("maxmemory", 0))
        if limit and used + growth > limit * HIGH_WATER:
            self._memory[node] = (at, used, limit)
            raise RedisFull(
                f"Redis uses {used:,} of its maxmemory {limit:,} bytes: this push would take it"
                f" past {HIGH_WATER:.0%}, which pushes leave to the consumers' claims and acks"
            )
        self._memory[node] = (at, used + growth, limit)

    def _push_args(
        self, shard: int, events: Sequence[NewEvent], bucket: int
    ) -> tuple[list[bytes], list[str | int | bytes]]:
        """KEYS and ARGV of push.lua for one shard's events."""
        keys = list(self._push_keys[shard])
        args: list[str | int | bytes] = [
            2 * self._dedupe_ms,
            self._order,
            random.randrange(1 << 31),
            self._cap,
        ]
        numbers: dict[int, int] = {}
        for event in events:
            number = numbers.get(event.account)
            if number is None:
                number = numbers[event.account] = len(numbers) + 1
                own = self._account_keys(event.account)
                keys += (own[PENDING], own[LOCK], own[SEQ])
                keys += (self.keys.dedupe(event.account, b).encode() for b in (bucket, bucket - 1))
            args += (
                number,
                event.account,
                event.event_id,
                body_after_seq(event.event_id, event.payload),
            )
        return keys, args

    async def claim(self, n: int, block_s: float) -> list[Event | Won]:
        """Claim up to `n` accounts, best first over all shards, and take the head event of each.

        Reads the tops of every shard's ready index (one pipelined round trip per master).
        When all are empty it waits up to `block_s` for a shard to announce work (pub/sub, no
        polling), and returns nothing. Otherwise it locks the best `n` with the MULTI
        INCR+EXPIRE block, one per shard, in parallel: the INCR that returns 1 wins, and the
        fence INCR beside it is the winner's token. The take script runs in the same block
        (taking the account out of the ready index), so a claim costs two round trips. A
        random claim id marks what this claim took; when a MULTI's reply is lost,
        `ClaimInterrupted` carries it and that shard's accounts for `resume_claim`.
        """
        self._listen()
        self._work.clear()
        ranked = await self._tops(n, n)
        if not ranked:
            if block_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._work.wait(), block_s)
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
                keys = self._account_keys(account)
                pipe.incr(keys[LOCK])
                pipe.pexpire(keys[LOCK], self._lease_ms, nx=True)
                pipe.incr(keys[FENCE])
                argv = self._argv(account, "claim", claim_id)
                pipe.evalsha(self.scripts.shas["take"], len(keys), *keys, *argv)
            pipe.execute_command("EXEC")

        # MULTI, what it queued and EXEC, in one round trip on one connection of the shard's
        # master (so a WAIT of REPLICA_ACKS can follow on the same connection).
        replies = (await self.scripts.send(node, multi))[-1]
        if isinstance(replies, Exception):  # EXECABORT: a command was refused, nothing ran
            raise replies
        claimed: list[Event | Won] = []
        for account, part in zip(accounts, _parts(replies), strict=True):
            if part.lock != 1:
                continue
            if isinstance(part.taken, Exception):  # NOSCRIPT (new master, restart) or a fault
                claimed.append(Won(account, part.token))
                continue
            step = self._next(account, int(part.taken[-1]), part.taken)
            if isinstance(step, Event):
                claimed.append(step)
        if any(isinstance(part.taken, NoScriptError) for part in _parts(replies)):
            with contextlib.suppress(*TRANSIENT):
                await self.scripts.load(node)
        return claimed

    async def _tops(self, n: int, claiming: int) -> list[tuple[float, int, int]]:
        """(score, shard, account) of the best `n` ready accounts of every shard, best first;
        remembers the best that `claiming` claims would leave waiting."""
        tops = await self.each_shard(
            lambda pipe, shard: pipe.zrange(self.keys.ready(shard), 0, n - 1, withscores=True)
        )
        ranked = sorted(
            (score, shard, int(member))
            for shard, (entries,) in enumerate(tops)
            for member, score in entries
        )
        self._best_elsewhere = repr(ranked[claiming][0]) if len(ranked) > claiming else ""
        return ranked

    async def look(self) -> None:
        """Update this process's view of the best waiting account (for the ack's decision)
        while no slot is idle to claim it."""
        await self._tops(1, 0)

    def _listen(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.ensure_future(self._wakeups())

    async def _wakeups(self) -> None:
        """Sets `_work` on every announcement of a shard that became ready, from a
        subscription to the namespace's wake channel (on any master: a cluster broadcasts
        PUBLISH to every node). Subscribes again after a fault, and then claims once."""
        pauses = backoff()
        while not self._closing:
            pubsub = random.choice(self.nodes.masters()).pubsub(ignore_subscribe_messages=True)
            try:
                await self._timed(pubsub.subscribe(self.keys.wake_channel))
                pauses = backoff()
                self._work.set()
                async for message in pubsub.listen():
                    if message is not None:
                        self._work.set()
            except TRANSIENT as exc:
                self.nodes.noticed(exc)
                self._work.set()
                await asyncio.sleep(next(pauses))
            finally:
                with contextlib.suppress(*TRANSIENT):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def each_shard(
        self, queue: Callable[[Pipeline, int], object], shards: Iterable[int] | None = None
    ) -> list[list[Any]]:
        """Per shard (all of them by default), the replies of the commands `queue(pipe, shard)`
        adds to its master's pipeline; one round trip per master, all in parallel."""
        wanted = list(range(self.keys.shards) if shards is None else shards)
        by_node: dict[Redis, list[int]] = {}
        for shard in wanted:
            by_node.setdefault(self.node(shard), []).append(shard)

        async def send(node: Redis, shards: list[int]) -> list[tuple[int, list[Any]]]:
            async with node.pipeline(transaction=False) as pipe:
                counts = []
                for shard in shards:
                    before = len(pipe)
                    queue(pipe, shard)
                    counts.append(len(pipe) - before)
                replies = await self._timed(pipe.execute())
            out, at = [], 0
            for shard, count in zip(shards, counts, strict=True):
                out.append((shard, replies[at : at + count]))
                at += count
            return out

        answered = dict(
            pair
            for pairs in await _every([send(node, shards) for node, shards in by_node.items()])
            for pair in pairs
        )
        return [answered[shard] for shard in wanted]

    async def resume_claim(self, accounts: Sequence[int], claim_id: str) -> list[Event]:
        """The events a claim whose reply was lost took; the accounts it did not win and no
        one holds go back into the ready index. Safe to call again."""
        replies = await _every(
            [self._script(a, "take", self._argv(a, "resume", claim_id)) for a in accounts]
        )
        found = [
            self._next(account, int(reply[3]), reply[:3])
            for account, reply in zip(accounts, replies, strict=True)
            if reply[0] == b"event"
        ]
        return [event for event in found if isinstance(event, Event)]

    async def take(self, account: int, token: int) -> Next:
        """Take the head event of an owned account (after a retry backoff); sent again, the
        same event and attempt."""
        return await self._call("take", account, token, ())

    # ack and nack hand back the script call's coroutine rather than awaiting it: every frame
    # between a slot and its reply is resumed once per event, so the per-event path keeps few.

    def ack(self, event: Event, want_next: bool = True) -> Awaitable[Next]:
        """Settle a handled event; hands back the account's next event when it should go on."""
        return self._settle("ack", event, want_next, ())

    def nack(self, event: Event, error: str, dead: bool, want_next: bool = True) -> Awaitable[Next]:
        """Settle a failed event: back to the head for a retry, or into dead letters when `dead`
        (each shard keeps the newest DEAD_LETTERS_MAX); with POISON_POLICY=park a dead letter
        pauses its account."""
        entry = _dead_entry(event, error) if dead else b""
        return self._settle("nack", event, want_next, (entry, self._dead_max, self._park))

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
        self, shard: int, replay: bool, entries: Sequence[tuple[int, bytes, bytes]]
    ) -> int:
        """Replay or purge (`replay` False) dead letters of one shard, given as (account, entry
        exactly as stored, body to queue again); each account's newest first. Entries no longer
        there are skipped. Returns how many were settled."""
        keys: list[bytes | str] = [self.keys.dead(shard), *self._push_keys[shard]]
        args: list[Arg] = [
            b"replay" if replay else b"purge",
            self._order,
            random.randrange(1 << 31),
        ]
        numbers: dict[int, int] = {}
        for account, entry, body in entries:
            number = numbers.get(account)
            if number is None:
                number = numbers[account] = len(numbers) + 1
                own = self._account_keys(account)
                keys += (own[PENDING], own[LOCK])
            args += (number, account, entry, body)
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
        renewed = await _every([self._script(a, "renew", (t, self._lease_ms)) for a, t in held])
        return [bool(r) for r in renewed]

    async def reap(self) -> int:
        """Make orphaned accounts (work, no owner, not ready) ready again; returns how many."""
        counts = await _every([self._reap_shard(shard) for shard in range(self.keys.shards)])
        return sum(counts)

    async def _reap_shard(self, shard: int) -> int:
        reaped = 0
        cursor = 0
        node = self.node(shard)
        while True:
            cursor, members = await self._timed(
                node.sscan(self.keys.active(shard), cursor, count=REAP_CHUNK)
            )
            calls = [
                self._script(int(m), "reap", (int(m), self._order, self._rand())) for m in members
            ]
            reaped += sum(int(r) for r in await _every(calls))
            if cursor == 0:
                return reaped

    async def try_reaper_lock(self, ttl_s: float) -> bool:
        """Whether this caller runs the reaper now (one consumer per interval)."""
        ttl_ms = max(1, round(ttl_s * 1000))
        key = self.keys.reaper
        return bool(await self._timed(self.nodes.for_key(key).set(key, b"1", nx=True, px=ttl_ms)))

    async def heartbeat(
        self, member: str, busy: int, counts: dict[str, int], sums: dict[str, float]
    ) -> None:
        """Record a live consumer `host:pid:slots` with the time of this heartbeat and its busy
        slots, fold its measurements since the last one into the metrics hash, and forget the
        consumers silent for HEARTBEATS_KEPT_S (they died without unregistering)."""
        key, now = self.keys.consumers, time.time()
        async with self.nodes.for_key(key).pipeline(transaction=False) as pipe:
            pipe.zadd(key, {member: now})
            pipe.hset(self.keys.busy, member.rsplit(":", 1)[0], busy)
            for field, count in counts.items():
                pipe.hincrby(self.keys.metrics, field, count)
            for field, total in sums.items():
                pipe.hincrbyfloat(self.keys.metrics, field, total)
            pipe.zremrangebyscore(key, "-inf", now - HEARTBEATS_KEPT_S)
            await self._timed(pipe.execute())

    async def unregister(self, member: str) -> None:
        """Forget a consumer that stopped."""
        key = self.keys.consumers
        async with self.nodes.for_key(key).pipeline(transaction=False) as pipe:
            pipe.zrem(key, member)
            pipe.hdel(self.keys.busy, member.rsplit(":", 1)[0])
            await self._timed(pipe.execute())

    async def live_consumers(self, within_s: float) -> dict[str, int]:
        """`host:pid` -> slots of each consumer that sent a heartbeat within the last `within_s`."""
        return {name: slots for name, (slots, _, _) in (await self.consumers(within_s)).items()}

    async def consumers(self, within_s: float) -> dict[str, tuple[int, int, float]]:
        """`host:pid` -> (slots, busy slots, seconds since its heartbeat) of each consumer that
        sent one within the last `within_s`."""
        now = time.time()
        key = self.keys.consumers
        async with self.nodes.for_key(key).pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(key, now - within_s, "+inf", withscores=True)
            pipe.hgetall(self.keys.busy)
            members, busy = await self._timed(pipe.execute())
        found = {}
        for member, at in cast(list[tuple[bytes, float]], members):
            name, slots = member.decode().rsplit(":", 1)
            found[name] = (int(slots), int(busy.get(name.encode(), 0)), max(0.0, now - at))
        return found

    async def measurements(self) -> dict[str, float]:
        """What the consumers folded into the metrics hash (app/metrics.py names the fields)."""
        key = self.keys.metrics
        folded = cast(dict[bytes, bytes], await self._timed(self.nodes.for_key(key).hgetall(key)))
        return {field.decode(): float(value) for field, value in folded.items()}

    async def stats(self) -> dict[str, int]:
        """Counters, summed over the shards: events accepted, refused (MAX_BACKLOG_PER_ACCOUNT),
        acked, nacked, dead-lettered, redelivered, replayed and purged; the backlog (pending and
        in flight, from the counters: accepted + replayed - acked - dead); the sizes of the
        ready indexes, active sets and dead letters; and how many accounts are paused by an
        operator or parked by a poison event."""

        def queue(pipe: Pipeline, shard: int) -> None:
            pipe.hgetall(self.keys.stats(shard))
            pipe.zcard(self.keys.ready(shard))
            pipe.scard(self.keys.active(shard))
            pipe.llen(self.keys.dead(shard))
            pipe.hvals(self.keys.paused(shard))

        sizes = ("ready", "active", "dead_letters", "paused", "parked")
        totals = dict.fromkeys((*COUNTED, "backlog", *sizes), 0)
        for counters, ready, active, dead_letters, paused in await self.each_shard(queue):
            for name in COUNTED:
                totals[name] += int(counters.get(name.encode(), 0))
            totals["ready"] += ready
            totals["active"] += active
            totals["dead_letters"] += dead_letters
            totals["parked"] += paused.count(b"parked")
            totals["paused"] += len(paused) - paused.count(b"parked")
        totals["backlog"] = (
            totals["accepted"] + totals["replayed"] - totals["acked"] - totals["dead"]
        )
        return totals

    async def waiting(self, id_prefix: str) -> int:
        """How many pending or in-flight events have an event_id starting with `id_prefix`."""
        members = await self.each_shard(lambda pipe, shard: pipe.smembers(self.keys.active(shard)))
        accounts = {shard: [int(a) for a in found] for shard, (found,) in enumerate(members)}

        def queue(pipe: Pipeline, shard: int) -> None:
            for account in accounts[shard]:
                pipe.lrange(self.keys.pending(account), 0, -1)
                pipe.lrange(self.keys.in_flight(account), 0, -1)

        lists = await self.each_shard(queue, [s for s, found in accounts.items() if found])
        needle = b'"id":' + orjson.dumps(id_prefix)[:-1]
        return sum(needle in body for shard in lists for bodies in shard for body in bodies)

    async def drained(self) -> bool:
        """True when no account has pending or in-flight events."""
        sizes = await self.each_shard(lambda pipe, shard: pipe.scard(self.keys.active(shard)))
        return not any(size for (size,) in sizes)

    def _settle(
        self, name: str, event: Event, want_next: bool, extra: tuple[Arg, ...]
    ) -> Awaitable[Next]:
        """ack and nack: ARGV 5 seq, 6 attempt, 7 want next, 8 switch margin, 9 the best ready
        score elsewhere, then `extra`."""
        want = b"1" if want_next else b"0"
        args: tuple[Arg, ...] = (
            event.seq,
            event.attempt,
            want,
            self._margin,
            self._best_elsewhere,
            *extra,
        )
        return self._call(name, event.account, event.token, args)

    async def _call(self, name: str, account: int, token: int, args: tuple[Arg, ...]) -> Next:
        reply = await self._script(account, name, self._argv(account, token, *args))
        return self._next(account, token, reply)

    def _script(self, account: int, name: str, args: Sequence[Arg]) -> Awaitable[Any]:
        """One account script on the account's master (auto-pipelined with the others)."""
        return self.scripts.call(self.node_of(account), name, self._account_keys(account), args)

    def _argv(self, account: int, token: int | str, *args: Arg) -> tuple[Arg, ...]:
        """ARGV of every account script but reap and renew: 1 account, 2 fencing token (or
        take's mode), 3 claim order, 4 random score, then the script's own."""
        return (account, token, self._order, self._rand(), *args)

    async def _timed(self, round_trip: Awaitable[T]) -> T:
        try:
            return await timed(self._timeout_s, round_trip)
        except TRANSIENT as exc:
            self.nodes.noticed(exc)
            raise

    @staticmethod
    def _next(account: int, token: int, reply: list[Any]) -> Next:
        if reply[0] != b"event":
            return _STEPS[reply[0]]
        body = orjson.loads(reply[1])
        return Event(
            account=account,
            seq=body["seq"],
            event_id=body["id"],
            payload=body["p"],
            attempt=int(reply[2]),
            token=token,
            replays=body.get("r", 0),
        )


@contextlib.asynccontextmanager
async def open_queue(
    settings: Settings, max_connections: int = 64, consumer: bool = False, connections: int = 1
) -> AsyncIterator["Queue"]:
    """A `Queue` on the Redis or Redis Cluster of REDIS_URL, checked (`Queue.open`) and closed
    at the end. The one way an entrypoint reaches Redis."""
    queue = Queue(Nodes(settings, max_connections, consumer), settings)
    try:
        await queue.open(connections)
        yield queue
    finally:
        await queue.aclose()


async def _every(calls: Sequence[Awaitable[T]]) -> list[T]:
    """The results of all `calls`, run together; the first error once all have finished."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast(list[T], results)


def _parts(replies: Sequence[Any]) -> list[_Claimed]:
    """The claim MULTI's replies, four per account."""
    return [_Claimed(*replies[i : i + 4]) for i in range(0, len(replies), 4)]


def _dead_entry(event: Event, error: str) -> bytes:
    return orjson.dumps(
        {
            "account": event.account,
            "seq": event.seq,
            "event_id": event.event_id,
            "attempts": event.attempt,
            "replays": event.replays,
            "error": error[:1000],
            "payload": event.payload,
            "enqueued_ns": event.enqueued_ns,
            "dead_ns": time.time_ns(),
        }
    )
