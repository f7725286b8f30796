"""Wake-ups for idle claimers: push publishes on the namespace's wake channel when a shard's
ready index stops being empty, so a claimer waits on a subscription instead of polling."""

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import Any

from app.engine.connection import TRANSIENT, Nodes, backoff


class Wakeups:
    """A subscription to `channel` on any master (a cluster broadcasts PUBLISH to every node),
    started on first use. `timed` bounds the subscribe like every other round trip."""

    def __init__(
        self, nodes: Nodes, channel: str, timed: Callable[[Awaitable[Any]], Awaitable[Any]]
    ) -> None:
        self._nodes = nodes
        self._channel = channel
        self._timed = timed
        self._work = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._closing = False

    def clear(self) -> None:
        """Forget earlier announcements (the caller is about to look at every shard)."""
        if self._listener is None or self._listener.done():
            self._listener = asyncio.ensure_future(self._listen())
        self._work.clear()

    async def wait(self, timeout_s: float) -> None:
        """Until a shard announces work, or `timeout_s` passes."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._work.wait(), timeout_s)

    async def aclose(self) -> None:
        self._closing = True
        # Cancelled again until it ends: on Python 3.11 a cancel that lands while a Redis
        # call completes can be swallowed.
        while self._listener is not None and not self._listener.done():
            self._listener.cancel()
            await asyncio.wait([self._listener], timeout=0.1)

    async def _listen(self) -> None:
        """Sets `_work` on every announcement. Subscribes again after a fault, and then wakes
        the claimer once (an announcement may have been missed meanwhile)."""
        pauses = backoff()
        while not self._closing:
            pubsub = random.choice(self._nodes.masters()).pubsub(ignore_subscribe_messages=True)
            try:
                await self._timed(pubsub.subscribe(self._channel))
                pauses = backoff()
                self._work.set()
                async for message in pubsub.listen():
                    if message is not None:
                        self._work.set()
            except TRANSIENT as exc:
                self._nodes.noticed(exc)
                self._work.set()
                await asyncio.sleep(next(pauses))
            finally:
                with contextlib.suppress(*TRANSIENT):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
