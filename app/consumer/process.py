"""The consumer process: CONCURRENCY slots fed by one claimer, with lease renewal, heartbeats,
the reaper and signals.

One event's trip, and the function that does each step:

1. claim: `Consumer._claimer` asks `Queue.claim` for as many accounts as slots are idle, at
   most a claim round of them while handlers outlast claims (`Slots.claim_round`), and
   meanwhile keeps a few claimed ahead for the next slots to free up (`Slots.claims_ahead`).
   It reads the top of every shard's ready index, then sends one MULTI per shard (INCR+EXPIRE
   lock, fence INCR, the take script): one round trip per master for all the accounts won.
2. take: the take script in that MULTI hands back each won account's head event with its
   attempt and fencing token; `Consumer._run_slot` gives it to the next idle slot.
3. handle: `Slots._handle` runs the handler (`Slots._run_handler`: on the loop, or in the
   thread pool for a sync handler), bounded by HANDLER_TIMEOUT_SECONDS.
4. settle: `Slots._settling` logs the attempt as settling, then `Queue.ack` or `Queue.nack`
   goes out, sent again after connection faults by `Slots.retrying`. The settles of one loop
   turn, by any slot, go out as one settle.lua call per shard (`app/engine/settles.py`), and
   every script call of a loop turn in one pipelined round trip per master (`Scripts.call`,
   `Scripts.send`). The ack hands back the account's next
   event, so the slot goes back to step 3 without another round trip.
5. log: `Slots._record` writes the outcome line (`EventLog.write`) once Redis answered; the
   lines of one loop turn go out in one write().

When the settle hands back no event, the slot is free again: the account was drained, given up
for a longer backlog, or lost with its lease. Meanwhile `_renewer` extends the leases held,
`_heartbeat` registers the process and folds its `Tally` into Redis, and `_reaper` sweeps
orphaned accounts back into the ready indexes. What a slot does with its account, faults
included, is `app/consumer/slots.py`.
"""

import asyncio
import contextlib
import functools
import os
import signal
import socket
import sys
import time
from collections import deque
from typing import Any

from structlog.typing import FilteringBoundLogger

from app import log
from app.consumer.slots import Holding, Slots, sleep_unless
from app.engine import (
    TRANSIENT,
    ClaimInterrupted,
    Event,
    Queue,
    UnsafeRedis,
    Won,
    inspect,
    registry,
)
from app.engine.connection import LONGEST_PAUSE_S, backoff
from app.engine.registry import HEARTBEAT_S
from app.handlers import BatchHandler, Handler, close
from app.settings import Settings

HELD_SHOWN = 50  # accounts listed in the SIGUSR1 line (it stays well under 4 KiB)
MAX_FAILURES = 10  # unexpected slot failures within FAILURE_WINDOW_S that stop the consumer
FAILURE_WINDOW_S = 60.0
CLAIM_RETRY_S = 1.0  # pause of the claimer after an unexpected error
LOOK_EVERY_S = 0.25  # how often a busy consumer reads the best waiting backlog of the shards
GUARD_EVERY_S = 30.0  # how often a running consumer checks that Redis still evicts nothing


class Consumer:
    """Runs `concurrency` slots; each drains one claimed account at a time, in seq order.

    `slots` do the work of each slot; `log` takes the diagnostics.
    """

    def __init__(
        self, queue: Queue, slots: Slots, settings: Settings, log: FilteringBoundLogger
    ) -> None:
        self._queue = queue
        self._settings = settings
        self._log = log
        self._claims: asyncio.Queue[tuple[Event | Won, Holding] | None] = asyncio.Queue()
        self._idle = 0  # idle slots no claim was handed to yet; below 0: claims waiting
        self._waiting: set[Holding] = set()  # claimed, no slot took it yet
        self._wake = asyncio.Event()
        self._slots = slots
        self._tally = slots.tally
        self._stopping = slots.stopping
        self._slots_done = asyncio.Event()
        self._reap_soon = asyncio.Event()
        self._held: dict[int, Holding] = {}
        self._slot_tasks: list[asyncio.Task[None]] = []
        self._failures: deque[float] = deque()
        self.forced = False
        self.failing = False
        self._member = f"{socket.gethostname()}:{os.getpid()}:{settings.concurrency}"
        self._started = time.monotonic()

    def stop(self) -> None:
        """First call: finish current events, release, exit. Second call: stop now."""
        if self._stopping.is_set():
            self.forced = True
            self._log.warning("shutdown_forced", held=len(self._held))
            for task in self._slot_tasks:
                task.cancel()
            return
        self._log.info("shutdown_requested", held=len(self._held))
        self._stopping.set()
        self._wake.set()

    async def run(self, burst: bool = False) -> None:
        """Consume until stopped (or, in burst mode, until no account has work left)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGUSR1, self.log_state)
        self._log.info(
            "consumer_started",
            slots=self._settings.concurrency,
            claim_order=self._settings.claim_order,
            lease_s=self._settings.lease_seconds,
            burst=burst,
        )
        self._slot_tasks = [
            asyncio.create_task(self._run_slot(i)) for i in range(self._settings.concurrency)
        ]
        meter = functools.partial(self._slots.meter_loop, self._slots_done)
        helpers = [
            asyncio.create_task(helper())
            for helper in (self._renewer, self._heartbeat, self._reaper, self._guard, meter)
        ]
        await self._claimer(burst)
        for _ in self._slot_tasks:
            self._claims.put_nowait(None)
        # Slots never raise; a forced stop cancels them.
        await asyncio.wait(self._slot_tasks)
        # Helpers stop on this event, not by cancellation: on Python 3.11 a cancel that lands
        # while a Redis call completes can be swallowed, leaving the helper running forever.
        self._slots_done.set()
        self._reap_soon.set()
        await asyncio.gather(*helpers)
        with contextlib.suppress(Exception):
            await registry.unregister(self._queue, self._member)
        self._log.info("consumer_stopped", forced=self.forced, failing=self.failing)

    async def _claimer(self, burst: bool) -> None:
        pauses = backoff()
        while not self._stopping.is_set():
            # Ahead only while the latest claim or look left accounts waiting: claimed as the
            # ready index runs dry, they would wait here while other consumers' slots idle.
            wanted = self._idle + (self._slots.claims_ahead() if self._queue.best_elsewhere else 0)
            if wanted <= 0:
                await self._look()
                continue
            try:
                claimed, lease_until = await self._claim(wanted)
                drained = not claimed and burst and await self._all_done()
            except TRANSIENT:
                # A popped account whose claim never ran is nobody's: sweep now, not later.
                self._tally.faults += 1
                self._reap_soon.set()
                await sleep_unless(self._stopping, next(pauses))
                continue
            except Exception:
                self._failed("claimer_failed")
                self._reap_soon.set()
                await sleep_unless(self._stopping, CLAIM_RETRY_S)
                continue
            pauses = backoff()
            for item in claimed:
                self._idle -= 1
                holding = Holding(item.account, item.token, lease_until)
                self._waiting.add(holding)
                self._claims.put_nowait((item, holding))
            if drained:
                self._log.info("burst_drained")
                self._stopping.set()

    async def _look(self) -> None:
        """While every slot is busy: wait for one to be idle, and meanwhile keep the view of
        the best waiting account fresh (when there are other shards to see)."""
        self._wake.clear()
        if self._settings.shards == 1:
            await self._wake.wait()
            return
        if await sleep_unless(self._wake, LOOK_EVERY_S):
            return
        try:
            await self._queue.look()
        except TRANSIENT:
            self._tally.faults += 1

    async def _claim(self, wanted: int) -> tuple[list[Event | Won], float]:
        """Claim for `wanted` slots; the lease of what it won ends `lease_until` at the latest."""
        started = time.monotonic()
        lease_until = started + self._settings.lease_seconds
        block_s = self._settings.claim_block_s
        try:
            claimed = await self._queue.claim(self._slots.claim_round(wanted), block_s)
            if claimed:  # a claim that found nothing waited for work: not its cost
                self._slots.claim_took(time.monotonic() - started)
            return claimed, lease_until
        except ClaimInterrupted as lost:
            accounts, claim_id = lost.accounts, lost.claim_id
            resumed = await self._slots.retrying(
                lambda: self._queue.resume_claim(accounts, claim_id),
                lambda: self._slots.lease_good(lease_until),
            )
            if resumed is None:
                self._reap_soon.set()
            return [*lost.claimed, *(resumed or [])], lease_until

    async def _all_done(self) -> bool:
        return self._idle == self._settings.concurrency and await inspect.drained(self._queue)

    async def _run_slot(self, slot: int) -> None:
        while True:
            self._idle += 1
            self._wake.set()
            claimed = await self._claims.get()
            if claimed is None:
                return
            item, holding = claimed
            self._waiting.discard(holding)
            self._held[slot] = holding
            try:
                await self._slots.drain(slot, holding, item)
            except Exception:
                self._failed("slot_failed", slot=slot, account=holding.account)
                await self._slots.give_up(holding)
            finally:
                self._held.pop(slot, None)
                self._slots.freed()

    def _failed(self, what: str, **context: Any) -> None:
        """Log an unexpected error with its traceback; MAX_FAILURES of them within
        FAILURE_WINDOW_S stop the consumer, which then exits 1 for supervisord to restart."""
        self._log.exception(what, **context)
        now = time.monotonic()
        self._failures.append(now)
        while self._failures[0] < now - FAILURE_WINDOW_S:
            self._failures.popleft()
        if len(self._failures) >= MAX_FAILURES and not self.failing:
            self.failing = True
            message = f"{len(self._failures)} unexpected failures within {FAILURE_WINDOW_S:g} s"
            self._log.critical("consumer_failing", reason=message)
            print(f"evq consume: {message}; stopping to be restarted", file=sys.stderr)
            self.stop()

    async def _renewer(self) -> None:
        period = self._settings.lease_seconds / 3
        while not self._slots_done.is_set():
            pause = period
            try:
                await self._renew_held()
            except TRANSIENT:
                self._tally.faults += 1
                pause = min(period, LONGEST_PAUSE_S)
            except Exception:
                self._failed("renewer_failed")
            if self._tally.faults:
                self._log.warning("redis_faults_ridden_out", calls=self._tally.faults)
                self._tally.faults = 0
            await sleep_unless(self._slots_done, pause)

    async def _heartbeat(self) -> None:
        """Every HEARTBEAT_S: this consumer is alive, with so many busy slots, and what its
        slots measured meanwhile goes into the metrics hash; once more after the slots end."""
        while True:
            done = self._slots_done.is_set()
            counts, sums = self._tally.take()
            try:
                await registry.heartbeat(self._queue, self._member, len(self._held), counts, sums)
            except TRANSIENT:
                self._tally.faults += 1
                self._tally.put_back(counts, sums)
            except Exception:
                self._failed("heartbeat_failed")
            if done:
                return
            await sleep_unless(self._slots_done, HEARTBEAT_S)

    def log_state(self) -> None:
        """SIGUSR1: one line with what this consumer is doing."""
        now = time.monotonic()
        held = sorted(self._held.values(), key=lambda h: h.account)
        self._log.info(
            "consumer_state",
            slots=self._settings.concurrency,
            busy=len(held),
            free=self._settings.concurrency - len(held),
            held=[
                {
                    "account": h.account,
                    "token": h.token,
                    "seq": h.event.seq if h.event else None,
                    "lease_left_s": round(max(0.0, h.lease_until - now), 3),
                }
                for h in held[:HELD_SHOWN]
            ],
            held_not_shown=max(0, len(held) - HELD_SHOWN),
            claimed_ahead=len(self._waiting),
            settled=self._tally.settled,
            lease_losses=self._tally.lease_losses,
            redis_faults=self._tally.faults,
            stopping=self._stopping.is_set(),
            uptime_s=round(now - self._started, 3),
        )

    async def _renew_held(self) -> None:
        held = [*self._held.values(), *self._waiting]
        if not held:
            return
        sent = time.monotonic()
        renewed = await self._queue.renew([(h.account, h.token) for h in held])
        still_held = {id(h) for h in (*self._held.values(), *self._waiting)}
        for holding, ok in zip(held, renewed, strict=True):
            if ok:
                holding.lease_until = sent + self._settings.lease_seconds
            elif id(holding) in still_held:
                # Lost, or released by a reply its slot has not read yet: the slot finds out
                # which from its next call, and stops retrying on this lease meanwhile.
                holding.lease_until = 0.0
                self._log.info("renew_refused", account=holding.account, token=holding.token)

    async def _reaper(self) -> None:
        """Sweeps orphans every REAPER_SECONDS (one consumer at a time), and at once after a
        claim may have left one."""
        interval = self._settings.reaper_seconds
        while not self._slots_done.is_set():
            soon = await sleep_unless(self._reap_soon, interval)
            if self._slots_done.is_set():
                return
            self._reap_soon.clear()
            try:
                if soon or await registry.try_reaper_lock(self._queue, interval):
                    reaped = await self._queue.reap()
                    if reaped:
                        self._log.warning("accounts_reaped", count=reaped)
            except TRANSIENT:
                self._tally.faults += 1
            except Exception:
                self._failed("reaper_failed")

    async def _guard(self) -> None:
        """Every GUARD_EVERY_S: a Redis switched to an evicting maxmemory-policy while this
        consumer runs stops it, loudly (its claims and acks could vanish); supervisord's
        restart then refuses to start until the policy is noeviction again."""
        while not await sleep_unless(self._slots_done, GUARD_EVERY_S):
            try:
                await self._queue.guard.check_eviction(warn=False)
            except UnsafeRedis as exc:
                self._log.critical("redis_evicting", reason=str(exc))
                print(f"evq consume: {exc}; stopping", file=sys.stderr)
                self.failing = True
                self.stop()
                return
            except TRANSIENT:
                self._tally.faults += 1
            except Exception:
                self._failed("guard_failed")


async def consume(
    queue: Queue, handler: Handler | BatchHandler, settings: Settings, burst: bool = False
) -> Consumer:
    """Run a consumer with `handler` on an open `queue` until it is stopped (or, in `burst`
    mode, until no account has work left); returns it, to tell how it ended. Its event lines
    and diagnostics go to EVENT_LOG."""
    diagnostics = log.configure(settings, fallback=True)
    # A slot waits for an unwritable event log at most half a lease, then gives up.
    events = log.EventLog(settings, diagnostics, settings.lease_seconds / 2)
    consumer = Consumer(
        queue, Slots(queue, handler, settings, diagnostics, events), settings, diagnostics
    )
    try:
        await consumer.run(burst=burst)
    finally:
        await close(handler)
    return consumer
