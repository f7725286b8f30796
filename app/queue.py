"""The engine: push, claim (MULTI INCR+EXPIRE), take, ack, nack, renew, release, reap."""

import enum
import functools
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.connection import TRANSIENT, timed
from app.keys import Keys
from app.scripts import SHAS, Scripts
from app.settings import Settings

T = TypeVar("T")
Arg = bytes | int | str
LOCK, FENCE = 2, 3  # positions in Keys.account()
REAP_CHUNK = 500


@dataclass(frozen=True, slots=True)
class Event:
    """One delivery of an event to a handler, with its attempt number and fencing token."""

    account: int
    seq: int
    event_id: str
    payload: Any
    enqueued_ns: int
    attempt: int
    token: int


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event as a producer hands it in."""

    account: int
    event_id: str
    payload: Any = None


@dataclass(frozen=True, slots=True)
class PushResult:
    """What push made of one event: queued with its seq, or a duplicate of an earlier seq."""

    queued: bool
    seq: int


class Step(enum.Enum):
    """What a slot does after a script that did not hand it an event."""

    RELEASED = "released"  # account given up with work left (another slot takes it)
    DRAINED = "drained"  # account given up empty
    RETRY = "retry"  # failed event back at the head, account still owned
    LOST = "lost"  # the lease was gone: the script changed nothing


@dataclass(frozen=True, slots=True)
class Won:
    """An account a claim locked whose head event is still to be taken (by `Queue.take`)."""

    account: int
    token: int


Next = Event | Step
_STEPS = {s.value.encode(): s for s in Step}


class ClaimInterrupted(RedisError):
    """The claim's MULTI was sent but its reply was lost: `Queue.resume_claim` finds out."""

    def __init__(self, accounts: list[int], claim_id: str, cause: Exception) -> None:
        super().__init__(f"claim {claim_id} interrupted: {cause}")
        self.accounts = accounts
        self.claim_id = claim_id


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
    """Per-account ordered queue on one Redis; every multi-key step is one Lua script."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.keys = Keys(settings.namespace)
        self._timeout_s = settings.socket_timeout_s
        self.scripts = Scripts(redis, self._timeout_s)
        self._order = settings.claim_order
        self._lease_ms = settings.lease_ms
        # Score difference that makes a slot switch accounts: events of backlog for `longest`.
        self._margin = settings.switch_margin if self._order == "longest" else 1
        self._dedupe_ms = max(1, round(settings.dedupe_seconds * 1000))
        self._push_keys = [self.keys.ready, self.keys.stats, self.keys.active]
        self._push_prefixes = self.keys.push_prefixes()
        self._rand: Callable[[], str] = _random_score if self._order == "random" else _no_score
        # Encoded once per account: redis-py would encode every key of every call again.
        self._account_keys: Callable[[int], list[bytes]] = functools.lru_cache(maxsize=1 << 16)(
            lambda account: [key.encode() for key in self.keys.account(account)]
        )

    async def push_many(self, events: Sequence[NewEvent]) -> list[PushResult]:
        """Queue events in one script call (all or none); results in the order given."""
        now_ns = time.time_ns()
        bucket = now_ns // 1_000_000 // self._dedupe_ms
        args: list[str | int | bytes] = [
            *self._push_prefixes,
            *(bucket, bucket - 1, 2 * self._dedupe_ms, self._order, random.randrange(1 << 31)),
        ]
        for event in events:
            body = b'"enq_ns":%d,"id":%b,"p":%b}' % (
                now_ns,
                orjson.dumps(event.event_id),
                orjson.dumps(event.payload),
            )
            args += (event.account, event.event_id, body)
        reply: list[int] = await self.scripts.call("push", self._push_keys, args)
        return [PushResult(bool(reply[i]), int(reply[i + 1])) for i in range(0, len(reply), 2)]

    async def claim(self, n: int, block_s: float) -> list[Event | Won]:
        """Claim up to `n` accounts, best first, and take the head event of each.

        Pops the ready index without blocking; when it is empty, blocks up to `block_s` for one
        (`block_s=0`: returns at once). A popped account whose claim reply is lost is not
        claimed by anyone and not ready: the reaper puts it back.
        Each popped account is then locked by the MULTI INCR+EXPIRE block: the INCR that returns
        1 wins, and the fence INCR beside it is the winner's token. The take script runs in the
        same block, so a claim costs two round trips. A random claim id marks what this claim
        took; when the MULTI's reply is lost, `ClaimInterrupted` carries it and the accounts for
        `resume_claim`. An account won whose take failed comes back as `Won`.
        """
        accounts = await self._pop(n, block_s)
        if not accounts:
            return []
        claim_id = os.urandom(8).hex()
        try:
            async with self.redis.pipeline(transaction=True) as tx:
                for account in accounts:
                    keys = self._account_keys(account)
                    tx.incr(keys[LOCK])
                    tx.pexpire(keys[LOCK], self._lease_ms, nx=True)
                    tx.incr(keys[FENCE])
                    argv = self._argv(account, "claim", claim_id)
                    tx.evalsha(SHAS["take"], len(keys), *keys, *argv)
                replies = await self._timed(tx.execute(raise_on_error=False))
        except TRANSIENT as exc:
            raise ClaimInterrupted(accounts, claim_id, exc) from exc
        claimed: list[Event | Won] = []
        for account, part in zip(accounts, _parts(replies), strict=True):
            if part.lock != 1:
                continue
            if isinstance(part.taken, Exception):  # NOSCRIPT (Redis restarted) or a fault
                claimed.append(Won(account, part.token))
                continue
            step = self._next(account, part.token, part.taken)
            if isinstance(step, Event):
                claimed.append(step)
        return claimed

    async def _pop(self, n: int, block_s: float) -> list[int]:
        popped = cast(
            list[tuple[bytes, float]], await self._timed(self.redis.zpopmin(self.keys.ready, n))
        )
        if not popped and block_s > 0:
            got = cast(
                tuple[bytes, bytes, float] | None,
                await self._timed(self.redis.bzpopmin(self.keys.ready, timeout=block_s)),
            )
            popped = [(got[1], got[2])] if got else []
        return [int(member) for member, _ in popped]

    async def resume_claim(self, accounts: Sequence[int], claim_id: str) -> list[Event]:
        """The events a claim whose reply was lost took; the accounts it did not win and no
        one holds go back into the ready index. Safe to call again."""
        calls = [(self._account_keys(a), self._argv(a, "resume", claim_id)) for a in accounts]
        replies = await self.scripts.batch("take", calls)
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
        """Settle a failed event: back to the head for a retry, or into dead letters when `dead`."""
        entry = _dead_entry(event, error) if dead else b""
        return self._settle("nack", event, want_next, (entry,))

    async def release(
        self, account: int, token: int, event: Event | None = None, ran: bool = True
    ) -> Next:
        """Give an owned account up; the in-flight `event` goes back to the head, and its
        attempt is not counted when it never `ran`."""
        seq, attempt = (event.seq, event.attempt) if event else (0, 0)
        return await self._call("release", account, token, (seq, attempt, b"1" if ran else b"0"))

    async def renew(self, held: Sequence[tuple[int, int]]) -> list[bool]:
        """Extend the leases of (account, token) pairs; False where the lease was already lost."""
        calls = [(self._account_keys(a), (token, self._lease_ms)) for a, token in held]
        return [bool(r) for r in await self.scripts.batch("renew", calls)]

    async def reap(self) -> int:
        """Make orphaned accounts (work, no owner, not ready) ready again; returns how many."""
        reaped = 0
        cursor = 0
        while True:
            cursor, members = await self._timed(
                self.redis.sscan(self.keys.active, cursor, count=REAP_CHUNK)
            )
            calls = [
                (self._account_keys(int(m)), (int(m), self._order, self._rand())) for m in members
            ]
            if calls:
                reaped += sum(await self.scripts.batch("reap", calls))
            if cursor == 0:
                return reaped

    async def try_reaper_lock(self, ttl_s: float) -> bool:
        """Whether this caller runs the reaper now (one consumer per interval)."""
        ttl_ms = max(1, round(ttl_s * 1000))
        return bool(await self._timed(self.redis.set(self.keys.reaper, b"1", nx=True, px=ttl_ms)))

    async def register(self, member: str) -> None:
        """Record a live consumer as `host:pid:slots` with the time of this heartbeat."""
        await self._timed(self.redis.zadd(self.keys.consumers, {member: time.time()}))

    async def unregister(self, member: str) -> None:
        """Forget a consumer that stopped."""
        await self._timed(self.redis.zrem(self.keys.consumers, member))

    async def live_consumers(self, within_s: float) -> dict[str, int]:
        """`host:pid` -> slots of each consumer that sent a heartbeat within the last `within_s`."""
        since = time.time() - within_s
        members = cast(
            list[bytes],
            await self._timed(self.redis.zrangebyscore(self.keys.consumers, since, "+inf")),
        )
        return {name.decode(): int(slots) for name, slots in (m.rsplit(b":", 1) for m in members)}

    async def stats(self) -> dict[str, int]:
        """Counters plus the sizes of the ready index, active set and dead letters."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.stats)
            pipe.zcard(self.keys.ready)
            pipe.scard(self.keys.active)
            pipe.llen(self.keys.dead)
            counters, ready, active, dead_letters = await self._timed(pipe.execute())
        names = ("accepted", "acked", "nacked", "dead", "redelivered")
        totals = {name: int(counters.get(name.encode(), 0)) for name in names}
        return {**totals, "ready": ready, "active": active, "dead_letters": dead_letters}

    async def waiting(self, id_prefix: str) -> int:
        """How many pending or in-flight events have an event_id starting with `id_prefix`."""
        accounts = [
            int(a)
            for a in cast(set[bytes], await self._timed(self.redis.smembers(self.keys.active)))
        ]
        async with self.redis.pipeline(transaction=False) as pipe:
            for account in accounts:
                pipe.lrange(self.keys.pending(account), 0, -1)
                pipe.lrange(self.keys.in_flight(account), 0, -1)
            lists = cast(list[list[bytes]], await self._timed(pipe.execute()))
        needle = b'"id":' + orjson.dumps(id_prefix)[:-1]
        return sum(needle in body for bodies in lists for body in bodies)

    async def drained(self) -> bool:
        """True when no account has pending or in-flight events."""
        return int(await self._timed(self.redis.scard(self.keys.active))) == 0

    def _settle(
        self, name: str, event: Event, want_next: bool, extra: tuple[bytes, ...]
    ) -> Awaitable[Next]:
        """ack and nack: ARGV 5 seq, 6 attempt, 7 want next, 8 switch margin, then `extra`."""
        want = b"1" if want_next else b"0"
        args: tuple[Arg, ...] = (event.seq, event.attempt, want, self._margin, *extra)
        return self._call(name, event.account, event.token, args)

    async def _call(self, name: str, account: int, token: int, args: tuple[Arg, ...]) -> Next:
        reply = await self.scripts.call(
            name, self._account_keys(account), self._argv(account, token, *args)
        )
        return self._next(account, token, reply)

    def _argv(self, account: int, token: int | str, *args: Arg) -> tuple[Arg, ...]:
        """ARGV of every account script but reap: 1 account, 2 fencing token (or take's mode),
        3 claim order, 4 random score, then the script's own."""
        return (account, token, self._order, self._rand(), *args)

    async def _timed(self, round_trip: Awaitable[T]) -> T:
        return await timed(self._timeout_s, round_trip)

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
            enqueued_ns=body["enq_ns"],
            attempt=int(reply[2]),
            token=token,
        )


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
            "error": error[:1000],
            "payload": event.payload,
            "enqueued_ns": event.enqueued_ns,
            "dead_ns": time.time_ns(),
        }
    )
