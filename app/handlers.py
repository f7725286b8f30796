"""Handlers: the reference handler, and loading the one `HANDLER` names.

`HANDLER` is the import path `module:factory` of a callable that takes the settings and returns
the handler: `async def handle(event)` (run on the loop) or a plain `def` (run in a thread).
Raising nacks the event.
"""

import asyncio
import importlib
import random
from collections.abc import Awaitable, Callable

from app.engine import Event
from app.settings import Settings

Handler = Callable[[Event], Awaitable[None]] | Callable[[Event], None]


class InjectedFailure(Exception):
    """The reference handler's simulated failure (FAIL_RATE)."""


class HandlerNotFound(Exception):
    """`HANDLER` does not name an importable factory."""


def reference(settings: Settings) -> Handler:
    """Sleep PROCESS_SECONDS, then fail with probability FAIL_RATE."""
    seconds, fail_rate = settings.process_seconds, settings.fail_rate

    async def handle(event: Event) -> None:
        await asyncio.sleep(seconds)
        if fail_rate and random.random() < fail_rate:
            raise InjectedFailure(f"injected failure (FAIL_RATE={fail_rate})")

    return handle


def load(settings: Settings) -> Handler:
    """Import the factory `settings.handler` names and build the handler with it."""
    module_name, _, attr = settings.handler.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise HandlerNotFound(
            f"HANDLER={settings.handler!r} is not an importable 'module:factory' ({exc})"
        ) from exc
    handler: Handler = factory(settings)
    return handler
