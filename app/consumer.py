"""The consumer process: CONCURRENCY slots fed by one claimer, lease renewal, reaper, signals.

A slot keeps its account through connection faults: every transition is idempotent, so it
sends the same call again, with backoff, while its lease is good by its own clock. Only a
refused token means the lease is lost. An ack or nack is sent until Redis answers, so the event
log records exactly what Redis holds.
"""

import asyncio
import contextlib
import inspect
import os
import random
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from structlog.typing import FilteringBoundLogger

from app.handlers import Handler
from app.queue import TRANSIENT, ClaimInterrupted, Event, Next, Queue, Step, Won
from app.settings import Settings

T = TypeVar("T")
OUTCOME_EVENTS = {
    "ack": "event_acked",
    "nack": "event_nacked",
    "dead": "event_dead_lettered",
    "lost_lease": "event_lease_lost",
}
RETRY_FIRST_S = 0.02  # first pause before a call is sent again after a connection fault
RETRY_MAX_S = 1.0  # the longest pause between two tries
LEASE_MARGIN = 0.1  # share of the lease a slot keeps in hand when it judges its own lease
MAX_FAILURES = 10  # unexpected slot failures within FAILURE_WINDOW_S that stop the consumer
FAILURE_WINDOW_S = 60.0
CLAIM_RETRY_S = 1.0  # pause of the claimer after an unexpected error


@dataclass(eq=False, slots=True)
class Holding:
    """What a slot holds: an account, its token, the lease by this process's clock (monotonic
    seconds), and the event in flight with whether it reached the handler."""

    account: int
    token: int
    lease_until: float
    event: Event | None = None
    ran: bool = False


class Consumer:
    """Runs `concurrency` slots; each drains one claimed account at a time, in seq order.

    `events` writes the event log (a failed write raises); `log` the diagnostics.
    """

    def __init__(
        self,
        queue: Queue,
        handler: Handler,
        settings: Settings,
        log: FilteringBoundLogger,
        events: FilteringBoundLogger,
    ) -> None:
        self._queue = queue
        self._settings = settings
        self._log = log
        self._events = events
        self._call = _as_async(handler, settings.concurrency)
        self._claims: asyncio.Queue[tuple[Event | Won, float] | None] = asyncio.Queue()
        self._idle = 0
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._lanes_done = asyncio.Event()
        self._reap_soon = asyncio.Event()
        self._held: dict[int, Holding] = {}
        self._lanes: list[asyncio.Task[None]] = []
        self._margin_s = settings.lease_seconds * LEASE_MARGIN
        self._failures: deque[float] = deque()
        self._faults = 0  # connection faults ridden out since the last report
        self.forced = False
        self.failing = False
        self._member = f"{socket.gethostname()}:{os.getpid()}:{settings.concurrency}"

    def stop(self) -> None:
        """First call: finish current events, release, exit. Second call: stop now."""
        if self._stopping.is_set():
            self.forced = True
            self._log.warning("shutdown_forced", held=len(self._held))
            for lane in self._lanes:
                lane.cancel()
            return
        self._log.info("shutdown_requested", held=len(self._held))
        self._stopping.set()
        self._wake.set()

    async def run(self, burst: bool = False) -> None:
        """Consume until stopped (or, in burst mode, until no account has work left)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        self._log.info(
            "consumer_started",
            slots=self._settings.concurrency,
            claim_order=self._settings.claim_order,
            lease_s=self._settings.lease_seconds,
            burst=burst,
        )
        self._lanes = [
            asyncio.create_task(self._lane(i)) for i in range(self._settings.concurrency)
        ]
        helpers = [asyncio.create_task(self._renewer()), asyncio.create_task(self._reaper())]
        await self._claimer(burst)
        for _ in self._lanes:
            self._claims.put_nowait(None)
        # Slots never raise; a forced stop cancels them.
        await asyncio.wait(self._lanes)
        # Helpers stop on this event, not by cancellation: on Python 3.11 a cancel that lands
        # while a Redis call completes can be swallowed, leaving the helper running forever.
        self._lanes_done.set()
        self._reap_soon.set()
        await asyncio.gather(*helpers)
        with contextlib.suppress(Exception):
            await self._queue.unregister(self._member)
        self._log.info("consumer_stopped", forced=self.forced, failing=self.failing)

    async def _claimer(self, burst: bool) -> None:
        pause = RETRY_FIRST_S
        while not self._stopping.is_set():
            if self._idle == 0:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                claimed, lease_until = await self._claim()
                drained = not claimed and burst and await self._all_done()
            except TRANSIENT:
                # A popped account whose claim never ran is nobody's: sweep now, not later.
                self._faults += 1
                self._reap_soon.set()
                await _sleep_unless(self._stopping, pause)
                pause = min(pause * 2, RETRY_MAX_S)
                continue
            except Exception:
                self._failed("claimer_failed")
                self._reap_soon.set()
                await _sleep_unless(self._stopping, CLAIM_RETRY_S)
                continue
            pause = RETRY_FIRST_S
            for item in claimed:
                self._idle -= 1
                self._claims.put_nowait((item, lease_until))
            if drained:
                self._log.info("burst_drained")
                self._stopping.set()

    async def _claim(self) -> tuple[list[Event | Won], float]:
        """Claim for the idle slots; the lease of what it won ends `lease_until` at the latest."""
        lease_until = time.monotonic() + self._settings.lease_seconds
        block_s = self._settings.claim_block_s
        try:
            return await self._queue.claim(self._idle, block_s), lease_until
        except ClaimInterrupted as lost:
            accounts, claim_id = lost.accounts, lost.claim_id
            resumed = await self._retrying(
                lambda: self._queue.resume_claim(accounts, claim_id),
                lambda: time.monotonic() < lease_until - self._margin_s,
            )
            if resumed is None:
                self._reap_soon.set()
            return list(resumed or []), lease_until

    async def _all_done(self) -> bool:
        return self._idle == self._settings.concurrency and await self._queue.drained()

    async def _lane(self, slot: int) -> None:
        while True:
            self._idle += 1
            self._wake.set()
            claimed = await self._claims.get()
            if claimed is None:
                return
            item, lease_until = claimed
            holding = Holding(item.account, item.token, lease_until)
            self._held[slot] = holding
            try:
                step = item if isinstance(item, Event) else await self._take(holding)
                while isinstance(step, Event):
                    holding.event, holding.ran = step, False
                    step = await self._handle(slot, holding, step)
                if step is None:
                    self._log.warning("account_left", account=holding.account, reason="no_answer")
            except Exception:
                self._failed("slot_failed", slot=slot, account=holding.account)
                await self._give_up(holding)
            finally:
                self._held.pop(slot, None)

    async def _handle(self, slot: int, holding: Holding, event: Event) -> Next | None:
        """Run the handler, settle the event, and return what the slot does next (None: the
        lease ran out while Redis did not answer)."""
        started = time.time_ns()
        holding.ran = True
        error = await self._run_handler(event)
        finished = time.time_ns()
        want_next = not self._stopping.is_set()
        if error is None:
            step = await self._retrying(lambda: self._queue.ack(event, want_next))
            outcome = "lost_lease" if step is Step.LOST else "ack"
            await self._record(slot, event, outcome, started, finished)
            return step
        dead = event.attempt >= self._settings.max_attempts
        text = f"{type(error).__name__}: {error}"
        step = await self._retrying(lambda: self._queue.nack(event, text, dead, want_next))
        outcome = "lost_lease" if step is Step.LOST else "dead" if dead else "nack"
        await self._record(slot, event, outcome, started, finished, error=text[:500])
        if step is not Step.RETRY:
            return step
        await _sleep_unless(self._stopping, self._settings.backoff_s(event.attempt))
        if self._stopping.is_set():
            return await self._release(holding)
        return await self._take(holding)

    async def _run_handler(self, event: Event) -> BaseException | None:
        """None when the handler returned, else what it raised, whatever its type: a handler's
        failure is its event's, never the slot's."""
        try:
            await self._call(event)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # a forced stop, not the handler
            return exc
        except BaseException as exc:
            return exc
        return None

    async def _take(self, holding: Holding) -> Next | None:
        step = await self._retrying(
            lambda: self._queue.take(holding.account, holding.token), self._lease_good(holding)
        )
        return self._noted(holding, step)

    async def _release(self, holding: Holding) -> Next | None:
        event, ran = holding.event, holding.ran
        step = await self._retrying(
            lambda: self._queue.release(holding.account, holding.token, event, ran),
            self._lease_good(holding),
        )
        return self._noted(holding, step)

    def _noted(self, holding: Holding, step: Next | None) -> Next | None:
        if step is Step.LOST:
            self._log.warning("lease_lost", account=holding.account, token=holding.token)
        return step

    def _lease_good(self, holding: Holding) -> Callable[[], bool]:
        return lambda: time.monotonic() < holding.lease_until - self._margin_s

    @overload
    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T: ...

    @overload
    async def _retrying(
        self, call: Callable[[], Awaitable[T]], keep_on: Callable[[], bool]
    ) -> T | None: ...

    async def _retrying(
        self, call: Callable[[], Awaitable[T]], keep_on: Callable[[], bool] | None = None
    ) -> T | None:
        """`call()`; after a connection fault the same call again, with backoff, while
        `keep_on()` (without it: until Redis answers, however long that takes). None when it
        gave up."""
        pause = RETRY_FIRST_S
        while True:
            try:
                return await call()
            except TRANSIENT:
                self._faults += 1
                if keep_on is not None and not keep_on():
                    return None
                await asyncio.sleep(pause * (0.5 + random.random()))
                pause = min(pause * 2, RETRY_MAX_S)

    async def _record(
        self, slot: int, event: Event, outcome: str, started: int, finished: int, **extra: str
    ) -> None:
        """One event-log line; a failed write is tried again for half a lease, then the line
        goes to the diagnostics (stderr when the file takes nothing) and the error is raised."""
        line = {
            "account": event.account,
            "seq": event.seq,
            "event_id": event.event_id,
            "attempt": event.attempt,
            "outcome": outcome,
            "slot": slot,
            "token": event.token,
            "enqueued_ns": event.enqueued_ns,
            "started_ns": started,
            "finished_ns": finished,
            **extra,
        }
        deadline = time.monotonic() + self._settings.lease_seconds / 2
        pause = RETRY_FIRST_S
        while True:
            try:
                self._events.info(OUTCOME_EVENTS[outcome], **line)
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    self._log.error(
                        "event_log_line_lost", logged_as=OUTCOME_EVENTS[outcome], **line
                    )
                    raise
                self._log.error(
                    "event_log_write_failed", account=event.account, seq=event.seq, error=str(exc)
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_MAX_S)

    async def _give_up(self, holding: Holding) -> None:
        """After a slot failed: release its account (the event in flight back at the head), or
        leave it to its lease and the reaper when Redis does not answer in time."""
        try:
            step = await self._release(holding)
        except Exception:
            self._log.exception("release_failed", account=holding.account)
            return
        if step is None:
            self._log.warning("account_left", account=holding.account, reason="no_answer")

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
        while not self._lanes_done.is_set():
            pause = period
            try:
                await self._renew_held()
                await self._queue.register(self._member)
            except TRANSIENT:
                self._faults += 1
                pause = min(period, RETRY_MAX_S)
            except Exception:
                self._failed("renewer_failed")
            if self._faults:
                self._log.warning("redis_faults_ridden_out", calls=self._faults)
                self._faults = 0
            await _sleep_unless(self._lanes_done, pause)

    async def _renew_held(self) -> None:
        held = list(self._held.values())
        if not held:
            return
        sent = time.monotonic()
        renewed = await self._queue.renew([(h.account, h.token) for h in held])
        still_held = {id(h) for h in self._held.values()}
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
        while not self._lanes_done.is_set():
            soon = await _sleep_unless(self._reap_soon, interval)
            if self._lanes_done.is_set():
                return
            self._reap_soon.clear()
            try:
                if soon or await self._queue.try_reaper_lock(interval):
                    reaped = await self._queue.reap()
                    if reaped:
                        self._log.warning("accounts_reaped", count=reaped)
            except TRANSIENT:
                self._faults += 1
            except Exception:
                self._failed("reaper_failed")


async def _sleep_unless(event: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds` or until `event` is set; True when it was set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()


def _as_async(handler: Handler, threads: int) -> Callable[[Event], Awaitable[None]]:
    """Async handlers run on the loop; sync ones in a thread pool sized to the slots."""
    if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004
    ):
        return handler  # type: ignore[return-value]
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="evq-handler")

    async def call(event: Event) -> None:
        await asyncio.get_running_loop().run_in_executor(pool, handler, event)

    return call
