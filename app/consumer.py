"""The consumer process: CONCURRENCY slots fed by one claimer, lease renewal, reaper, signals."""

import asyncio
import contextlib
import inspect
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from redis.exceptions import RedisError
from structlog.typing import FilteringBoundLogger

from app.handlers import Handler
from app.queue import Event, Next, Queue, Step
from app.settings import Settings

OUTCOME_EVENTS = {
    "ack": "event_acked",
    "nack": "event_nacked",
    "dead": "event_dead_lettered",
    "lost_lease": "event_lease_lost",
}
CLAIM_RETRY_S = 1.0
ACK_CHECK_RETRY_S = 0.2


class Consumer:
    """Runs `concurrency` slots; each drains one claimed account at a time, in seq order."""

    def __init__(
        self, queue: Queue, handler: Handler, settings: Settings, log: FilteringBoundLogger
    ) -> None:
        self._queue = queue
        self._settings = settings
        self._log = log
        self._call = _as_async(handler, settings.concurrency)
        self._claims: asyncio.Queue[Event | None] = asyncio.Queue()
        self._idle = 0
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._lanes_done = asyncio.Event()
        self._held: dict[int, tuple[int, int]] = {}  # slot -> (account, token)
        self._lanes: list[asyncio.Task[None]] = []
        self.forced = False
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
        await asyncio.gather(*self._lanes, return_exceptions=True)
        # Helpers stop on this event, not by cancellation: on Python 3.11 a cancel that lands
        # while a Redis call completes can be swallowed, leaving the helper running forever.
        self._lanes_done.set()
        await asyncio.gather(*helpers)
        with contextlib.suppress(RedisError):
            await self._queue.unregister(self._member)
        self._log.info("consumer_stopped", forced=self.forced)

    async def _claimer(self, burst: bool) -> None:
        while not self._stopping.is_set():
            if self._idle == 0:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                events = await self._queue.claim(self._idle, self._settings.claim_block_seconds)
                drained = not events and burst and await self._all_done()
            except RedisError as exc:
                self._log.error("claim_failed", error=str(exc))
                await _sleep_unless(self._stopping, CLAIM_RETRY_S)
                continue
            for event in events:
                self._idle -= 1
                self._claims.put_nowait(event)
            if drained:
                self._log.info("burst_drained")
                self._stopping.set()

    async def _all_done(self) -> bool:
        return self._idle == self._settings.concurrency and await self._queue.drained()

    async def _lane(self, slot: int) -> None:
        while True:
            self._idle += 1
            self._wake.set()
            step: Next | None = await self._claims.get()
            if step is None:
                return
            try:
                while isinstance(step, Event):
                    self._held[slot] = (step.account, step.token)
                    step = await self._handle(slot, step)
            except RedisError as exc:
                # Unknown whether the last script ran: leave the account alone; its lease
                # expires and the reaper hands the in-flight event out again (attempt + 1).
                self._log.error("account_abandoned", slot=slot, error=str(exc))
            finally:
                self._held.pop(slot, None)

    async def _handle(self, slot: int, event: Event) -> Next:
        started = time.time_ns()
        try:
            await self._call(event)
        except Exception as exc:
            return await self._failed(slot, event, started, exc)
        finished = time.time_ns()
        try:
            step = await self._queue.ack(event, want_next=not self._stopping.is_set())
        except RedisError:
            # The reply was lost (say, Redis restarted), but the ack may have landed: ask, so
            # that the log holds every ack Redis holds. Then the lane gives the account up.
            if await self._ack_landed(event):
                self._record(slot, event, "ack", started, finished)
            raise
        self._record(slot, event, "lost_lease" if step is Step.LOST else "ack", started, finished)
        return step

    async def _ack_landed(self, event: Event) -> bool:
        """Whether Redis holds the ack of `event`, asking until it answers or the lease is up."""
        deadline = time.monotonic() + self._settings.lease_seconds
        while True:
            try:
                return await self._queue.acked_through(event.account) >= event.seq
            except RedisError:
                if time.monotonic() > deadline:
                    return False
                await asyncio.sleep(ACK_CHECK_RETRY_S)

    async def _failed(self, slot: int, event: Event, started: int, exc: Exception) -> Next:
        finished = time.time_ns()
        dead = event.attempt >= self._settings.max_attempts
        error = f"{type(exc).__name__}: {exc}"
        step = await self._queue.nack(event, error, dead, want_next=not self._stopping.is_set())
        outcome = "lost_lease" if step is Step.LOST else "dead" if dead else "nack"
        self._record(slot, event, outcome, started, finished, error=error[:500])
        if step is not Step.RETRY:
            return step
        await _sleep_unless(self._stopping, self._settings.backoff_s(event.attempt))
        if self._stopping.is_set():
            return await self._queue.release(event.account, event.token)
        return await self._queue.take(event.account, event.token)

    def _record(
        self, slot: int, event: Event, outcome: str, started: int, finished: int, **extra: str
    ) -> None:
        self._log.info(
            OUTCOME_EVENTS[outcome],
            account=event.account,
            seq=event.seq,
            event_id=event.event_id,
            attempt=event.attempt,
            outcome=outcome,
            slot=slot,
            token=event.token,
            enqueued_ns=event.enqueued_ns,
            started_ns=started,
            finished_ns=finished,
            **extra,
        )

    async def _renewer(self) -> None:
        period = self._settings.lease_seconds / 3
        while not self._lanes_done.is_set():
            held = list(self._held.values())
            try:
                await self._queue.register(self._member)
                renewed = await self._queue.renew(held) if held else []
            except RedisError as exc:
                self._log.error("renew_failed", error=str(exc))
                renewed = []
            still_held = set(self._held.values())
            for (account, token), ok in zip(held, renewed, strict=False):
                if not ok and (account, token) in still_held:
                    self._log.warning("lease_lost", account=account, token=token)
            await _sleep_unless(self._lanes_done, period)

    async def _reaper(self) -> None:
        interval = self._settings.reaper_seconds
        while not await _sleep_unless(self._lanes_done, interval):
            try:
                if await self._queue.try_reaper_lock(interval):
                    reaped = await self._queue.reap()
                    if reaped:
                        self._log.warning("accounts_reaped", count=reaped)
            except RedisError as exc:
                self._log.error("reap_failed", error=str(exc))


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
