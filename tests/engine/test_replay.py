"""Every transition sent twice (a client retry after a lost reply): the second changes nothing
and gets the same answer; a claim whose reply was lost is resumed, and a partial one kept."""

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError

from app.engine import ClaimInterrupted, Event, NewEvent, Next, Queue, Step, Won, inspect
from tests.engine.conftest import MakeQueue
from tests.support import Routed, in_flight, ready_scores, snapshot


async def claim_one(queue: Queue) -> Event:
    [event] = await queue.claim(1, 0.01)
    assert isinstance(event, Event)
    return event


async def twice(queue: Queue, call: Callable[[], Awaitable[Next]]) -> Next:
    """Send `call` twice; the second answer must equal the first and leave Redis as it was."""
    first = await call()
    before = await snapshot(queue)
    second = await call()
    assert second == first
    assert await snapshot(queue) == before
    return first


async def expire_lease(queue: Queue, account: int) -> None:
    await Routed(queue).delete(queue.keys.lock(account))


async def test_ack_handing_out_the_next_event(make_queue: MakeQueue) -> None:
    """An ack sent twice acks once and hands out the same next event both times."""
    queue = make_queue()
    await queue.push_many([NewEvent(1, "a"), NewEvent(1, "b"), NewEvent(1, "c")])
    first = await claim_one(queue)
    step = await twice(queue, lambda: queue.ack(first))
    assert isinstance(step, Event)
    assert (step.event_id, step.attempt) == ("b", 1)
    assert (await inspect.stats(queue))["acked"] == 1
    assert [orjson.loads(body)["id"] for body in await in_flight(queue, 1)] == ["b"]
    assert await Routed(queue).llen(queue.keys.pending(1)) == 2  # b in flight at the head, c


async def test_ack_that_drained_the_account(make_queue: MakeQueue) -> None:
    """The last ack sent twice: drained both times, counted once."""
    queue = make_queue()
    await queue.push_many([NewEvent(1, "a")])
    event = await claim_one(queue)
    assert await twice(queue, lambda: queue.ack(event)) is Step.DRAINED
    assert (await inspect.stats(queue))["acked"] == 1


async def test_ack_replayed_after_the_lease_ended_says_it_landed(make_queue: MakeQueue) -> None:
    """An ack whose reply was lost, sent again after the lease expired and a new owner acked
    the next event: it landed, so the answer is 'released', never 'lost'; nothing changes."""
    queue = make_queue()
    await queue.push_many([NewEvent(1, "a"), NewEvent(1, "b"), NewEvent(1, "c")])
    first = await claim_one(queue)
    second = await queue.ack(first)
    assert isinstance(second, Event)
    await expire_lease(queue, 1)
    await queue.reap()
    fresh = await claim_one(queue)
    assert (fresh.event_id, fresh.seq, fresh.attempt) == ("b", second.seq, 2)
    assert isinstance(await queue.ack(fresh), Event)
    before = await snapshot(queue)
    assert await queue.ack(first) is Step.RELEASED
    assert await queue.ack(first) is Step.RELEASED
    assert await snapshot(queue) == before
    assert await queue.ack(second) is Step.LOST  # this one never landed: refused


async def test_nack_retry(make_queue: MakeQueue) -> None:
    """A retrying nack sent twice moves the event back once; the take after it, sent twice,
    hands out attempt 2 both times."""
    queue = make_queue()
    await queue.push_many([NewEvent(1, "a"), NewEvent(1, "b")])
    event = await claim_one(queue)
    assert await twice(queue, lambda: queue.nack(event, "boom", dead=False)) is Step.RETRY
    assert (await inspect.stats(queue))["nacked"] == 1
    again = await twice(queue, lambda: queue.take(1, event.token))
    assert isinstance(again, Event)
    assert (again.event_id, again.seq, again.attempt) == ("a", event.seq, 2)
    step = await twice(queue, lambda: queue.nack(again, "boom", dead=False))
    assert step is Step.RETRY
    assert (await inspect.stats(queue))["nacked"] == 2


async def test_dead_letter_nack(make_queue: MakeQueue) -> None:
    """A dead-lettering nack sent twice stores one dead letter and hands out the next event."""
    queue = make_queue()
    await queue.push_many([NewEvent(1, "a"), NewEvent(1, "b")])
    event = await claim_one(queue)
    step = await twice(queue, lambda: queue.nack(event, "bad", dead=True))
    assert isinstance(step, Event)
    assert step.event_id == "b"
    assert await Routed(queue).hlen(queue.keys.dead(queue.keys.shard_of(1))) == 1


async def test_release(make_queue: MakeQueue) -> None:
    """A release sent twice puts the event back once and answers 'released' both times."""
    queue = make_queue()
    await queue.push_many([NewEvent(1, "a"), NewEvent(1, "b")])
    event = await claim_one(queue)
    assert await twice(queue, lambda: queue.release(1, event.token, event)) is Step.RELEASED
    assert await Routed(queue).llen(queue.keys.pending(1)) == 2


async def test_release_of_an_attempt_that_never_ran(make_queue: MakeQueue) -> None:
    """An event released before its handler ran does not count that attempt."""
    queue = make_queue()
    await queue.push_many([NewEvent(1, "a")])
    event = await claim_one(queue)
    await twice(queue, lambda: queue.release(1, event.token, event, ran=False))
    assert (await claim_one(queue)).attempt == 1


async def test_take_by_a_lost_owner(make_queue: MakeQueue) -> None:
    """A take sent twice by an owner whose lease is gone is refused both times, no change."""
    queue = make_queue()
    await queue.push_many([NewEvent(1, "a")])
    event = await claim_one(queue)
    await expire_lease(queue, 1)
    assert await twice(queue, lambda: queue.take(1, event.token)) is Step.LOST
    assert len(await in_flight(queue, 1)) == 1


async def test_renew(make_queue: MakeQueue) -> None:
    """A renew sent twice renews; after the lease is gone, both are refused."""
    queue = make_queue()
    await queue.push_many([NewEvent(1, "a")])
    event = await claim_one(queue)
    assert await queue.renew([(1, event.token)]) == await queue.renew([(1, event.token)]) == [True]
    await expire_lease(queue, 1)
    assert await queue.renew([(1, event.token)]) == await queue.renew([(1, event.token)]) == [False]


class LostReply:
    """While in use, the replies of the queue's claim MULTIs go missing: each EXEC runs (or,
    with `sent=False`, never reaches Redis) and the caller sees a connection error."""

    def __init__(self, queue: Queue, sent: bool) -> None:
        self._masters = queue.nodes.masters()
        self._sent = sent

    def __enter__(self) -> None:
        for master in self._masters:
            master.pipeline = self._pipeline(master.pipeline)  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        for master in self._masters:
            del master.pipeline

    def _pipeline(self, make: Callable[..., Pipeline]) -> Callable[..., Pipeline]:
        def pipeline(transaction: bool = True, shard_hint: Any = None) -> Pipeline:
            pipe = make(transaction=transaction, shard_hint=shard_hint)
            execute, sent = pipe.execute, self._sent

            async def lost(raise_on_error: bool = True) -> list[Any]:
                if not any(command[0][0] == "MULTI" for command in pipe.command_stack):
                    return await execute(raise_on_error=raise_on_error)
                if sent:
                    await execute(raise_on_error=raise_on_error)
                raise RedisConnectionError("reply lost")

            pipe.execute = lost  # type: ignore[method-assign]
            return pipe

        return pipeline


@pytest.mark.parametrize("sent", [True, False])
async def test_claim_whose_reply_was_lost_is_resumed(make_queue: MakeQueue, sent: bool) -> None:
    """A claim MULTI whose reply is lost: resuming finds exactly what it took (twice, the same
    answer); accounts it never locked go back into the ready index."""
    queue = make_queue()
    await queue.push_many([NewEvent(1, "a"), NewEvent(2, "b"), NewEvent(2, "c")])
    faulty = make_queue()
    with LostReply(faulty, sent), pytest.raises(ClaimInterrupted) as lost:
        await faulty.claim(2, 0)
    accounts, claim_id = lost.value.accounts, lost.value.claim_id
    assert sorted(accounts) == [1, 2]
    resumed = await queue.resume_claim(accounts, claim_id)
    assert await queue.resume_claim(accounts, claim_id) == resumed
    if sent:
        taken = sorted((e.account, e.event_id, e.attempt) for e in resumed)
        assert taken == [(1, "a", 1), (2, "b", 1)]
        for event in resumed:  # the resumed tokens own their accounts
            assert await queue.ack(event) is not Step.LOST
        return
    assert resumed == []
    assert sorted(await ready_scores(queue)) == [1, 2]
    assert len(await queue.claim(2, 0)) == 2


async def test_claim_keeps_every_account_won_when_one_take_fails(make_queue: MakeQueue) -> None:
    """One take failing inside the claim MULTI costs no other account: the others are handed
    out, and the failed one comes back as won, owned by its token."""
    queue = make_queue()
    await queue.push_many([NewEvent(a, f"e{a}") for a in (1, 2, 3)])
    pending = queue.keys.pending(2)
    bodies = await Routed(queue).lrange(pending, 0, -1)
    await Routed(queue).delete(pending)
    await Routed(queue).set(pending, "x")  # the take of account 2 errors at LRANGE: WRONGTYPE
    claimed = await queue.claim(3, 0)
    events = sorted(c.account for c in claimed if isinstance(c, Event))
    [won] = [c for c in claimed if isinstance(c, Won)]
    assert (events, won.account) == ([1, 3], 2)
    await Routed(queue).delete(pending)
    await Routed(queue).rpush(pending, *bodies)
    assert await queue.release(2, won.token) is Step.RELEASED


async def test_kept_calls_are_bounded_per_account(make_queue: MakeQueue) -> None:
    """An account claimed again and again keeps the last calls of only its newest tokens: its
    state hash stays within 32 calls and its other 13 fields; a call of a kept token still
    replays, one of a dropped token is refused."""
    queue = make_queue()
    acked: list[Event] = []
    for i in range(40):
        await queue.push_many([NewEvent(1, f"e{i}")])
        acked.append(await claim_one(queue))
        assert await queue.ack(acked[-1]) is Step.DRAINED
    fields = await Routed(queue).hkeys(queue.keys.state(1))
    kept = sorted(int(f.split(b":")[1]) for f in fields if f.startswith(b"t:"))
    assert len(kept) >= 31 and len(fields) <= 32 + 13
    assert kept == [event.token for event in acked[-len(kept) :]]
    assert await twice(queue, lambda: queue.ack(acked[-1])) is Step.DRAINED
    assert await twice(queue, lambda: queue.ack(acked[-20])) is Step.DRAINED
    assert await queue.ack(acked[0]) is Step.LOST
