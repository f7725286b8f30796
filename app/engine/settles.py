"""Settles sent together: the acks and nacks a consumer's slots make in one turn of the event
loop go to Redis as one `settle.lua` call per shard, covering every account settled there
(and, through `Scripts.submit`, one round trip per master). Each slot still gets its own reply.
"""

import asyncio
import functools
import random
from typing import TYPE_CHECKING, Any

from app.engine.events import Event, Next, step_of
from app.settings import Settings

if TYPE_CHECKING:
    from app.engine.queue import Queue

# Positions in Keys.account() of what settle.lua takes per account, and once per shard.
ACCOUNT_PART = (0, 1, 2, 3)  # pending, lock, state, seq
SHARD_PART = (4, 5, 6, 7, 8, 9)  # ready, stats, active, dead, paused, dead letters' order
Settling = tuple[bytes, Event, bool, int, bytes, "asyncio.Future[Next]"]


class Settles:
    """Collects one loop turn's settles per shard and sends each shard's in one call."""

    def __init__(self, queue: "Queue", settings: Settings) -> None:
        self._queue = queue
        self._order = settings.claim_order.encode()
        self._dead_max = settings.dead_letters_max
        self._park = b"1" if settings.poison_policy == "park" else b"0"
        self._waiting: dict[int, list[Settling]] = {}

    async def add(
        self, op: bytes, event: Event, want_next: bool, count: int, entry: bytes = b""
    ) -> Next:
        """Settle the batch of `event` (`op` ack or nack, `count` of its events handled; a
        nack's dead-letter `entry`, or b'' to retry) with this turn's others of its shard; its
        own step."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Next] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._send)
        shard = self._queue.keys.shard_of(event.account)
        self._waiting.setdefault(shard, []).append((op, event, want_next, count, entry, future))
        return await future

    def _send(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for shard, settling in waiting.items():
            try:
                sent = self._submit(shard, settling)
            except Exception as exc:  # the shard's master is not known (a cluster map fault)
                _fail(settling, exc)
                continue
            sent.add_done_callback(functools.partial(_answer, settling))

    def _submit(self, shard: int, settling: list[Settling]) -> "asyncio.Future[Any]":
        """One shard's settle call, queued for this loop turn's round trip to its master."""
        queue = self._queue
        first = queue.account_keys(settling[0][1].account)
        keys = [first[i] for i in SHARD_PART]
        args: list[Any] = [
            self._order,
            random.randrange(1 << 31),
            queue.switch_margin,
            queue.best_elsewhere,
            self._dead_max,
            self._park,
            queue.batch_size,
        ]
        for op, event, want_next, count, entry, _ in settling:
            own = queue.account_keys(event.account)
            keys += (own[i] for i in ACCOUNT_PART)
            batch = event.batch
            last_seq = batch[count - 1].seq if count else 0
            args += (op, event.account, event.token, event.seq, event.attempt)
            args += (count, last_seq, b"1" if want_next else b"0", entry)
            args.append(batch[count].event_id if entry else b"")
        return queue.scripts.submit(queue.node(shard), "settle", keys, args)


def _answer(settling: list[Settling], sent: "asyncio.Future[Any]") -> None:
    """Every slot of the call gets its own step, or the call's fault."""
    if sent.cancelled():  # the loop is closing
        for *_, future in settling:
            future.cancel()
        return
    fault = sent.exception()
    if fault is not None:
        _fail(settling, fault)
        return
    for (_, event, *_, future), reply in zip(settling, sent.result(), strict=True):
        if not future.done():  # the slot was cancelled meanwhile
            future.set_result(step_of(event.account, event.token, reply))


def _fail(settling: list[Settling], fault: BaseException) -> None:
    for *_, future in settling:
        if not future.done():
            future.set_exception(fault)
