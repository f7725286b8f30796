"""Watching a drain: a live progress line until no account has pending or in-flight events.

Once Redis has answered, a connection fault does not end the wait: the line says Redis is not
answering and polling goes on (until the timeout, if one was given).
"""

import asyncio
import time
from collections.abc import Awaitable
from typing import TextIO, TypeVar

from app.engine import TRANSIENT, Queue, inspect, registry
from app.settings import Settings

T = TypeVar("T")

POLL_S = 0.5
PLAIN_EVERY_S = 5.0


async def wait_drained(queue: Queue, timeout_s: float, out: TextIO) -> bool:
    """Poll the counters until drained; False when `timeout_s` (0 = never) runs out first.

    On a terminal the line is redrawn in place; otherwise one line is written every few seconds.
    """
    live = out.isatty()
    started = time.monotonic()
    first = await inspect.stats(queue)
    done_before = first["acked"] + first["dead"]
    shown_at = -PLAIN_EVERY_S
    stats = first
    while True:
        polled = await _answer(inspect.stats(queue))
        elapsed = time.monotonic() - started
        stats = polled or stats
        drained = polled is not None and stats["active"] == 0
        settled = stats["acked"] + stats["dead"]
        processed = settled - done_before
        line = (
            f"processed {processed:,} | backlog {stats['backlog']:,}"
            f" | {processed / elapsed if elapsed else 0:,.0f} events/s | {elapsed:.1f} s"
        ) + ("" if polled else " | Redis not answering, retrying")
        if live:
            out.write(f"\r{line}\033[K" + ("\n" if drained else ""))
        elif drained or elapsed - shown_at >= PLAIN_EVERY_S:
            out.write(line + "\n")
            shown_at = elapsed
        out.flush()
        if drained:
            return True
        if timeout_s and elapsed >= timeout_s:
            if live:
                out.write("\n")
            return False
        await asyncio.sleep(POLL_S)


async def wait_consumers(queue: Queue, count: int, settings: Settings, timeout_s: float) -> bool:
    """Wait until `count` consumers have sent a heartbeat; False when `timeout_s` runs out."""
    started = time.monotonic()
    # No answer to the first read is an error; later faults are ridden out.
    live = await registry.live_consumers(queue, settings.lease_seconds)
    while len(live) < count:
        if timeout_s and time.monotonic() - started >= timeout_s:
            return False
        await asyncio.sleep(POLL_S / 5)
        live = await _answer(registry.live_consumers(queue, settings.lease_seconds)) or {}
    return True


async def _answer(poll: Awaitable[T]) -> T | None:
    """What Redis answered, or None after a connection fault."""
    try:
        return await poll
    except TRANSIENT:
        return None
