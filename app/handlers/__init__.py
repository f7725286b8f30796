"""Handlers: the contract, the reference handler, HTTP delivery, and loading the one `HANDLER`
names.

`HANDLER` is the import path `module:factory` of a callable that takes the settings and returns
the handler: `async def handle(event)` (run on the loop) or a plain `def` (run in a thread).
Returning acks the event; raising nacks it. A handler may say more: raise `Failed` to ask for
a dead letter at once (`permanent`) or a later retry (`retry_after_s`), and return or attach a
`Delivery` to have an attempt's answer logged and counted. A handler with an `aclose()` is
closed when the consumer stops.

A handler marked with `takes_batches` is called with a list instead: the events of one
account's batch, in seq order (docs/handlers.md). Returning acks them all; raising `Failed`
with `handled=n` acks the first n and fails the next; any other error fails the first. The
events after a failed one go back to the head without an attempt counted.
"""

import asyncio
import importlib
import inspect
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from app.engine import Event
from app.settings import Settings

Handler = Callable[[Event], Awaitable["Delivery | None"]] | Callable[[Event], "Delivery | None"]
BatchHandler = (
    Callable[[list[Event]], Awaitable["Delivery | None"]]
    | Callable[[list[Event]], "Delivery | None"]
)
B = TypeVar("B", bound=BatchHandler)
# How a delivery ended, as the event log and /metrics name it.
OUTCOMES = ("2xx", "3xx", "4xx", "5xx", "timeout", "connection")


@dataclass(frozen=True, slots=True)
class Delivery:
    """What a handler that hands events to another service reports of one attempt: how it
    ended (OUTCOMES), how long it took, the status and the first bytes of the answer."""

    outcome: str
    latency_s: float
    status: int | None = None
    response: str = ""

    def fields(self) -> dict[str, object]:
        """Its part of the attempt's event log line."""
        fields: dict[str, object] = {
            "delivery": self.outcome,
            "latency_ms": round(self.latency_s * 1000, 3),
        }
        if self.status is not None:
            fields.update(status=self.status, response=self.response)
        return fields


class Failed(Exception):
    """A failed attempt, with what the slot should do about it: `permanent` dead-letters the
    event now (or parks its account, POISON_POLICY=park) instead of retrying; `retry_after_s`
    waits at least that long before the retry (at most RETRY_BACKOFF_MAX_SECONDS);
    `retry_when()` returns once a retry can succeed (a receiver that refused connections
    accepts them again), awaited after the backoff: an outage costs one attempt, not all.
    From a batch handler, `handled` says how many events before the failed one it handled."""

    def __init__(
        self,
        message: str,
        *,
        permanent: bool = False,
        retry_after_s: float | None = None,
        retry_when: Callable[[], Awaitable[object]] | None = None,
        delivery: Delivery | None = None,
        handled: int = 0,
    ) -> None:
        super().__init__(message)
        self.handled = handled
        self.permanent = permanent
        self.retry_after_s = retry_after_s
        self.retry_when = retry_when
        self.delivery = delivery


def takes_batches(handler: B) -> B:
    """Mark `handler` as a batch handler: it is called with each batch as a list."""
    handler.takes_batch = True  # type: ignore[union-attr]
    return handler


class InjectedFailure(Exception):
    """The reference handler's simulated failure (FAIL_RATE)."""


class HandlerUnusable(Exception):
    """`HANDLER` does not name an importable factory, or the factory refused the settings."""


def reference(settings: Settings) -> Handler:
    """Sleep PROCESS_SECONDS, then fail with probability FAIL_RATE."""
    seconds, fail_rate = settings.process_seconds, settings.fail_rate

    async def handle(event: Event) -> None:
        await asyncio.sleep(seconds)
        if fail_rate and random.random() < fail_rate:
            raise InjectedFailure(f"injected failure (FAIL_RATE={fail_rate})")

    return handle


def http(settings: Settings) -> Handler:
    """POST each event to DELIVERY_URL, signed per Standard Webhooks (docs/delivery.md)."""
    from app.handlers.delivery import HttpDelivery  # noqa: PLC0415 (its client only when used)

    return HttpDelivery(settings)


def load(settings: Settings) -> Handler | BatchHandler:
    """Import the factory `settings.handler` names and build the handler with it."""
    module_name, _, attr = settings.handler.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise HandlerUnusable(
            f"HANDLER={settings.handler!r} is not an importable 'module:factory' ({exc})"
        ) from exc
    handler: Handler | BatchHandler = factory(settings)
    return handler


async def close(handler: Handler | BatchHandler) -> None:
    """Close a handler that has an `aclose()` (an HTTP client's connections, say)."""
    aclose = getattr(handler, "aclose", None)
    if aclose is not None:
        result = aclose()
        if inspect.isawaitable(result):
            await result
