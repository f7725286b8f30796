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
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar, overload

from structlog.typing import FilteringBoundLogger

from app.consumer.tally import Tally
from app.engine import TRANSIENT, Event, Next, Queue, Step, Won
from app.engine.connection import backoff
from app.handlers import Delivery, Failed, Handler
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
EWMA_WEIGHT = 0.05  # of the newest run in the moving average of handler time


class HandlerTimeout(Exception):
    """The handler ran past HANDLER_TIMEOUT_SECONDS; its attempt is nacked like any failure."""


@dataclass(eq=False, slots=True)
class Holding:
    """What a slot holds: an account, its token, the lease by this process's clock (monotonic
    seconds), and the event in flight with whether it reached the handler."""

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
        handler: Handler,
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
        self.stopping = asyncio.Event()
        self.tally = Tally()
        self.handler_s = 0.0  # moving average of one handler run

    async def drain(self, slot: int, holding: Holding, first: Event | Won) -> None:
        """Handle the held account's events until it is released, drained or lost."""
        step = first if isinstance(first, Event) else await self._release(holding)
        while isinstance(step, Event):
            holding.event, holding.ran = step, False
            step = await self._handle(slot, holding, step)

    def lease_good(self, lease_until: float) -> bool:
        """Whether a lease ending `lease_until` (monotonic) still holds, with a margin."""
        return time.monotonic() < lease_until - self._margin_s

    async def _handle(self, slot: int, holding: Holding, event: Event) -> Next | None:
        """Run the handler, settle the event, and return what the slot does next (None: the
        lease ran out while Redis did not answer)."""
        started = time.time_ns()
        holding.ran = True
        error, delivery = await self._run_handler(event)
        finished = time.time_ns()
        self.handler_s += (max(0, finished - started) / 1e9 - self.handler_s) * EWMA_WEIGHT
        extra = {} if delivery is None else delivery.fields()
        if delivery is not None:
            self.tally.delivered(delivery)
        want_next = not self.stopping.is_set()
        if error is None:
            await self._settling(slot, event, "ack", started, finished)
            step = await self.retrying(lambda: self._queue.ack(event, want_next))
            _now_holds(holding, step)
            outcome = "lost_lease" if step is Step.LOST else "ack"
            await self._record(slot, event, outcome, started, finished, **extra)
            return step
        failed = error if isinstance(error, Failed) else None
        dead = event.attempt >= self._settings.max_attempts or bool(failed and failed.permanent)
        text = _reason(error)
        await self._settling(slot, event, "dead" if dead else "nack", started, finished)
        step = await self.retrying(lambda: self._queue.nack(event, text, dead, want_next))
        _now_holds(holding, step)
        outcome = "lost_lease" if step is Step.LOST else "dead" if dead else "nack"
        await self._record(slot, event, outcome, started, finished, error=text[:500], **extra)
        if step is not Step.RETRY:
            return step
        await sleep_unless(self.stopping, self._retry_in_s(event, failed))
        if failed is not None and failed.retry_when is not None:
            await wait_unless(self.stopping, failed.retry_when())
        if self.stopping.is_set():
            return await self._release(holding)
        return await self._take(holding)

    def _retry_in_s(self, event: Event, failed: Failed | None) -> float:
        """The backoff after a failed attempt, or longer when the handler asked for it (at
        most RETRY_BACKOFF_MAX_SECONDS)."""
        backoff = self._settings.backoff_s(event.attempt)
        if failed is None or failed.retry_after_s is None:
            return backoff
        return max(backoff, min(failed.retry_after_s, self._settings.retry_backoff_max_seconds))

    async def _run_handler(self, event: Event) -> tuple[BaseException | None, Delivery | None]:
        """What the handler raised (None when it returned), whatever its type: a handler's
        failure is its event's, never the slot's; and the `Delivery` it reported. Past
        HANDLER_TIMEOUT_SECONDS the attempt fails as a `HandlerTimeout`: an async handler is
        cancelled, a sync one left running in its thread (a thread cannot be killed)."""
        if self._handler_timeout_s is None:
            return await self._guarded(self._call(event))
        deadline = asyncio.timeout(self._handler_timeout_s)
        try:
            async with deadline:
                return await self._guarded(self._call(event))
        except TimeoutError:
            if not deadline.expired():
                raise
        self._log.warning(
            "handler_timed_out",
            account=event.account,
            seq=event.seq,
            attempt=event.attempt,
            timeout_s=self._handler_timeout_s,
        )
        timeout = HandlerTimeout(
            f"timeout: the handler ran longer than {self._handler_timeout_s:g} s"
            " (HANDLER_TIMEOUT_SECONDS)"
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

    def _settling(
        self, slot: int, event: Event, settle: str, started: int, finished: int
    ) -> Awaitable[None]:
        """The line written before a settle is sent (`settling`: ack, nack or dead). Should the
        process die after Redis took the settle but before its outcome line, `evq report`
        resolves the attempt from this line and Redis, so no settled event goes unlogged."""
        fields = _fields(slot, event, started, finished)
        return self._events.write("event_settling", settling=settle, **fields)

    def _record(
        self, slot: int, event: Event, outcome: str, started: int, finished: int, **extra: object
    ) -> Awaitable[None]:
        if outcome == "lost_lease":
            self.tally.lease_lost()
        else:
            self.tally.settled += 1
        if outcome == "ack":
            self.tally.observe("processing", (finished - started) / 1e9)
            self.tally.observe("wait", (time.time_ns() - event.enqueued_ns) / 1e9)
        fields = _fields(slot, event, started, finished)
        return self._events.write(OUTCOME_EVENTS[outcome], outcome=outcome, **fields, **extra)

    async def give_up(self, holding: Holding) -> None:
        """After a slot failed: release its account (the event in flight back at the head), or
        leave it to its lease and the reaper when Redis does not answer in time."""
        try:
            await self._release(holding)
        except Exception:
            self._log.exception("release_failed", account=holding.account)


def _fields(slot: int, event: Event, started: int, finished: int) -> dict[str, object]:
    """What every line of an attempt says of it."""
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


def _as_async(handler: Handler, threads: int) -> Callable[[Event], Awaitable[Delivery | None]]:
    """Async handlers run on the loop; sync ones in a thread pool sized to the slots."""
    if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004
    ):
        return handler  # type: ignore[return-value]
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="evq-handler")

    async def call(event: Event) -> Delivery | None:
        return await asyncio.get_running_loop().run_in_executor(pool, handler, event)  # type: ignore[arg-type]

    return call


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
