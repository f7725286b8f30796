"""A hypothesis state machine drives the engine against real Redis and checks I1, I2, I4, I7."""

import asyncio
import itertools
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, TypeVar

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from app.engine import Event, NewEvent, Nodes, Queue, Step
from stack.servers import RedisServer
from tests.process.helpers import seq_of
from tests.support import in_flight, snapshot
from tests.support import settings as evq_settings

T = TypeVar("T")
Call = Callable[[], Coroutine[Any, Any, Event | Step]]
ACCOUNTS = st.integers(1, 3)
SLOTS = st.integers(0, 2)


class QueueMachine(RuleBasedStateMachine):
    """Slots that claim, ack, nack, crash and lose leases, against a model of what is owed."""

    url: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        config = evq_settings(self.url, lease_seconds=60)
        self.queue = Queue(Nodes(config), config)
        self.client = self.queue.nodes.masters()[0]
        self.run(self.client.flushall())
        self.ids = itertools.count()
        self.pushed: dict[int, list[int]] = {1: [], 2: [], 3: []}  # seqs, in push order
        self.settled: dict[int, list[int]] = {1: [], 2: [], 3: []}
        self.acked: set[tuple[int, int]] = set()
        self.dead: set[tuple[int, int]] = set()
        self.slots: dict[int, Event] = {}
        self.stale: set[tuple[int, int]] = set()  # (account, token) whose lease expired
        # Per slot, its latest transition and the answer it got: a retry may send it again.
        self.last: dict[int, tuple[Call, Event | Step, Event]] = {}

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.queue.aclose())
        self.loop.close()

    @rule(account=ACCOUNTS, n=st.integers(1, 3))
    def push(self, account: int, n: int) -> None:
        events = [NewEvent(account, f"e{next(self.ids)}") for _ in range(n)]
        results = self.run(self.queue.push_many(events))
        assert all(r.queued for r in results)
        seqs = self.pushed[account] + [r.seq for r in results]
        assert seqs == sorted(set(seqs)), "I8: a seq did not grow"
        self.pushed[account] = seqs

    def send(self, slot: int, call: Call, about: Event) -> Event | Step:
        answer = self.run(call())
        self.last[slot] = (call, answer, about)
        return answer

    @rule(slot=SLOTS)
    def claim(self, slot: int) -> None:
        if slot in self.slots:
            return
        for event in self.run(self.queue.claim(1, 0)):
            assert isinstance(event, Event)
            self.last.pop(slot, None)
            self.hold(slot, event)

    @precondition(lambda self: self.slots)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(self.slots)))
        event = self.slots[slot]
        step = self.send(slot, lambda: self.queue.ack(event), event)
        if self.check_lost(slot, event, step):
            return
        self.settle(event, self.acked)
        self.follow(slot, step)

    @precondition(lambda self: self.slots)
    @rule(data=st.data(), dead=st.booleans())
    def nack(self, data: st.DataObject, dead: bool) -> None:
        slot = data.draw(st.sampled_from(sorted(self.slots)))
        event = self.slots[slot]
        step = self.send(slot, lambda: self.queue.nack(event, "boom", dead=dead), event)
        if self.check_lost(slot, event, step):
            return
        if dead:
            self.settle(event, self.dead)
        elif step is Step.RETRY:
            step = self.send(slot, lambda: self.queue.take(event.account, event.token), event)
            assert isinstance(step, Event) and step.seq == event.seq
            assert step.attempt == event.attempt + 1
        self.follow(slot, step)

    @precondition(lambda self: self.slots)
    @rule(data=st.data())
    def lease_expires(self, data: st.DataObject) -> None:
        """The owner's lease runs out (its lock key vanishes) and the reaper sweeps."""
        account = data.draw(st.sampled_from(sorted(self.slots.values(), key=repr))).account
        self.run(self.client.delete(self.queue.keys.lock(account)))
        self.stale |= {(e.account, e.token) for e in self.slots.values() if e.account == account}
        self.run(self.queue.reap())

    @precondition(lambda self: self.slots)
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(self.slots)))
        del self.slots[slot]
        self.last.pop(slot, None)

    @precondition(lambda self: self.last)
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        """I7: a slot's latest call sent again (its reply was lost) changes nothing and gets the
        same answer; an event handed out then and held no longer reads as released (the call
        landed) or, for a take, as lost."""
        slot = data.draw(st.sampled_from(sorted(self.last)))
        call, answer, about = self.last[slot]
        before = self.run(snapshot(self.queue))
        again = self.run(call())
        assert self.run(snapshot(self.queue)) == before, "a replayed call changed Redis"
        if isinstance(answer, Event) and (about.account, about.token) in self.stale:
            assert again in (answer, Step.RELEASED, Step.LOST)
        else:
            assert again == answer

    @rule()
    def reap(self) -> None:
        self.run(self.queue.reap())

    def hold(self, slot: int, event: Event) -> None:
        rivals = [
            e
            for e in self.slots.values()
            if e.account == event.account and (e.account, e.token) not in self.stale
        ]
        assert not rivals, f"I4: account {event.account} handed to a second live owner"
        oldest = self.pushed[event.account][len(self.settled[event.account])]
        assert event.seq == oldest, "I1: not the oldest event"
        self.slots[slot] = event

    def follow(self, slot: int, step: Event | Step) -> None:
        del self.slots[slot]
        if isinstance(step, Event):
            self.hold(slot, step)

    def check_lost(self, slot: int, event: Event, step: Event | Step) -> bool:
        if step is not Step.LOST:
            assert (event.account, event.token) not in self.stale, "I4: stale owner's call took"
            return False
        assert (event.account, event.token) in self.stale, "live owner refused"
        del self.slots[slot]
        return True

    def settle(self, event: Event, into: set[tuple[int, int]]) -> None:
        seqs = self.settled[event.account]
        oldest = self.pushed[event.account][len(seqs)]
        assert event.seq == oldest, f"I1: seq {event.seq} settled after {seqs[-1:]}"
        seqs.append(event.seq)
        into.add((event.account, event.seq))

    @invariant()
    def nothing_lost_or_doubled(self) -> None:
        """I2: every pushed seq is in exactly one place: acked, dead, pending or in flight."""
        for account, pushed in self.pushed.items():
            pending = self.run(self.client.lrange(self.queue.keys.pending(account), 0, -1))
            flying = self.run(in_flight(self.queue, account))
            queued = [seq_of(b) for b in pending]  # the batch in flight is its head
            assert sorted(queued + self.settled[account]) == pushed
            assert len(flying) <= 1 and flying == pending[: len(flying)]


def test_engine_state_machine(redis_server: RedisServer) -> None:
    """Random interleavings of every engine step keep order, lose nothing, fence stale owners."""
    QueueMachine.url = redis_server.url
    run_state_machine_as_test(
        QueueMachine,
        settings=settings(
            max_examples=60,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
