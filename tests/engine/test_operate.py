"""Operator actions on the engine: pause and resume, park on poison, dead-letter replay and
purge, event lookup."""

import asyncio

import orjson

from app.engine import Event, NewEvent, Queue, Step, dead, inspect
from app.engine.dead import Selection
from app.engine.inspect import account_state, event_state
from tests.engine.conftest import MakeQueue
from tests.support import Routed, ready_scores


async def push(queue: Queue, account: int, *ids: str, **payload: object) -> list[int]:
    results = await queue.push_many([NewEvent(account, i, payload or None) for i in ids])
    return [r.seq for r in results]


async def claim_one(queue: Queue) -> Event:
    [event] = await queue.claim(1, 0.01)
    assert isinstance(event, Event)
    return event


async def drain(queue: Queue, account: int) -> list[tuple[str, int]]:
    """Claim and ack until nothing is ready; (event id, replays) in the order handled."""
    handled = []
    while claimed := await queue.claim(1, 0.01):
        [step] = claimed
        while isinstance(step, Event):
            assert step.account == account
            handled.append((step.event_id, step.replays))
            step = await queue.ack(step)
    return handled


async def test_paused_account_accepts_events_but_is_not_claimed(make_queue: MakeQueue) -> None:
    """Pause takes the account out of the ready index; pushes queue but do not ready it;
    resume makes it claimable at once with its whole backlog."""
    queue = make_queue()
    await push(queue, 1, "a")
    assert await queue.pause(1) == ("", False)
    await push(queue, 1, "b")
    await push(queue, 2, "c")
    assert await ready_scores(queue) == {2: -1.0}
    assert (await account_state(queue, 1)).paused == "operator"
    assert await queue.pause(1) == ("operator", False)  # sent again: the same state
    assert await queue.resume(1) == "operator"
    assert await ready_scores(queue) == {1: -2.0, 2: -1.0}
    assert await queue.resume(1) == ""
    assert (await account_state(queue, 1)).paused is None


async def test_owned_account_is_released_after_its_current_event(make_queue: MakeQueue) -> None:
    """A paused account's owner acks its current event and is told to let go; the account
    waits, out of the ready index, until it is resumed."""
    queue = make_queue()
    await push(queue, 1, "a", "b", "c")
    first = await claim_one(queue)
    assert await queue.pause(1) == ("", True)
    assert await queue.ack(first) == Step.RELEASED
    assert await queue.claim(1, 0.01) == []
    assert await queue.reap() == 0  # the reaper leaves a paused account alone
    await queue.resume(1)
    assert await drain(queue, 1) == [("b", 0), ("c", 0)]


async def test_park_holds_the_account_at_its_poison_event(make_queue: MakeQueue) -> None:
    """POISON_POLICY=park: the dead-lettered event parks its account, so no later event runs;
    replaying it after a fix runs it first and then the rest, in seq order."""
    queue = make_queue(poison_policy="park")
    await push(queue, 1, "a", "b", "c")
    first = await claim_one(queue)
    assert await queue.nack(first, "ValueError: poison", dead=True) == Step.RELEASED
    assert (await account_state(queue, 1)).paused == "parked"
    await push(queue, 1, "d")
    assert await queue.claim(1, 0.01) == []
    assert await queue.reap() == 0
    assert await dead.replay(queue, Selection(account=1, event_ids={"a"})) == 1
    assert (await account_state(queue, 1)).paused is None
    assert await drain(queue, 1) == [("a", 1), ("b", 0), ("c", 0), ("d", 0)]
    assert (await dead.dead_letters(queue))[0] == 0


async def test_resume_skips_a_parked_event(make_queue: MakeQueue) -> None:
    """Resuming a parked account goes on past its dead letter, which stays."""
    queue = make_queue(poison_policy="park")
    await push(queue, 1, "a", "b")
    first = await claim_one(queue)
    assert await queue.nack(first, "boom", dead=True) == Step.RELEASED
    assert await queue.resume(1) == "parked"
    assert await drain(queue, 1) == [("b", 0)]
    assert (await dead.dead_letters(queue))[0] == 1


async def test_replay_goes_ahead_of_pending_in_seq_order(make_queue: MakeQueue) -> None:
    """Replayed dead letters go to the head of their account's list in seq order, with their
    seq, id and payload intact, and are marked as replays."""
    queue = make_queue()
    seqs = await push(queue, 1, "a", "b", "c", "d", big=2**62, text="ü\u2028")
    a = await claim_one(queue)
    b = await queue.nack(a, "no a", dead=True)
    assert isinstance(b, Event)
    c = await queue.ack(b)
    assert isinstance(c, Event)
    d = await queue.nack(c, "no c", dead=True)
    assert isinstance(d, Event)
    assert await queue.release(1, d.token, d, ran=False) == Step.RELEASED
    assert [e["event_id"] for e in (await dead.dead_letters(queue))[1]] == ["a", "c"]
    assert await dead.replay(queue, Selection()) == 2
    assert await dead.replay(queue, Selection()) == 0  # nothing left to replay
    order = []
    while claimed := await queue.claim(1, 0.01):
        [step] = claimed
        while isinstance(step, Event):
            order.append((step.event_id, step.seq, step.replays, step.payload))
            step = await queue.ack(step)
    payload = {"big": 2**62, "text": "ü\u2028"}
    assert order == [
        ("a", seqs[0], 1, payload),
        ("c", seqs[2], 1, payload),
        ("d", seqs[3], 0, payload),
    ]
    stats = await inspect.stats(queue)
    assert (stats["replayed"], stats["dead_letters"], stats["backlog"]) == (2, 0, 0)


async def test_replay_and_purge_select_by_account_and_event_id(make_queue: MakeQueue) -> None:
    """Selections pick exactly their dead letters, over every shard; purge deletes them."""
    queue = make_queue()
    for account in (1, 2, 3):
        await push(queue, account, "x", "y")
    while claimed := await queue.claim(3, 0.01):
        for first in claimed:
            step: Event | Step = first
            while isinstance(step, Event):
                step = await queue.nack(step, "boom", dead=True)
    assert (await dead.dead_letters(queue))[0] == 6
    assert (await dead.dead_letters(queue, selection=Selection(account=2)))[0] == 2
    assert await dead.purge(queue, Selection(event_ids={"x"})) == 3
    assert await dead.purge(queue, Selection(account=3)) == 1
    assert await dead.replay(queue, Selection(account=1)) == 1
    _, left = await dead.dead_letters(queue)
    assert [(e["account"], e["event_id"]) for e in left] == [(2, "y")]
    stats = await inspect.stats(queue)
    assert (stats["purged"], stats["replayed"], stats["backlog"]) == (4, 1, 1)


async def test_event_lookup_follows_an_event_through_its_states(make_queue: MakeQueue) -> None:
    """pending at its position, in flight with its owner, dead with its error, acked, and
    unknown ids."""
    queue = make_queue()
    seq_a, seq_b, seq_c = await push(queue, 5, "a", "b", "c")
    state = await event_state(queue, 5, "c")
    assert state is not None
    assert (state["state"], state["position"], state["seq"]) == ("pending", 3, seq_c)
    first = await claim_one(queue)
    state = await event_state(queue, 5, "a")
    assert state is not None
    assert (state["state"], state["attempt"], state["owner"]["token"]) == (
        "in_flight",
        1,
        first.token,
    )
    assert 0 < state["owner"]["lease_remaining_ms"] <= 30_000
    second = await queue.ack(first)
    assert isinstance(second, Event)
    assert await event_state(queue, 5, "a") == {
        "account_id": 5,
        "event_id": "a",
        "state": "acked",
        "seq": seq_a,
    }
    await queue.nack(second, "KeyError: 'x'", dead=True)
    state = await event_state(queue, 5, "b")
    assert state is not None
    assert (state["state"], state["error"], state["seq"]) == ("dead", "KeyError: 'x'", seq_b)
    assert await event_state(queue, 5, "nope") is None
    assert await event_state(queue, 6, "a") is None


async def test_a_forgotten_event_is_found_acked_by_its_seq(make_queue: MakeQueue) -> None:
    """Once an acked event's id has left the dedupe window, the lookup does not know it; with
    its seq (a settling line of the event log has it) it is acked while the account's last
    acked seq has reached it, and not before."""
    queue = make_queue()
    seq_a, seq_b = await push(queue, 5, "a", "b")
    first = await claim_one(queue)
    assert isinstance(await queue.ack(first, count=1), Event)
    for shard in range(queue.keys.shards):
        for bucket in (queue.dedupe_bucket(), queue.dedupe_bucket() - 1):
            await Routed(queue).delete(queue.keys.ids(shard, bucket))
    assert await event_state(queue, 5, "a") is None
    assert await event_state(queue, 5, "a", seq_a) == {
        "account_id": 5,
        "event_id": "a",
        "state": "acked",
        "seq": seq_a,
    }
    state = await event_state(queue, 5, "b", seq_b)
    assert state is not None and state["state"] == "in_flight"


async def test_dead_letters_of_the_old_layout_are_moved_and_replayed(
    make_queue: MakeQueue,
) -> None:
    """Dead letters a version before ids kept in one list per shard are moved, in their order,
    when an engine opens; then found by their id and replayed like any other."""
    queue = make_queue()
    await push(queue, 1, "a", "b")
    shard = queue.keys.shard_of(1)
    old = [
        orjson.dumps(
            {"account": 1, "seq": 1 + i, "event_id": f"old{i}", "attempts": 5, "replays": 0,
             "error": "boom", "payload": {"i": i}, "enqueued_ns": 0, "dead_ns": 10 + i}
        )
        for i in range(3)
    ]  # fmt: skip
    await Routed(queue).rpush(queue.keys.legacy_dead(shard), *old)
    await queue.open()
    assert await Routed(queue).exists(queue.keys.legacy_dead(shard)) == 0
    total, page = await dead.dead_letters(queue, 0, 10)
    assert total == 3 and [e["event_id"] for e in page] == ["old0", "old1", "old2"]
    assert (await event_state(queue, 1, "old1") or {})["state"] == "dead"
    assert await dead.replay(queue, Selection(account=1, event_ids={"old1"})) == 1
    assert (await dead.dead_letters(queue))[0] == 2


async def test_one_dead_letter_costs_the_same_among_many(make_queue: MakeQueue) -> None:
    """Finding, replaying and purging one dead letter by account and id reads only it:
    a shard holding 2,000 dead letters answers as one holding a few."""
    queue = make_queue()
    shard = queue.keys.shard_of(7)
    many = {
        f"7:x{i}": orjson.dumps(
            {"account": 7, "seq": i + 1, "event_id": f"x{i}", "attempts": 5, "replays": 0,
             "error": "boom", "payload": None, "enqueued_ns": 0, "dead_ns": i}
        )
        for i in range(2000)
    }  # fmt: skip
    await Routed(queue).hset(queue.keys.dead(shard), mapping=many)
    await Routed(queue).zadd(queue.keys.dead_order(shard), {k: i for i, k in enumerate(many)})
    found = await dead.find(queue, 7, "x1500")
    assert found is not None and found["seq"] == 1501
    assert await dead.replay(queue, Selection(account=7, event_ids={"x1500"})) == 1
    assert await dead.purge(queue, Selection(account=7, event_ids={"x3", "nope"})) == 1
    assert await dead.find(queue, 7, "x3") is None
    assert (await dead.dead_letters(queue))[0] == 1998
    assert await drain(queue, 7) == [("x1500", 1)]


async def test_a_pause_of_an_account_that_holds_nothing_expires_with_its_state(
    make_queue: MakeQueue,
) -> None:
    """Pausing an account that holds nothing keeps the pause only as long as the account's
    state would live (ACCOUNT_IDLE_SECONDS): then the reaper forgets it. A paused account
    with events keeps its pause."""
    queue = make_queue(dedupe_seconds=0.3, account_idle_seconds=0.3)
    await push(queue, 1, "a")
    await queue.pause(1)
    await queue.pause(999)
    assert (await inspect.stats(queue))["paused"] == 2
    assert await queue.reap() == 0
    assert (await inspect.stats(queue))["paused"] == 2  # too soon: its state still lives
    await asyncio.sleep(0.5)
    await queue.reap()
    assert (await inspect.stats(queue))["paused"] == 1
    assert (await account_state(queue, 1)).paused == "operator"
    assert (await account_state(queue, 999)).paused is None
