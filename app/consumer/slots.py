"""What a consumer's slot does with the account it holds: run the handler, settle the event,
and ride out connection faults.

Every transition is idempotent, so after a fault a slot sends the same call again, with
backoff, while its lease is good by its own clock; only a refused token means the lease is
lost. Acks and nacks are sent until Redis answers, so the event log records exactly what
Redis holds.
"""

import asyncio
import contextlib
import inspect
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from structlog.typing import FilteringBoundLogger

from app.consumer.tally import Tally
from app.engine import TRANSIENT, Event, Next, Queue, Step, Won
from app.engine.connection import backoff
from app.handlers import BatchHandler, Delivery, Failed, Handler
from app.log import EventLog
from app.settings import Settings

T = TypeVar("T")
OUTCOME_EVENTS = {
    "ack": "event_acked",
    "nack": "event_nacked",
    "dead": "event_dead_lettered",
    "lost_lease": "event_lease_lost",
}
LEASE_MARGIN = 0.1  # share of the lease a slot keeps in hand when it judges its own lease
BATCH_TARGET_S = 0.02  # handler time a batch covers at least: about a settle round trip under load
# A settle's wait (from the batch's last run to the next batch's first) may cost the slot this
# share of a batch's handler time: a batch covers the measured wait this many times over ...
SETTLE_SHARE = 0.01
BATCH_COVER_MAX_S = 0.5  # ... but at most this long: a handler of 0.5 s or more gets one at a time
LAG_PROBE_S = 0.01  # how often the event loop's lateness is measured
# Of the newest probe in the loop's lateness: it follows a load that comes at once (a drain's
# first claim) within a few probes, as fast as the handler's average follows its runs.
LAG_WEIGHT = 0.3
EWMA_WEIGHT = 0.05  # of the newest claim (or settle) in the moving average of claim (settle) time
PACE_WINDOW_S = 0.1  # handler runs are pooled this long, then their mean moves the pace
PACE_WEIGHT = 0.3  # of the newest window's mean in the moving average of handler time
SHORTEST_RUN_S = 1e-6  # what one handler run counts at least, however fast it measured
MAX_SWITCH_MARGIN = 1000  # events of backlog: beyond this a switch always pays
SWITCH_BATCHES = 2  # a switch must gain at least this many batches of backlog
CLAIM_ROUND = 64  # accounts a claim asks for at most, while a handler run outlasts a claim
AHEAD_COVER = 2  # claims whose time the accounts claimed ahead cover at least


class HandlerTimeout(Exception):
    """The handler ran past HANDLER_TIMEOUT_SECONDS; its attempt is nacked like any failure."""


@dataclass(eq=False, slots=True)
class Holding:
    """What a slot holds: an account, its token, the lease by this process's clock (monotonic
    seconds), and the batch in flight (its first event) with whether it reached the handler."""

    account: int
    token: int
    lease_until: float
    event: Event | None = None
    ran: bool = False


class Slots:
    """The work of a consumer's slots, each draining the one account it holds, in seq order.

    Once `stopping` is set, events settle without taking the next. `tally` holds what the
    slots count and measure, for the consumer process to report and fold into Redis.
    """

    def __init__(
        self,
        queue: Queue,
        handler: Handler | BatchHandler,
        settings: Settings,
        log: FilteringBoundLogger,
        events: EventLog,
    ) -> None:
        self._queue = queue
        self._settings = settings
        self._log = log
        self._events = events
        self._call = _as_async(handler, settings.concurrency)
        self._handler_timeout_s = settings.handler_timeout_seconds
        self._margin_s = settings.lease_seconds * LEASE_MARGIN
        self._cover_max_s = min(BATCH_COVER_MAX_S, self._margin_s)
        self.stopping = asyncio.Event()
        self.tally = Tally()
        self.handler_s = 0.0  # moving average of one event's handler time (0: none measured)
        self._window = [0.0, 0, 0.0]  # handler seconds, events, and since when (monotonic)
        self.claim_s = 0.0  # moving average of a claim that found work (0: none yet)
        self.loop_lag_s = 0.0  # moving average of how late the event loop runs a callback
        self.settle_s = 0.0  # moving average of a settle's wait (0: none measured yet)
        self.free_every_s = 0.0  # moving average of the time between two slots freeing up
        self._freed_at = 0.0  # when a slot last freed up (monotonic; 0: none yet)
        self._takes_batch = bool(getattr(handler, "takes_batch", False))

    async def drain(self, slot: int, holding: Holding, first: Event | Won) -> None:
        """Handle the held account's batches until it is released, drained or lost. A claim
        that cannot run goes back unrun (its batch at the head, no attempt counted): one whose
        take did not run (`Won`), or one that waited for the slot past its lease or until a
        stop."""
        event = first if isinstance(first, Event) else None
        step: Next | None = event
        if event is None or self.stopping.is_set() or not self.lease_good(holding.lease_until):
            holding.event = event
            step = await self._release(holding)
        while isinstance(step, Event):
            holding.event, holding.ran = step, False
            step = await self._handle(slot, holding, step)

    def lease_good(self, lease_until: float) -> bool:
        """Whether a lease ending `lease_until` (monotonic) still holds, with a margin."""
        return time.monotonic() < lease_until - self._margin_s

    async def _handle(self, slot: int, holding: Holding, first: Event) -> Next | None:
        """Run the handler on the batch `first` opens, settle what it did in one call, and
        return what the slot does next (None: the lease ran out while Redis did not answer)."""
        if self._takes_batch:
            runs, error = await self._run_batch(holding, first)
        else:
            runs, error = await self._run_each(holding, first)
        for run in runs:
            if run.delivery is not None:
                self.tally.delivered(run.delivery)
        handled = len(runs) - (error is not None)
        want_next = not self.stopping.is_set()
        if error is None:
            want_all = want_next and handled == len(first.batch)
            await self._write(slot, runs, "event_settling", "ack")
            step = await self.retrying(lambda: self._queue.ack(first, want_all, handled))
            _now_holds(holding, step)
            await self._write(slot, runs, "", "lost_lease" if step is Step.LOST else "ack")
            self._settle_took(time.time_ns() - runs[-1].finished)
            return step
        failed_event = runs[-1].event
        failed = error if isinstance(error, Failed) else None
        dead = failed_event.attempt >= self._settings.max_attempts or bool(
            failed and failed.permanent
        )
        text = _reason(error)
        last = "dead" if dead else "nack"
        await self._write(slot, runs, "event_settling", "ack", last)
        step = await self.retrying(lambda: self._queue.nack(first, text, dead, want_next, handled))
        _now_holds(holding, step)
        handled_outcome = "ack"
        if step is Step.LOST:  # refused whole: the events before the failed one were not acked
            handled_outcome = last = "lost_lease"
        await self._write(slot, runs, "", handled_outcome, last, error=text[:500])
        if step is not Step.RETRY:
            return step
        await sleep_unless(self.stopping, self._retry_in_s(failed_event, failed))
        if failed is not None and failed.retry_when is not None:
            await wait_unless(self.stopping, failed.retry_when())
        if self.stopping.is_set():
            return await self._release(holding)
        return await self._take(holding)

    async def _run_each(
        self, holding: Holding, first: Event
    ) -> tuple[list["Run"], BaseException | None]:
        """The handler on each event of the batch in turn, up to the first failure; before
        each after the first, the slot stops early when it is stopping or its lease, by its
        own clock, is running out (the rest go back uncounted)."""
        runs: list[Run] = []
        for event in first.batch:
            if runs and (self.stopping.is_set() or not self.lease_good(holding.lease_until)):
                break
            started = time.time_ns()
            holding.ran = True
            error, delivery = await self._run_handler(event, event)
            runs.append(Run(event, started, time.time_ns(), delivery))
            self._measured(runs[-1].finished - started)
            if error is not None:
                return runs, error
        return runs, None

    async def _run_batch(
        self, holding: Holding, first: Event
    ) -> tuple[list["Run"], BaseException | None]:
        """A batch handler on the whole batch: all handled, or (`Failed.handled`) the events
        before the one that failed; any other error fails the first."""
        events = list(first.batch)
        started = time.time_ns()
        holding.ran = True
        error, delivery = await self._run_handler(events, first, len(events))
        finished = time.time_ns()
        self._measured(finished - started, len(events))
        handled = len(events)
        if error is not None:
            said = error.handled if isinstance(error, Failed) else 0
            handled = min(max(0, said), len(events) - 1)
        ran = events[: handled + (error is not None)]
        runs = [Run(event, started, finished) for event in ran]
        runs[-1].delivery = delivery
        return runs, error

    def _measured(self, elapsed_ns: int, events: int = 1) -> None:
        """Pool one handler run over `events`; once PACE_WINDOW_S has passed, fold the pool's
        mean per event into the moving average of one event's handler time and size the
        batches and the switch margin from it (the first run sets it at once). The loop's
        lateness is taken off: on a busy loop, a handler that returns at once still takes as
        long as the other slots' turn, which is not its own pace. Pooled, thousands of such
        runs a second give a steady mean where one run at a time swung by a factor of 1,000,
        and the switch margin with it. A run counts at least SHORTEST_RUN_S per event, so
        that a measured handler is never taken for an unmeasured one (0)."""
        took = max(0.0, elapsed_ns / 1e9 - self.loop_lag_s)
        window, now = self._window, time.monotonic()
        window[0] += took
        window[1] += events
        if self.handler_s and now - window[2] < PACE_WINDOW_S:
            return
        mean = max(SHORTEST_RUN_S, window[0] / window[1])
        self.handler_s = _averaged(self.handler_s, mean, PACE_WEIGHT)
        self._window = [0.0, 0, now]
        self.pace()

    def _settle_took(self, elapsed_ns: int) -> None:
        """Fold one settle's wait, from its batch's last run to the slot's next step, into its
        moving average (the first one sets it). Not paced here, once per batch: the handler's
        next pooled measurement paces with it, within PACE_WINDOW_S."""
        self.settle_s = _averaged(self.settle_s, elapsed_ns / 1e9, EWMA_WEIGHT)

    def claim_took(self, seconds: float) -> None:
        """Fold a claim that found work into the moving average of claim time (the first one
        sets it: an average started from 0 would make claims look free for a while), and
        pace."""
        self.claim_s = _averaged(self.claim_s, seconds, EWMA_WEIGHT)
        self.pace()

    def pace(self) -> None:
        """Size the batches the queue hands out, and the switch margin, from the handler's and
        the claims' measured pace: from the first run on, not only after the next claim (a
        drain would otherwise start on the defaults, give accounts up after one event and
        claim them again)."""
        self._queue.batch_size = self.batch_size()
        self._adapt_margin()

    def _adapt_margin(self) -> None:
        """With CLAIM_ORDER=longest, a slot gives its account up for one with a longer backlog
        only when the difference is worth the claim it costs: SWITCH_MARGIN events, as many
        handler runs as one claim takes, or as many as cover SWITCH_BATCHES round trips
        (BATCH_TARGET_S each), whichever is more (a no-op handler would otherwise switch after
        almost every batch, paying a claim each time for nothing). Not the batch size itself:
        batches that cover a long settle wait would make a 0.1 s handler keep an account while
        one 10 events longer waits."""
        if self._settings.claim_order != "longest" or not self.handler_s:
            return  # nothing measured yet: SWITCH_MARGIN as set
        runs = self.claim_s / self.handler_s
        worth = max(math.ceil(runs), SWITCH_BATCHES * self._runs_in(BATCH_TARGET_S))
        self._queue.switch_margin = max(self._settings.switch_margin, min(MAX_SWITCH_MARGIN, worth))

    async def meter_loop(self, done: asyncio.Event) -> None:
        """Until `done`: how late the event loop runs a timer, as a moving average."""
        loop = asyncio.get_running_loop()
        while not done.is_set():
            asked = loop.time() + LAG_PROBE_S
            await asyncio.sleep(LAG_PROBE_S)
            self.loop_lag_s += (max(0.0, loop.time() - asked) - self.loop_lag_s) * LAG_WEIGHT

    def claim_round(self, idle: int) -> int:
        """How many accounts the next claim asks for, of `idle` slots. While a handler run
        outlasts a claim (or none is measured yet), at most CLAIM_ROUND, best first: those start
        sooner, and the next claim ranks the rest with the events that arrived meanwhile. At a
        drain's start, when every account shows one event, one claim for every idle slot would
        hand them out by arrival and leave a long account behind one that ends at once. While
        claims are the slower part (a no-op handler), every idle slot at once: then the drain
        waits for the claims' throughput."""
        if self._claims_lead():
            return idle
        return min(idle, CLAIM_ROUND)

    def _claims_lead(self) -> bool:
        """Whether a claim takes longer than a handler run, as measured (no: none measured)."""
        return 0 < self.handler_s < self.claim_s

    def freed(self) -> None:
        """A slot is done with its account: fold the time since the last one into the moving
        average of how often slots free up."""
        now = time.monotonic()
        if self._freed_at:
            self.free_every_s = _averaged(self.free_every_s, now - self._freed_at, EWMA_WEIGHT)
        self._freed_at = now

    def claims_ahead(self) -> int:
        """How many accounts the consumer keeps claimed ahead of its slots, for the next ones
        to free up, while a handler run outlasts a claim: as many as free up within a handler
        run (slots free up in waves, a run apart), or within AHEAD_COVER claims when that is
        longer; 1 before any slot was seen freeing up; at most CLAIM_ROUND. A slot that frees
        up starts its next account at once, where it waited 2-6 ms for a claim (at W = 100
        here, a few percent of the drain). None while claims are the slower part (a no-op
        handler): there an account claimed ahead would wait, not a slot."""
        if not self.handler_s or self._claims_lead():
            return 0
        if not self.free_every_s:
            return 1
        cover = max(AHEAD_COVER * self.claim_s, self.handler_s)
        return max(1, min(CLAIM_ROUND, math.ceil(cover / self.free_every_s)))

    def batch_size(self) -> int:
        """Events per batch: enough handler runs that the settle's wait costs at most
        SETTLE_SHARE of the batch's handler time (and to cover BATCH_TARGET_S, before a wait is
        measured), and at most BATCH_MAX. A batch covers at most BATCH_COVER_MAX_S and a
        tenth of the lease: a 1 s handler gets 1, and a batch stays well inside any lease.
        The wait is what a loaded machine makes it: a few ms here gives a 0.1 s handler 2 to
        5 events, where one at a time lost 2 to 10% of its time between events."""
        cover = min(max(BATCH_TARGET_S, self.settle_s / SETTLE_SHARE), self._cover_max_s)
        return self._runs_in(cover)

    def _runs_in(self, cover_s: float) -> int:
        """How many handler runs cover `cover_s`: at least 1, at most BATCH_MAX."""
        per_event = max(self.handler_s, SHORTEST_RUN_S)
        return max(1, min(self._settings.batch_max, math.ceil(cover_s / per_event)))

    def _retry_in_s(self, event: Event, failed: Failed | None) -> float:
        """The backoff after a failed attempt, or longer when the handler asked for it (at
        most RETRY_BACKOFF_MAX_SECONDS)."""
        backoff = self._settings.backoff_s(event.attempt)
        if failed is None or failed.retry_after_s is None:
            return backoff
        return max(backoff, min(failed.retry_after_s, self._settings.retry_backoff_max_seconds))

    async def _run_handler(
        self, arg: Event | list[Event], first: Event, events: int = 1
    ) -> tuple[BaseException | None, Delivery | None]:
        """What the handler raised when called with `arg` (None when it returned), whatever
        its type: a handler's failure is its event's, never the slot's; and the `Delivery` it
        reported. Past HANDLER_TIMEOUT_SECONDS per event the attempt fails as a
        `HandlerTimeout`: an async handler is cancelled, a sync one left running in its thread
        (a thread cannot be killed)."""
        if self._handler_timeout_s is None:
            return await self._guarded(self._call(arg))
        limit_s = self._handler_timeout_s * events
        deadline = asyncio.timeout(limit_s)
        try:
            async with deadline:
                return await self._guarded(self._call(arg))
        except TimeoutError:
            if not deadline.expired():
                raise
        self._log.warning(
            "handler_timed_out",
            account=first.account,
            seq=first.seq,
            attempt=first.attempt,
            timeout_s=limit_s,
        )
        timeout = HandlerTimeout(
            f"timeout: the handler ran longer than {limit_s:g} s (HANDLER_TIMEOUT_SECONDS)"
        )
        return timeout, None

    @staticmethod
    async def _guarded(
        call: Awaitable[Delivery | None],
    ) -> tuple[BaseException | None, Delivery | None]:
        try:
            result = await call
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # a forced stop or the handler's deadline, not the handler
            return exc, None
        except Failed as exc:
            return exc, exc.delivery
        except BaseException as exc:
            return exc, None
        return None, result if isinstance(result, Delivery) else None

    def _take(self, holding: Holding) -> Awaitable[Next | None]:
        return self._while_held(holding, lambda: self._queue.take(holding.account, holding.token))

    def _release(self, holding: Holding) -> Awaitable[Next | None]:
        event, ran = holding.event, holding.ran
        return self._while_held(
            holding, lambda: self._queue.release(holding.account, holding.token, event, ran)
        )

    async def _while_held(
        self, holding: Holding, call: Callable[[], Awaitable[Next]]
    ) -> Next | None:
        """`call()`, sent again after faults while the lease is good; None when it ran out.
        Either way of losing the account is logged."""
        step = await self.retrying(call, lambda: self.lease_good(holding.lease_until))
        if step is None:
            self._log.warning("account_left", account=holding.account, reason="no_answer")
        elif step is Step.LOST:
            self._log.warning("lease_lost", account=holding.account, token=holding.token)
        return step

    @overload
    async def retrying(self, call: Callable[[], Awaitable[T]]) -> T: ...

    @overload
    async def retrying(
        self, call: Callable[[], Awaitable[T]], keep_on: Callable[[], bool]
    ) -> T | None: ...

    async def retrying(
        self, call: Callable[[], Awaitable[T]], keep_on: Callable[[], bool] | None = None
    ) -> T | None:
        """`call()`; after a connection fault the same call again, with backoff, while
        `keep_on()` (without it: until Redis answers, however long that takes). None when it
        gave up."""
        try:
            return await call()
        except TRANSIENT:
            self.tally.faults += 1
        pauses = backoff()  # only now: the call without a fault stays cheap
        while keep_on is None or keep_on():
            await asyncio.sleep(next(pauses))
            try:
                return await call()
            except TRANSIENT:
                self.tally.faults += 1
        return None

    def _write(
        self,
        slot: int,
        runs: list["Run"],
        settling: str,
        outcome: str,
        last: str = "",
        **failure: object,
    ) -> Awaitable[None]:
        """The batch's lines in one write: each handled run's `outcome`, and the failed run's
        `last` (with the `failure` fields). `settling` names the lines written before a settle
        is sent (`event_settling`): should the process die after Redis took the settle but
        before its outcome lines, `evq report` resolves each attempt from its settling line and
        Redis, so no settled event goes unlogged. Without it, the outcome lines, counted."""
        lines = []
        for n, run in enumerate(runs):
            failing = last and n == len(runs) - 1
            this = last if failing else outcome
            fields = _fields(slot, run)
            if settling:
                lines.append((settling, {"settling": this, **fields}))
                continue
            self._count(run, this)
            extra = {} if run.delivery is None else run.delivery.fields()
            if failing:
                extra.update(failure)
            lines.append((OUTCOME_EVENTS[this], {"outcome": this, **fields, **extra}))
        return self._events.write(lines)

    def _count(self, run: "Run", outcome: str) -> None:
        if outcome == "lost_lease":
            self.tally.lease_lost()
        else:
            self.tally.settled += 1
        if outcome == "ack":
            self.tally.observe("processing", (run.finished - run.started) / 1e9)
            self.tally.observe("wait", (time.time_ns() - run.event.enqueued_ns) / 1e9)

    async def give_up(self, holding: Holding) -> None:
        """After a slot failed: release its account (the event in flight back at the head), or
        leave it to its lease and the reaper when Redis does not answer in time."""
        try:
            await self._release(holding)
        except Exception:
            self._log.exception("release_failed", account=holding.account)


@dataclass(slots=True)
class Run:
    """One event's run of the handler: when it started and finished (unix ns), and the
    `Delivery` it reported."""

    event: Event
    started: int
    finished: int
    delivery: Delivery | None = None


def _fields(slot: int, run: Run) -> dict[str, object]:
    """What every line of an attempt says of it."""
    event, started, finished = run.event, run.started, run.finished
    fields: dict[str, object] = {
        "account": event.account,
        "seq": event.seq,
        "event_id": event.event_id,
        "attempt": event.attempt,
        "slot": slot,
        "token": event.token,
        "enqueued_ns": event.enqueued_ns,
        "started_ns": started,
        "finished_ns": finished,
    }
    if event.replays:
        fields["replay"] = event.replays
    return fields


def _now_holds(holding: Holding, step: Next) -> None:
    """After a settle, what the slot holds in flight: the account's next event, which the
    settle handed out and no handler has run yet, or nothing. Should the slot fail before it
    runs it (the log line of the settle could not be written), its release puts that event
    back without counting an attempt."""
    holding.event, holding.ran = (step, False) if isinstance(step, Event) else (None, False)


def _reason(error: BaseException) -> str:
    """What a nack records of a failed attempt."""
    if isinstance(error, HandlerTimeout | Failed):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _as_async(
    handler: Handler | BatchHandler, threads: int
) -> Callable[[Any], Awaitable[Delivery | None]]:
    """Async handlers run on the loop; sync ones in a thread pool sized to the slots."""
    if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004
    ):
        return handler  # type: ignore[return-value]
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="evq-handler")

    async def call(arg: Any) -> Delivery | None:
        return await asyncio.get_running_loop().run_in_executor(pool, handler, arg)  # type: ignore[arg-type]

    return call


def _averaged(mean: float, sample: float, weight: float) -> float:
    """A moving average with `sample` folded in at `weight`; the first sample (`mean` 0: none
    yet) sets it."""
    return mean + (sample - mean) * weight if mean else sample


async def sleep_unless(event: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds` or until `event` is set; True when it was set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()


async def wait_unless(event: asyncio.Event, awaitable: Awaitable[object]) -> None:
    """Wait for `awaitable` or until `event` is set, whichever comes first."""
    wanted = asyncio.ensure_future(awaitable)
    stopped = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((wanted, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        wanted.cancel()
        stopped.cancel()
