"""What the engine hands in and out: events as pushed and delivered, the steps a script answers
instead of an event, and the errors callers act on."""

import enum
import time
from dataclasses import dataclass
from typing import Any

import orjson
from redis.exceptions import OutOfMemoryError, RedisError

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
    """One delivery of an event to a handler, with its attempt number and fencing token.

    A take hands out a batch: its first event, which carries the account's next events of the
    same batch in `rest` (each at its first attempt). The batch is settled as one, through
    its first event."""

    account: int
    seq: int
    event_id: str
    payload: Any
    attempt: int
    token: int
    replays: int = 0  # how many times an operator replayed it from the dead letters
    rest: tuple["Event", ...] = ()

    @property
    def enqueued_ns(self) -> int:
        return enqueued_ns(self.seq)

    @property
    def batch(self) -> tuple["Event", ...]:
        """The events handed out together, this one first, in seq order."""
        return (self, *self.rest)


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event as a producer hands it in."""

    account: int
    event_id: str
    payload: Any = None


@dataclass(frozen=True, slots=True)
class PushResult:
    """What push made of one event: queued with its seq, a duplicate of an earlier seq,
    refused (seq 0) because its account's backlog was at MAX_BACKLOG_PER_ACCOUNT, or (with
    `Queue.push_each`) not known to be stored because its shard's master failed (`fault`)."""

    queued: bool
    seq: int
    refused: bool = False
    fault: Exception | None = None

    @property
    def duplicate(self) -> bool:
        return not self.queued and not self.refused and self.fault is None


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


def step_of(account: int, token: int, reply: list[Any]) -> Next:
    """What an account script's reply hands the slot: `{'event', body, attempt, more
    bodies...}` as an `Event` (the batch's first, the others in its `rest`), anything else as
    its `Step`."""
    if reply[0] != b"event":
        return _STEPS[reply[0]]
    rest = tuple(_event(account, token, body, 1) for body in reply[3:])
    return _event(account, token, reply[1], int(reply[2]), rest)


def _event(
    account: int, token: int, stored: bytes, attempt: int, rest: tuple[Event, ...] = ()
) -> Event:
    body = orjson.loads(stored)
    return Event(
        account=account,
        seq=body["seq"],
        event_id=body["id"],
        payload=body["p"],
        attempt=attempt,
        token=token,
        replays=body.get("r", 0),
        rest=rest,
    )


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
    """Redis cannot keep what evq gives it: it may evict keys (maxmemory-policy other than
    noeviction), so queued events could vanish, leases and event ids with them; or it is older
    than 7.0 and runs no Redis Functions."""


def dead_entry(event: Event, error: str) -> bytes:
    """A dead letter as stored: the event, its attempts, the error and when it died."""
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
