"""Semantics of every script: push, claim, take, ack, nack, renew, release, reap."""

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from app.consumer.tally import Tally
from app.engine import Event, NewEvent, Queue, Step, Won, inspect, registry, upgrade
from app.engine.events import body_after_seq
from app.engine.scripts import Call, NotReplicated
from tests.engine.conftest import MakeQueue
from tests.support import (
    Routed,
    all_keys,
    flush_scripts,
    in_flight,
    ready_scores,
    server_clock_us,
)


def ready_of(queue: Queue, account: int) -> str:
    return queue.keys.ready(queue.keys.shard_of(account))


async def push(queue: Queue, account: int, *ids: str, **payload: object) -> None:
    await queue.push_many([NewEvent(account, event_id, payload or None) for event_id in ids])


async def claim_one(queue: Queue) -> Event:
    [event] = await queue.claim(1, 0.01)
    assert isinstance(event, Event)
    return event


async def test_push_assigns_seq_and_readies_account(make_queue: MakeQueue) -> None:
    """I8: an event's seq is the account's last seq + 1, or the server clock in microseconds
    when that is more. The account enters the ready index by backlog."""
    queue = make_queue()
    clock = await server_clock_us(queue)
    results = await queue.push_many([NewEvent(7, "a"), NewEvent(7, "b"), NewEvent(8, "c")])
    a, b, c = (r.seq for r in results)
    assert all(r.queued for r in results)
    assert clock <= a < clock + 60_000_000
    assert b == a + 1
    assert clock <= c < clock + 60_000_000
    assert await ready_scores(queue) == {7: -2.0, 8: -1.0}
    assert (await inspect.stats(queue))["accepted"] == 3
    [later] = await queue.push_many([NewEvent(7, "d")])
    assert later.seq > b


async def test_duplicate_event_id_is_queued_once(make_queue: MakeQueue) -> None:
    """I6: the same event_id for an account is reported as a duplicate with its first seq,
    in a later call and within one batch."""
    queue = make_queue()
    [first] = await queue.push_many([NewEvent(1, "same", {"v": 1})])
    second, third, other = await queue.push_many(
        [NewEvent(1, "same", {"v": 2}), NewEvent(1, "new"), NewEvent(1, "new")]
    )
    assert [(r.queued, r.seq) for r in (first, second, third, other)] == [
        (True, first.seq),
        (False, first.seq),
        (True, third.seq),
        (False, third.seq),
    ]
    assert third.seq > first.seq
    assert await Routed(queue).llen(queue.keys.pending(1)) == 2
    assert (await inspect.stats(queue))["accepted"] == 2


async def test_backlog_cap_refuses_events_one_by_one(make_queue: MakeQueue) -> None:
    """MAX_BACKLOG_PER_ACCOUNT: an event whose account already has the cap unsettled (pending
    or in flight) is refused whole (not stored, its id not remembered) while other accounts
    and duplicates go on; the refusals are counted."""
    queue = make_queue(max_backlog_per_account=2)
    a1, a2, a3, b1 = await queue.push_many(
        [NewEvent(1, "a1"), NewEvent(1, "a2"), NewEvent(1, "a3"), NewEvent(2, "b1")]
    )
    assert (a1.queued, a2.queued, b1.queued) == (True, True, True)
    assert (a3.queued, a3.refused, a3.seq) == (False, True, 0)
    [again] = await queue.push_many([NewEvent(1, "a1")])
    assert again.duplicate and again.seq == a1.seq
    pending = await Routed(queue).lrange(queue.keys.pending(1), 0, -1)
    assert [orjson.loads(body)["id"] for body in pending] == ["a1", "a2"]
    first = await claim_one(queue)
    assert first.event_id == "a1"
    [held] = await queue.push_many([NewEvent(1, "a3")])  # a1 in flight still counts
    assert held.refused
    assert isinstance(await queue.ack(first), Event)
    [later] = await queue.push_many([NewEvent(1, "a3")])  # a1 acked: 1 unsettled
    assert later.queued and later.seq > a2.seq
    stats = await inspect.stats(queue)
    assert (stats["accepted"], stats["refused"]) == (4, 2)


async def test_push_writes_the_keys_the_other_scripts_read(make_queue: MakeQueue) -> None:
    """push.lua writes the keys the other scripts read (Keys.account), all in one shard."""
    queue = make_queue()
    await push(queue, 42, "a")
    pending, _, _, seq, ready, stats, active, _, _, _ = queue.keys.account(42)
    found = {key.decode() for key in await all_keys(queue)}
    found -= {queue.keys.layout, queue.keys.ids_since, queue.keys.state_since}
    shard = queue.keys.shard_of(42)
    assert {key.split("}")[0] for key in found} == {queue.keys.tag(shard)[:-1]}
    ids = queue.keys.ids(shard, queue.dedupe_bucket())
    assert found == {pending, seq, ready, stats, active, ids}, "no per-account ids hash"


async def test_claim_takes_longest_backlog_first(make_queue: MakeQueue) -> None:
    """The claim pops the account with the most pending events and hands out its head."""
    queue = make_queue()
    await push(queue, 1, "x1")
    await push(queue, 2, "y1", "y2", "y3")
    event = await claim_one(queue)
    assert (event.account, event.event_id, event.attempt) == (2, "y1", 1)
    assert await in_flight(queue, 2) != []


async def test_claim_takes_the_longest_backlogs_even_when_one_shard_holds_them_all(
    make_queue: MakeQueue,
) -> None:
    """A claim reads each shard for about twice its share first; a shard that holds more of
    the best is read again, so the accounts claimed are still the longest over all shards."""
    queue = make_queue()
    shard = queue.keys.shard_of(1)
    crowded = [a for a in range(1, 2000) if queue.keys.shard_of(a) == shard][:12]
    elsewhere = [a for a in range(1, 200) if queue.keys.shard_of(a) != shard][:20]
    for rank, account in enumerate(crowded):
        await queue.push_many([NewEvent(account, f"c{i}") for i in range(40 - rank)])
    for account in elsewhere:
        await queue.push_many([NewEvent(account, f"e{i}") for i in range(5)])
    claimed = await queue.claim(10, 0.01)
    assert sorted(e.account for e in claimed) == sorted(crowded[:10])
    assert queue.best_elsewhere == repr(-float(40 - 10))  # crowded[10]: 30 events waiting


async def test_claim_loser_skips_locked_account(make_queue: MakeQueue) -> None:
    """An account that is ready but locked by another owner is skipped by the MULTI loser."""
    queue = make_queue()
    await push(queue, 1, "a", "b")
    owner = await claim_one(queue)
    await Routed(queue).zadd(ready_of(queue, 1), {"1": -1})
    assert await queue.claim(1, 0.01) == []
    assert (await queue.ack(owner)) != Step.LOST


async def test_ack_hands_out_next_event_in_order(make_queue: MakeQueue) -> None:
    """Ack settles the head and returns the next event of the same account."""
    queue = make_queue()
    await push(queue, 3, "a", "b")
    first = await claim_one(queue)
    second = await queue.ack(first)
    assert isinstance(second, Event)
    assert (second.event_id, second.token) == ("b", first.token)
    assert second.seq > first.seq
    assert await queue.ack(second) == Step.DRAINED
    assert await inspect.drained(queue)
    assert not await Routed(queue).exists(queue.keys.lock(3))


@pytest.mark.parametrize(
    ("margin", "waiting", "switches"), [(1, 3, True), (3, 4, False), (3, 5, True)]
)
async def test_ack_switches_to_a_backlog_longer_by_the_margin(
    make_queue: MakeQueue, margin: int, waiting: int, switches: bool
) -> None:
    """With `longest`, a slot puts its account back when a backlog SWITCH_MARGIN longer waits."""
    queue = make_queue(switch_margin=margin)
    await push(queue, 1, "a1", "a2", "a3")
    first = await claim_one(queue)
    await push(queue, 2, *(f"b{i}" for i in range(waiting)))
    await queue.look()  # what a busy consumer does every LOOK_EVERY_S
    step = await queue.ack(first)
    if not switches:
        assert isinstance(step, Event)
        assert (step.account, step.event_id) == (1, "a2")
        return
    assert step == Step.RELEASED
    assert (await ready_scores(queue))[1] == -2.0
    assert (await claim_one(queue)).account == 2


async def test_one_settle_call_compares_with_an_account_it_released(
    make_queue: MakeQueue,
) -> None:
    """The accounts of one settle call read the shard's best waiting backlog once; an account
    the call gives back counts for the accounts settled after it: d reads an empty index and
    goes on, b is released with 5 events waiting, and a, 3 shorter, switches."""
    queue = make_queue(shards=1, switch_margin=1)
    await push(queue, 2, *(f"b{i}" for i in range(6)))
    b = await claim_one(queue)
    await push(queue, 4, "d1", "d2", "d3")
    d = await claim_one(queue)
    await push(queue, 1, "a1", "a2", "a3")
    a = await claim_one(queue)
    assert (a.account, b.account, d.account) == (1, 2, 4)
    steps = await asyncio.gather(queue.ack(d), queue.ack(b, want_next=False), queue.ack(a))
    assert isinstance(steps[0], Event) and steps[0].event_id == "d2"
    assert steps[1:] == [Step.RELEASED, Step.RELEASED]
    assert await ready_scores(queue) == {1: -2.0, 2: -5.0}


async def test_random_order_drains_claimed_account(make_queue: MakeQueue) -> None:
    """With `random`, a slot keeps its account until it is empty."""
    queue = make_queue(claim_order="random")
    await push(queue, 1, "a1", "a2")
    first = await claim_one(queue)
    await push(queue, 2, "b1", "b2", "b3", "b4")
    assert isinstance(await queue.ack(first), Event)


async def test_random_order_scores_each_account_once(make_queue: MakeQueue) -> None:
    """With `random`, a batch gives each account its own score, and later events keep it."""
    queue = make_queue(claim_order="random")
    await queue.push_many([NewEvent(a, f"e{a}") for a in range(1, 21)])
    first = await ready_scores(queue)
    await queue.push_many([NewEvent(a, f"f{a}") for a in range(1, 21)])
    again = await ready_scores(queue)
    assert again == first
    assert len(set(first.values())) == 20
    assert all(0 <= score < 1 for score in first.values())


async def test_oldest_order_scores_by_head_age(make_queue: MakeQueue) -> None:
    """With `oldest`, the account whose head event waited longest is claimed first."""
    queue = make_queue(claim_order="oldest")
    await push(queue, 1, "old")
    await push(queue, 2, "new1", "new2", "new3")
    assert (await claim_one(queue)).account == 1


async def test_stale_token_is_refused_everywhere(make_queue: MakeQueue) -> None:
    """I4: after the lease expires and another owner claims, the old token changes nothing."""
    queue = make_queue()
    await push(queue, 1, "a", "b")
    stale = await claim_one(queue)
    await Routed(queue).delete(queue.keys.lock(1))  # the lease expiring
    assert await queue.reap() == 1
    fresh = await claim_one(queue)
    assert fresh.token > stale.token
    assert (fresh.event_id, fresh.seq, fresh.attempt) == ("a", stale.seq, 2)
    assert await queue.ack(stale) == Step.LOST
    assert await queue.nack(stale, "boom", dead=False) == Step.LOST
    assert await queue.renew([(1, stale.token)]) == [False]
    assert await queue.release(1, stale.token) == Step.LOST
    assert await queue.take(1, stale.token) == Step.LOST
    assert await in_flight(queue, 1) != []
    assert isinstance(await queue.ack(fresh), Event)


async def test_renew_extends_lease(make_queue: MakeQueue) -> None:
    """The owner's renew resets the lock TTL to the full lease."""
    queue = make_queue(lease_seconds=5)
    await push(queue, 1, "a")
    event = await claim_one(queue)
    lock = queue.keys.lock(1)
    await Routed(queue).pexpire(lock, 100)
    assert await queue.renew([(1, event.token)]) == [True]
    assert await Routed(queue).pttl(lock) > 4000


async def test_nack_retries_in_place(make_queue: MakeQueue) -> None:
    """A nacked event goes back to the head and the next take is attempt 2 of it."""
    queue = make_queue()
    await push(queue, 1, "a", "b")
    first = await claim_one(queue)
    assert await queue.nack(first, "boom", dead=False) == Step.RETRY
    again = await queue.take(1, first.token)
    assert isinstance(again, Event)
    assert (again.event_id, again.seq, again.attempt) == ("a", first.seq, 2)
    assert (await inspect.stats(queue))["nacked"] == 1


async def test_nack_dead_letters_and_goes_on(make_queue: MakeQueue) -> None:
    """A dead nack stores the event with its error and hands out the next one."""
    queue = make_queue()
    await push(queue, 1, "a", "b")
    first = await claim_one(queue)
    nxt = await queue.nack(first, "ValueError: bad", dead=True)
    assert isinstance(nxt, Event)
    assert (nxt.event_id, nxt.attempt) == ("b", 1)
    [entry] = await Routed(queue).hvals(queue.keys.dead(queue.keys.shard_of(1)))
    assert b'"event_id":"a"' in entry
    assert b"ValueError: bad" in entry
    assert (await inspect.stats(queue))["dead"] == 1


async def test_nack_while_stopping_releases(make_queue: MakeQueue) -> None:
    """A nack without want_next puts the event back at the head and releases the account."""
    queue = make_queue()
    await push(queue, 1, "a")
    first = await claim_one(queue)
    assert await queue.nack(first, "boom", dead=False, want_next=False) == Step.RELEASED
    assert await ready_scores(queue) == {1: -1.0}


async def test_release_returns_in_flight_to_head(make_queue: MakeQueue) -> None:
    """Releasing mid-event puts the event back first in line and readies the account."""
    queue = make_queue()
    await push(queue, 1, "a", "b")
    first = await claim_one(queue)
    assert await queue.release(1, first.token) == Step.RELEASED
    again = await claim_one(queue)
    assert (again.event_id, again.seq, again.attempt) == ("a", first.seq, 2)


async def test_reap_recovers_orphan_after_crash(make_queue: MakeQueue) -> None:
    """An account whose owner vanished is readied by the reaper; the event is redelivered."""
    queue = make_queue()
    await push(queue, 1, "a", "b")
    first = await claim_one(queue)
    assert await queue.reap() == 0
    await Routed(queue).delete(queue.keys.lock(1))
    assert await queue.reap() == 1
    again = await claim_one(queue)
    assert (again.event_id, again.seq, again.attempt) == ("a", first.seq, 2)
    assert (await inspect.stats(queue))["redelivered"] == 1


async def test_reap_recovers_account_popped_but_never_locked(make_queue: MakeQueue) -> None:
    """An account with work that is neither owned nor ready is readied by the reaper."""
    queue = make_queue()
    await push(queue, 1, "a")
    await Routed(queue).zpopmin(ready_of(queue, 1))
    assert await queue.reap() == 1
    assert (await claim_one(queue)).event_id == "a"


async def test_reap_forgets_accounts_without_work(make_queue: MakeQueue) -> None:
    """The active set loses accounts with no pending and no in-flight event."""
    queue = make_queue()
    await Routed(queue).sadd(queue.keys.active(queue.keys.shard_of(9)), "9")
    assert await queue.reap() == 0
    assert await inspect.drained(queue)


@pytest.mark.parametrize("order", ["longest", "oldest", "random"])
async def test_every_order_drains_everything_in_seq_order(
    make_queue: MakeQueue, order: str
) -> None:
    """Whatever the claim order, one slot acks every event of every account in seq order."""
    queue = make_queue(claim_order=order)
    for account in (1, 2, 3):
        await push(queue, account, *[f"{account}-{i}" for i in range(account * 2)])
    seen: dict[int, list[Event]] = {}
    while events := await queue.claim(1, 0.01):
        step: Event | Step = events[0]
        while isinstance(step, Event):
            seen.setdefault(step.account, []).append(step)
            step = await queue.ack(step)
    assert {a: [e.event_id for e in got] for a, got in seen.items()} == {
        a: [f"{a}-{i}" for i in range(a * 2)] for a in (1, 2, 3)
    }
    assert all(sorted(got, key=lambda e: e.seq) == got for got in seen.values())
    assert await inspect.drained(queue)


async def test_concurrent_calls_share_a_round_trip_and_keep_their_answers(
    make_queue: MakeQueue,
) -> None:
    """Acks issued in one loop turn go out together: one settle call per shard, one round trip
    per master; each caller gets its own account's step."""
    queue = make_queue()
    for account in range(1, 31):
        await push(queue, account, "a", "b")
    events = await queue.claim(30, 0.01)
    stale = dataclasses.replace(events[0], token=events[0].token + 1)
    sizes: list[int] = []
    send = queue.scripts._pipeline

    async def counted(client: Redis, calls: Sequence[Call]) -> list[Any]:
        sizes.append(len(calls))
        return await send(client, calls)

    queue.scripts._pipeline = counted  # type: ignore[method-assign]
    steps = await asyncio.gather(*(queue.ack(e) for e in events), queue.ack(stale))
    assert len(sizes) == len(queue.nodes.masters())
    assert sum(sizes) == len({queue.keys.shard_of(e.account) for e in events}) < 31
    assert steps[-1] is Step.LOST
    assert [(s.account, s.event_id) for s in steps[:-1]] == [(e.account, "b") for e in events]
    last_acked = await Routed(queue).hget(queue.keys.state(events[0].account), "last_acked_seq")
    assert last_acked == b"%d" % events[0].seq


async def test_claim_after_scripts_were_flushed(make_queue: MakeQueue) -> None:
    """A claim whose in-MULTI take finds no function (Redis restarted empty, a new master) wins
    the account with a token not raised to the clock: the slot gives it back, and the next
    claim hands out the head as attempt 1."""
    queue = make_queue()
    await push(queue, 4, "a")
    await flush_scripts(queue)
    [won] = await queue.claim(1, 0.01)
    assert isinstance(won, Won)
    assert await queue.release(won.account, won.token) == Step.RELEASED
    event = await claim_one(queue)
    assert (event.account, event.event_id, event.attempt) == (4, "a", 1)
    assert event.token > won.token
    assert len(await in_flight(queue, 4)) == 1


async def test_first_calls_on_a_flushed_server_all_succeed(make_queue: MakeQueue) -> None:
    """Different scripts called at once on a server without them all load and run."""
    queue = make_queue()
    await push(queue, 1, "a")
    await flush_scripts(queue)
    pushed, _, events = await asyncio.gather(
        queue.push_many([NewEvent(2, "b")]), queue.reap(), queue.claim(2, 0)
    )
    assert pushed[0].queued
    assert {e.account for e in events} <= {1, 2}


async def test_replica_acks_wait_for_a_replica_or_fail_as_a_fault(make_queue: MakeQueue) -> None:
    """REPLICA_ACKS=1: each round trip that writes is followed by WAIT on its connection. On
    the cluster (a replica per master) push, claim and ack go through; on one Redis without a
    replica they fail as a fault (NotReplicated, sent again by the caller), and the push is
    not answered as accepted."""
    queue = make_queue(replica_acks=1)
    if queue.nodes.cluster is None:
        with pytest.raises(NotReplicated):
            await push(queue, 1, "a")
        return
    await push(queue, 1, "a", "b")
    event = await claim_one(queue)
    step = await queue.ack(event)
    assert isinstance(step, Event)
    assert await queue.ack(step) is Step.DRAINED


async def test_dead_letters_keep_the_newest_per_shard(make_queue: MakeQueue) -> None:
    """DEAD_LETTERS_MAX bounds each shard's dead letters: the oldest go; the count of dead
    events still counts all of them."""
    queue = make_queue(dead_letters_max=2)
    await push(queue, 1, "a", "b", "c")
    for _ in range(3):
        event = await claim_one(queue)
        await queue.nack(event, "bad", dead=True, want_next=False)
    entries = await Routed(queue).hvals(queue.keys.dead(queue.keys.shard_of(1)))
    assert sorted(orjson.loads(e)["event_id"] for e in entries) == ["b", "c"]
    assert (await inspect.stats(queue))["dead"] == 3


async def test_heartbeats_of_dead_consumers_are_forgotten(make_queue: MakeQueue) -> None:
    """A consumer that died without unregistering drops out of the heartbeats after an hour."""
    queue = make_queue()
    key = queue.keys.consumers
    await Routed(queue).zadd(key, {"gone:1:4": time.time() - 2 * 3600})
    await registry.heartbeat(queue, "here:2:4", 3, {}, {})
    assert await registry.live_consumers(queue, 3 * 3600) == {"here:2": 4}


async def test_heartbeats_fold_measurements_and_busy_slots(make_queue: MakeQueue) -> None:
    """A heartbeat adds a consumer's tally to the metrics hash and records its busy slots;
    unregistering drops the consumer, and the measurements stay."""
    queue = make_queue()
    tally = Tally()
    for seconds in (0.2, 1.2, 99.0):
        tally.observe("processing", seconds)
    await registry.heartbeat(queue, "h:1:8", 5, *tally.take())
    tally.observe("processing", 1.0)
    await registry.heartbeat(queue, "h:1:8", 6, *tally.take())
    [(slots, busy, age)] = (await registry.consumers(queue, 60)).values()
    assert (slots, busy) == (8, 6)
    assert 0 <= age < 5
    measured = await registry.measurements(queue)
    assert {k: v for k, v in measured.items() if k != "processing:sum"} == {
        "processing:0.25": 1,
        "processing:1": 1,
        "processing:1.5": 1,
        "processing:+Inf": 1,
        "processing:count": 4,
    }
    assert measured["processing:sum"] == pytest.approx(101.4)
    await registry.unregister(queue, "h:1:8")
    assert await registry.consumers(queue, 60) == {}
    assert await registry.measurements(queue) == measured


async def account_ttls_ms(queue: Queue, account: int) -> list[int]:
    """PTTL of the account's seq and state (-1: kept, -2: gone)."""
    keys = (queue.keys.seq(account), queue.keys.state(account))
    return [await Routed(queue).pttl(key) for key in keys]


async def test_drained_account_ages_and_a_claim_keeps_it(make_queue: MakeQueue) -> None:
    """ACCOUNT_IDLE_SECONDS: a drained account's seq and state expire; a push and a
    claim make them permanent again while the account has work."""
    queue = make_queue(account_idle_seconds=60, dedupe_seconds=1)
    await push(queue, 1, "a")
    assert await queue.ack(await claim_one(queue)) is Step.DRAINED
    assert all(0 < ttl <= 60_000 for ttl in await account_ttls_ms(queue, 1))
    await push(queue, 1, "b")
    await claim_one(queue)
    assert await account_ttls_ms(queue, 1) == [-1, -1]


async def test_claim_that_finds_nothing_lets_the_account_age(make_queue: MakeQueue) -> None:
    """A claim of an account with nothing left (a stale ready entry) leaves it aging too."""
    queue = make_queue(account_idle_seconds=60, dedupe_seconds=1)
    await push(queue, 1, "a")
    assert await queue.ack(await claim_one(queue)) is Step.DRAINED
    await Routed(queue).zadd(ready_of(queue, 1), {"1": -1})
    assert await queue.claim(1, 0.01) == []
    assert all(0 < ttl <= 60_000 for ttl in (await account_ttls_ms(queue, 1))[:2])


async def test_expired_account_leaves_nothing_and_its_seqs_and_tokens_still_grow(
    make_queue: MakeQueue,
) -> None:
    """I8 across expiry: once a drained account's state has expired no key of it is left, and
    its next seq and fencing token are still above every earlier one."""
    queue = make_queue(account_idle_seconds=0.3, dedupe_seconds=0.1)
    await push(queue, 1, "a")
    first = await claim_one(queue)
    assert await queue.ack(first) is Step.DRAINED
    await asyncio.sleep(0.5)
    left = {key.decode() for key in await all_keys(queue)}
    assert left <= {
        queue.keys.layout,
        queue.keys.ids_since,
        queue.keys.state_since,
        queue.keys.stats(queue.keys.shard_of(1)),
    }
    [again] = await queue.push_many([NewEvent(1, "b")])
    assert again.seq > first.seq
    second = await claim_one(queue)
    assert (second.event_id, second.attempt) == ("b", 1)
    assert second.token > first.token


async def test_seq_set_back_by_a_failover_still_grows(make_queue: MakeQueue) -> None:
    """I8 across a failover that lost the newest pushes: the promoted replica's seq of the
    account is behind, yet the next seq is above every seq handed out before."""
    queue = make_queue()
    [old] = await queue.push_many([NewEvent(1, "a")])
    await Routed(queue).set(queue.keys.seq(1), old.seq - 1000)
    [new] = await queue.push_many([NewEvent(1, "b")])
    assert new.seq > old.seq


async def test_ids_an_older_version_kept_per_account_stay_duplicates_for_their_window(
    make_queue: MakeQueue,
) -> None:
    """I6 across the upgrade to the shards' ids hashes: an event id that an older version
    remembered per account is still a duplicate until that layout's hashes have expired
    (DEDUPE_SECONDS x 2 after the upgrade); a new namespace never reads them."""
    queue = make_queue(dedupe_seconds=0.5, account_idle_seconds=60)
    routed = Routed(queue)
    await routed.set(queue.keys.layout, queue.keys.shards)  # an older version's namespace
    await routed.hset(queue.keys.legacy_ids(7, queue.dedupe_bucket()), "old", "123")
    await routed.hset(queue.keys.state(7), "last_acked_seq", "123")  # it was acked
    [old, new] = await queue.push_many([NewEvent(7, "old"), NewEvent(7, "new")])
    assert (old.queued, old.seq) == (False, 123)
    assert new.queued
    found = await inspect.event_state(queue, 7, "old")
    assert found is not None and (found["state"], found["seq"]) == ("acked", 123)
    await asyncio.sleep(1.1)  # the upgrade is two windows ago: the old hashes are gone
    await routed.hset(queue.keys.legacy_ids(7, queue.dedupe_bucket()), "older", "124")
    [older] = await queue.push_many([NewEvent(7, "older")])
    assert older.queued, "no per-account hash is read once they must have expired"
    fresh = make_queue()
    await routed.delete(queue.keys.layout)
    await routed.delete(queue.keys.ids_since)
    await routed.hset(fresh.keys.legacy_ids(8, fresh.dedupe_bucket()), "x", "125")
    [x] = await fresh.push_many([NewEvent(8, "x")])
    assert x.queued, "a namespace this version made has no per-account hashes to read"


async def test_attempts_an_older_version_kept_apart_move_into_the_state_hash(
    make_queue: MakeQueue,
) -> None:
    """Across the upgrade to the state hash: the attempt hash of an event that had failed
    twice is moved into its account's state hash once, so the next attempt is 3; a second
    open moves nothing, and the old key is gone. An account paused then gets the pause's
    mirror in its state, so its owner stops after the batch it holds."""
    queue = make_queue()
    await push(queue, 1, "a", "b")
    routed = Routed(queue)
    await routed.hset(queue.keys.legacy_attempt(1), "n", "2")
    far = await server_clock_us(queue) + 3_600_000_000  # a fence an hour ahead of the clock
    await routed.set(queue.keys.legacy_fence(1), far)
    await routed.delete(queue.keys.state_since)  # a namespace the older version wrote
    assert await upgrade.move_attempts(queue) == 1
    assert not await routed.exists(queue.keys.legacy_attempt(1), queue.keys.legacy_fence(1))
    assert await upgrade.move_attempts(queue) == 0
    first = await claim_one(queue)
    assert (first.event_id, first.attempt) == ("a", 3)
    assert first.token > far  # I8: tokens still grow past the old fence
    await routed.hset(queue.keys.paused(queue.keys.shard_of(1)), "1", "operator")  # as before
    await routed.delete(queue.keys.state_since)
    await upgrade.move_attempts(queue)
    assert await routed.hget(queue.keys.state(1), "paused") == b"1"
    assert await queue.ack(first) is Step.RELEASED


async def test_a_batch_an_older_version_moved_in_flight_goes_back_to_the_head(
    make_queue: MakeQueue,
) -> None:
    """Across the upgrade to batches that stay at the head: the in-flight list an older
    version's owner left (its consumers stopped) goes back to the head in order, as a dead
    owner's batch: counted redelivered, then handed out one at a time, each at its next
    attempt, before what was pending."""
    queue = make_queue()
    [c] = await queue.push_many([NewEvent(1, "c")])
    routed = Routed(queue)
    flying = [body_after_seq(name, None) for name in ("a", "b")]
    seqs = [c.seq - 10, c.seq - 9]
    bodies = [b'{"seq":%d,' % seq + body for seq, body in zip(seqs, flying, strict=True)]
    await routed.rpush(queue.keys.legacy_in_flight(1), *bodies)
    await routed.hset(queue.keys.state(1), mapping={"token": "5", "n": "1", "seq": seqs[0]})
    await routed.delete(queue.keys.state_since)
    assert await upgrade.move_attempts(queue) == 1
    assert not await routed.exists(queue.keys.legacy_in_flight(1))
    assert (await inspect.stats(queue))["redelivered"] == 2
    first = await claim_one(queue)
    assert (first.event_id, first.attempt, len(first.batch)) == ("a", 2, 1)
    second = await queue.ack(first)
    assert isinstance(second, Event)
    assert (second.event_id, second.attempt, len(second.batch)) == ("b", 2, 1)
    third = await queue.ack(second)
    assert isinstance(third, Event) and third.event_id == "c"


async def test_opening_loads_the_functions_where_they_are_missing(make_queue: MakeQueue) -> None:
    """Opening the queue loads the function library on every master that lacks it; settings
    that change the library (ACCOUNT_IDLE_MS) load one of their own beside it, and both run."""
    queue = make_queue()
    await flush_scripts(queue)
    await queue.open()
    for master in queue.nodes.masters():
        assert [lib[1] for lib in await master.function_list()] == [queue.scripts.name.encode()]
    other = make_queue(account_idle_seconds=200_000)
    await other.open()
    names = {lib[1] for lib in await queue.nodes.masters()[0].function_list()}
    assert names == {queue.scripts.name.encode(), other.scripts.name.encode()}
    await push(other, 1, "a")
    assert (await claim_one(queue)).event_id == "a"
