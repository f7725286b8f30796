"""The hot path in process: a consumer's slots drain a fakeredis queue while connection
faults are injected before and after Redis runs a round trip, and while leases are lost; the
event log (a temporary file) must still show every event acked once, in order."""

import errno
import random
import stat
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog import get_logger

from app.consumer.process import consume
from app.consumer.slots import Slots
from app.engine import Event, NewEvent, Nodes, Queue, inspect
from app.handlers import Failed, takes_batches
from app.log import AppendFile
from app.settings import Settings
from app.workload.generator import workload
from tests.support import assert_all_acked_once_in_order, attempts
from tests.support import settings as evq_settings


class Faults:
    """Which round trips fail: before they reach Redis (nothing ran) or after (it ran, the
    reply is lost), each with its own probability, from a seeded generator."""

    def __init__(self, before: float, after: float, seed: int = 7) -> None:
        self.before, self.after = before, after
        self._random = random.Random(seed)
        self.injected: Counter[str] = Counter()
        self.on = True

    def draw(self) -> str | None:
        if not self.on:
            return None
        roll = self._random.random()
        if roll < self.before:
            return "before"
        if roll < self.before + self.after:
            return "after"
        return None


class FaultyPipeline(Pipeline):
    """A pipeline whose round trip fails as `faults` says."""

    faults: Faults

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        fault = self.faults.draw()
        if fault == "before":
            self.faults.injected[fault] += 1
            await self.reset()
            raise RedisConnectionError("injected: the round trip never reached Redis")
        replies = await super().execute(raise_on_error)
        if fault == "after":
            self.faults.injected[fault] += 1
            raise RedisConnectionError("injected: Redis ran it, the reply was lost")
        return replies


class FaultyRedis(fakeredis.FakeAsyncRedis):
    """fakeredis whose pipelines (every script call, claim and settle) fail as `faults` says."""

    faults: Faults

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        pipe = FaultyPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )
        pipe.faults = self.faults
        return pipe


Drain = Callable[..., Any]


@pytest.fixture
async def faulty(tmp_path: Path) -> AsyncIterator[tuple[FaultyRedis, Callable[..., Settings]]]:
    """A fakeredis server behind a client that injects faults (none until a test sets them),
    and test settings whose event log is a temporary file."""
    client = FaultyRedis(server=fakeredis.FakeServer())
    client.faults = Faults(0.0, 0.0)

    def settings(**overrides: object) -> Settings:
        return evq_settings("redis://fake", event_log=tmp_path / "event.log", **overrides)

    yield client, settings
    await client.aclose()


def queue_on(client: FaultyRedis, settings: Settings) -> Queue:
    return Queue(Nodes.wrap(client, settings), settings)


async def push(queue: Queue, events: list[NewEvent]) -> None:
    """Push with faults off: this test is about the consumer."""
    faults = queue.nodes.masters()[0].faults  # type: ignore[attr-defined]
    faults.on = False
    await queue.open()
    await queue.push_many(events)
    faults.on = True


async def noop(event: Event) -> None:
    """A handler that does nothing."""


async def test_faults_before_and_after_each_round_trip_lose_and_repeat_nothing(
    faulty: tuple[FaultyRedis, Callable[..., Settings]],
) -> None:
    """With 30% of all round trips failing (half of them after Redis ran them), 600 events
    over 40 accounts are each acked once, in seq order, and Redis agrees."""
    client, settings = faulty
    config = settings(concurrency=8)
    queue = queue_on(client, config)
    plan = workload("bursty", 600, 40, seed=3)
    await push(queue, [NewEvent(a, f"e{i}", None) for i, a in enumerate(plan)])
    client.faults = Faults(before=0.15, after=0.15)
    consumer = await consume(queue, noop, config, burst=True)
    assert not consumer.failing
    assert client.faults.injected["before"] > 10 and client.faults.injected["after"] > 10
    assert_all_acked_once_in_order(config.event_log, 600)
    assert stat.S_IMODE(config.event_log.stat().st_mode) == 0o640  # no reading by others
    client.faults.on = False
    stats = await inspect.stats(queue)
    assert (stats["acked"], stats["backlog"], stats["redelivered"]) == (600, 0, 0)
    await queue.aclose()


async def test_a_lost_lease_refuses_the_ack_and_the_event_runs_again(
    faulty: tuple[FaultyRedis, Callable[..., Settings]],
) -> None:
    """When an account's lock vanishes while its event runs (the lease ran out), the ack is
    refused and logged as lost; the reaper hands the account out again and the event runs as
    attempt 2 with a larger token, before the account's later events. The other events of its
    batch are refused with it and handed out again too."""
    client, settings = faulty
    config = settings(concurrency=4)
    queue = queue_on(client, config)
    await push(queue, [NewEvent(1, f"e{i}", None) for i in range(5)])
    await push(queue, [NewEvent(2, f"f{i}", None) for i in range(5)])
    lost: list[int] = []

    async def loses_its_lease_once(event: Event) -> None:
        if event.event_id == "e2" and not lost:
            lost.append(event.token)
            await client.delete(queue.keys.lock(1))

    await consume(queue, loses_its_lease_once, config, burst=True)
    found = attempts(config.event_log)
    e2 = [(a.attempt, a.outcome, a.token) for a in found if a.event_id == "e2"]
    assert [(n, outcome) for n, outcome, _ in e2] == [(1, "lost_lease"), (2, "ack")]
    assert e2[1][2] > e2[0][2] == lost[0]
    assert_all_acked_once_in_order(config.event_log, 10)
    refused = [a for a in found if a.outcome == "lost_lease"]
    assert all(a.account == 1 and a.attempt == 1 for a in refused)
    assert (await inspect.stats(queue))["redelivered"] == len(refused)
    await queue.aclose()


async def test_a_failing_event_is_retried_then_dead_lettered_through_faults(
    faulty: tuple[FaultyRedis, Callable[..., Settings]],
) -> None:
    """An event that always fails is nacked MAX_ATTEMPTS times, with attempts counted right
    although nacks' replies are lost, then dead-lettered; its account goes on after it."""
    client, settings = faulty
    config = settings(concurrency=2, max_attempts=3)
    queue = queue_on(client, config)
    await push(queue, [NewEvent(1, f"e{i}", None) for i in range(4)])
    client.faults = Faults(before=0.1, after=0.15, seed=11)

    async def poison(event: Event) -> None:
        if event.event_id == "e1":
            raise ValueError("poison")

    await consume(queue, poison, config, burst=True)
    found = attempts(config.event_log)
    e1 = [(a.attempt, a.outcome) for a in found if a.event_id == "e1"]
    assert e1 == [(1, "nack"), (2, "nack"), (3, "dead")]
    acked = [a.event_id for a in found if a.outcome == "ack"]
    assert acked == ["e0", "e2", "e3"]
    client.faults.on = False
    stats = await inspect.stats(queue)
    assert (stats["dead"], stats["nacked"], stats["backlog"]) == (1, 3, 0)
    await queue.aclose()


async def test_an_event_handed_out_by_an_ack_that_could_not_be_logged_is_not_charged(
    faulty: tuple[FaultyRedis, Callable[..., Settings]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the log line of an ack cannot be written, the slot fails and releases its
    account; the next event, which that ack had handed out and no handler ran, comes back
    as attempt 1, not 2."""
    client, settings = faulty
    config = settings(concurrency=1, lease_seconds=1)
    queue = queue_on(client, config)
    await push(queue, [NewEvent(1, "a"), NewEvent(1, "b")])
    write = AppendFile.write

    def full_for_a(self: AppendFile, line: bytes) -> None:
        if b'"event_id":"a"' in line and b'"outcome"' in line:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, line)

    monkeypatch.setattr(AppendFile, "write", full_for_a)
    await consume(queue, noop, config, burst=True)
    found = attempts(config.event_log)
    assert [(a.event_id, a.attempt, a.outcome) for a in found] == [("b", 1, "ack")]
    stats = await inspect.stats(queue)
    assert (stats["acked"], stats["backlog"], stats["redelivered"]) == (2, 0, 0)
    await queue.aclose()


async def test_a_batch_handler_gets_each_accounts_events_as_lists_and_says_how_far_it_got(
    faulty: tuple[FaultyRedis, Callable[..., Settings]],
) -> None:
    """A handler marked `takes_batches` is called with lists of one account's events in seq
    order. When it fails at a poison event after handling others, those are acked, the poison
    is retried until dead-lettered, and the account goes on; through connection faults."""
    client, settings = faulty
    config = settings(concurrency=4, max_attempts=3, batch_max=8)
    queue = queue_on(client, config)
    plan = workload("bursty", 300, 12, seed=5)
    await push(queue, [NewEvent(a, f"e{i}", None) for i, a in enumerate(plan)])
    client.faults = Faults(before=0.05, after=0.05, seed=13)
    sizes: list[int] = []

    @takes_batches
    async def handle(events: list[Event]) -> None:
        assert len({e.account for e in events}) == 1
        assert [e.seq for e in events] == sorted(e.seq for e in events)
        sizes.append(len(events))
        for n, event in enumerate(events):
            if event.event_id == "e100":
                raise Failed("poison", handled=n)

    await consume(queue, handle, config, burst=True)
    assert max(sizes) == 8
    found = attempts(config.event_log)
    assert [(a.attempt, a.outcome) for a in found if a.event_id == "e100"] == [
        (1, "nack"),
        (2, "nack"),
        (3, "dead"),
    ]
    acked = [a for a in found if a.outcome == "ack"]
    assert len(acked) == len({a.event_id for a in acked}) == 299
    for account in set(plan):
        seqs = [a.seq for a in acked if a.account == account]
        assert seqs == sorted(seqs)
    client.faults.on = False
    stats = await inspect.stats(queue)
    assert (stats["acked"], stats["dead"], stats["backlog"]) == (299, 1, 0)
    await queue.aclose()


def test_batches_cover_the_settles_wait_100_times_over(
    faulty: tuple[FaultyRedis, Callable[..., Settings]],
) -> None:
    """The batch size follows the handler's pace and the settle's measured wait: a batch
    covers 100 times the wait (20 ms before one is measured), at most 0.5 s and a tenth of the
    lease. A 1 s handler always gets one event at a time; a 0.1 s one 1, 2 with a 2 ms wait
    and 5 with a 50 ms one; a no-op one BATCH_MAX."""
    client, settings = faulty

    def size(handler_s: float, settle_s: float = 0.0, **overrides: object) -> int:
        config = settings(**overrides)
        slots = Slots(queue_on(client, config), noop, config, get_logger(), None)  # type: ignore[arg-type]
        slots.handler_s, slots.settle_s = handler_s, settle_s
        return slots.batch_size()

    assert [size(s) for s in (1.0, 0.1, 0.005, 0.0005, 0.00001)] == [1, 1, 4, 40, 50]
    assert [size(s, 0.002) for s in (1.0, 0.1, 0.005)] == [1, 2, 40]
    assert [size(s, 0.05) for s in (1.0, 0.5, 0.1)] == [1, 1, 5]
    assert size(0.1, 0.05, lease_seconds=1) == 1
    assert size(0.00001, batch_max=1) == 1
    assert size(0.00001, batch_max=1000) == 1000


def test_the_switch_margin_follows_the_claims_cost_not_the_batch_size(
    faulty: tuple[FaultyRedis, Callable[..., Settings]],
) -> None:
    """A 0.1 s handler handed 5 events per batch still switches for SWITCH_MARGIN more events;
    a 1 ms one for as many as cover two 20 ms round trips (40), or a claim's time in runs."""
    client, settings = faulty
    config = settings()
    queue = queue_on(client, config)
    slots = Slots(queue, noop, config, get_logger(), None)  # type: ignore[arg-type]

    def margin(handler_s: float, settle_s: float, claim_s: float) -> tuple[int, int]:
        slots.handler_s, slots.settle_s, slots.claim_s = handler_s, settle_s, claim_s
        slots.pace()
        return queue.batch_size, queue.switch_margin

    assert margin(0.1, 0.05, 0.005) == (5, 3)
    assert margin(0.001, 0.002, 0.005) == (50, 40)
    assert margin(0.001, 0.002, 0.1) == (50, 100)


async def test_a_refused_nack_logs_no_ack_for_the_events_handled_before_the_failure(
    faulty: tuple[FaultyRedis, Callable[..., Settings]],
) -> None:
    """When the lease is lost during a batch and an event of it fails, the nack is refused
    whole: the events handled before the failed one are logged lost, not acked, and run
    again; every event is acked once, in order."""
    client, settings = faulty
    config = settings(concurrency=1, lease_seconds=1)
    queue = queue_on(client, config)
    await push(queue, [NewEvent(1, f"e{i}", None) for i in range(6)])
    failed: list[str] = []

    async def loses_its_lease_then_fails(event: Event) -> None:
        if event.event_id == "e4" and not failed:
            failed.append(event.event_id)
            await client.delete(queue.keys.lock(1))
            raise ValueError("fails after the lease is gone")

    await consume(queue, loses_its_lease_then_fails, config, burst=True)
    found = attempts(config.event_log)
    refused = {a.event_id for a in found if a.outcome == "lost_lease"}
    assert failed == ["e4"] and "e4" in refused and len(refused) > 1
    acked_first = {a.event_id for a in found if a.outcome == "ack" and a.attempt == 1}
    assert not refused & acked_first, "an event of the refused nack was logged acked"
    assert_all_acked_once_in_order(config.event_log, 6)
    await queue.aclose()


def test_claims_take_at_most_a_round_while_handlers_outlast_them(
    faulty: tuple[FaultyRedis, Callable[..., Settings]],
) -> None:
    """With nothing measured, or a handler run longer than a claim, a claim asks for at most
    CLAIM_ROUND accounts; with a handler faster than a claim, for every idle slot."""
    client, settings = faulty
    config = settings()
    slots = Slots(queue_on(client, config), noop, config, get_logger(), None)  # type: ignore[arg-type]

    def asked(idle: int, handler_s: float, claim_s: float) -> int:
        slots.handler_s, slots.claim_s = handler_s, claim_s
        return slots.claim_round(idle)

    assert [asked(idle, 0.0, 0.0) for idle in (500, 64, 10)] == [64, 64, 10]
    assert [asked(500, handler_s, 0.005) for handler_s in (1.0, 0.1, 0.005)] == [64, 64, 64]
    assert [asked(500, handler_s, 0.005) for handler_s in (0.001, 0.00001)] == [500, 500]


def test_accounts_are_claimed_ahead_for_the_slots_that_free_up_within_a_handler_run(
    faulty: tuple[FaultyRedis, Callable[..., Settings]],
) -> None:
    """None while nothing is measured or claims are the slower part; 1 before slots were seen
    freeing up; else as many as free up in a handler run (or in AHEAD_COVER claims, when
    longer), at most CLAIM_ROUND."""
    client, settings = faulty
    config = settings()
    slots = Slots(queue_on(client, config), noop, config, get_logger(), None)  # type: ignore[arg-type]

    def ahead(handler_s: float, claim_s: float, free_every_s: float) -> int:
        slots.handler_s, slots.claim_s, slots.free_every_s = handler_s, claim_s, free_every_s
        return slots.claims_ahead()

    assert [ahead(0.0, 0.005, 0.01), ahead(0.001, 0.005, 0.01)] == [0, 0]
    assert ahead(0.1, 0.005, 0.0) == 1
    assert [ahead(0.1, 0.005, every) for every in (0.2, 0.01, 0.0001)] == [1, 10, 64]
    assert ahead(0.01, 0.02, 0.01) == 0
    assert ahead(0.03, 0.02, 0.01) == 4
