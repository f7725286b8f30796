"""Per-account batches: a claim, take or settle hands out up to `batch_size` events of the
account at once; a settle names how many of them were handled."""

from app.engine import Event, NewEvent, Queue, Step, inspect
from tests.engine.conftest import MakeQueue
from tests.support import Routed


async def push(queue: Queue, account: int, count: int) -> None:
    await queue.push_many([NewEvent(account, f"e{i}") for i in range(count)])


async def claim_batch(queue: Queue) -> Event:
    [event] = await queue.claim(1, 0.01)
    assert isinstance(event, Event)
    return event


def shape(step: object) -> list[tuple[str, int]]:
    """(event id, attempt) of each event of a batch."""
    assert isinstance(step, Event)
    return [(e.event_id, e.attempt) for e in step.batch]


async def test_claims_and_acks_hand_out_batches_in_order(make_queue: MakeQueue) -> None:
    """With batch_size 5, 12 events come as batches of 5, 5 and 2, in seq order; each ack
    settles its whole batch and hands out the next."""
    queue = make_queue()
    queue.batch_size = 5
    await push(queue, 1, 12)
    first = await claim_batch(queue)
    assert shape(first) == [(f"e{i}", 1) for i in range(5)]
    assert [e.seq for e in first.batch] == sorted(e.seq for e in first.batch)
    second = await queue.ack(first)
    assert shape(second) == [(f"e{i}", 1) for i in range(5, 10)]
    assert isinstance(second, Event) and second.token == first.token
    third = await queue.ack(second)
    assert shape(third) == [("e10", 1), ("e11", 1)]
    assert isinstance(third, Event)
    assert await queue.ack(third) is Step.DRAINED
    stats = await inspect.stats(queue)
    assert (stats["acked"], stats["backlog"], stats["redelivered"]) == (12, 0, 0)


async def test_a_settle_sent_again_is_answered_from_its_record(make_queue: MakeQueue) -> None:
    """An ack of a batch sent twice (its reply lost) gets the same next batch, and acks
    nothing twice."""
    queue = make_queue()
    queue.batch_size = 3
    await push(queue, 1, 6)
    first = await claim_batch(queue)
    nxt = await queue.ack(first)
    assert await queue.ack(first) == nxt
    assert (await inspect.stats(queue))["acked"] == 3


async def test_a_failure_acks_the_events_before_it_and_retries_it_alone_counted(
    make_queue: MakeQueue,
) -> None:
    """A nack after 2 handled events acks them; the failed one is at the head at attempt 2,
    the events after it, which never ran, are still at their first attempt."""
    queue = make_queue()
    queue.batch_size = 5
    await push(queue, 1, 8)
    first = await claim_batch(queue)
    assert await queue.nack(first, "boom", dead=False, handled=2) is Step.RETRY
    again = await queue.take(1, first.token)
    assert shape(again) == [("e2", 2), ("e3", 1), ("e4", 1), ("e5", 1), ("e6", 1)]
    stats = await inspect.stats(queue)
    assert (stats["acked"], stats["nacked"], stats["backlog"]) == (2, 1, 6)
    assert (await inspect.account_state(queue, 1)).last_acked_seq == first.rest[0].seq


async def test_a_dead_letter_in_a_batch_goes_on_with_the_events_after_it(
    make_queue: MakeQueue,
) -> None:
    """A dead nack of the second event acks the first, dead-letters the second, and hands out
    the events after it as a fresh batch."""
    queue = make_queue()
    queue.batch_size = 4
    await push(queue, 1, 6)
    first = await claim_batch(queue)
    nxt = await queue.nack(first, "ValueError: bad", dead=True, handled=1)
    assert shape(nxt) == [("e2", 1), ("e3", 1), ("e4", 1), ("e5", 1)]
    [entry] = await Routed(queue).hvals(queue.keys.dead(queue.keys.shard_of(1)))
    assert b'"event_id":"e1"' in entry
    stats = await inspect.stats(queue)
    assert (stats["acked"], stats["dead"]) == (1, 1)


async def test_a_partial_ack_gives_the_rest_back_uncounted(make_queue: MakeQueue) -> None:
    """An owner that stops after 2 of 5 events acks those and releases: the other 3 are at the
    head, and the next owner gets them at their first attempt."""
    queue = make_queue()
    queue.batch_size = 5
    await push(queue, 1, 5)
    first = await claim_batch(queue)
    assert await queue.ack(first, want_next=False, count=2) is Step.RELEASED
    again = await claim_batch(queue)
    assert shape(again) == [("e2", 1), ("e3", 1), ("e4", 1)]


async def test_a_dead_owners_batch_comes_back_one_event_at_a_time(make_queue: MakeQueue) -> None:
    """After an owner died holding 4 events, they are handed out one at a time, each at its
    second attempt, so a poison event among them is retried alone; then batches resume."""
    queue = make_queue(max_attempts=3)
    queue.batch_size = 4
    await push(queue, 1, 7)
    first = await claim_batch(queue)
    assert len(first.batch) == 4
    await Routed(queue).delete(queue.keys.lock(1))
    assert await queue.reap() == 1
    assert (await inspect.stats(queue))["redelivered"] == 4
    step = await claim_batch(queue)
    assert shape(step) == [("e0", 2)]
    step = await queue.ack(step)
    assert shape(step) == [("e1", 2)]
    assert isinstance(step, Event)
    assert await queue.nack(step, "poison", dead=False) is Step.RETRY
    step = await queue.take(1, step.token)
    assert shape(step) == [("e1", 3)]  # alone again: its neighbours are not charged
    assert isinstance(step, Event)
    step = await queue.nack(step, "poison", dead=True)
    assert shape(step) == [("e2", 2)]
    assert isinstance(step, Event)
    step = await queue.ack(step)
    assert shape(step) == [("e3", 2)]
    assert isinstance(step, Event)
    step = await queue.ack(step)
    assert shape(step) == [("e4", 1), ("e5", 1), ("e6", 1)]
