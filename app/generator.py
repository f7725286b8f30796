"""Workloads (pure and seeded) and the pusher that queues them in pipelined batches."""

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal

from app.client import ApiClient, api_http
from app.queue import NewEvent, PushResult, open_queue
from app.settings import Settings

Pattern = Literal["bursty", "uniform", "zipf", "hot"]
Via = Literal["redis", "api"]
HOT_EVENTS = 300
ZIPF_S = 1.1


def workload(pattern: Pattern, events: int, accounts: int, seed: int) -> list[int]:
    """The account of each event, in push order.

    bursty: a random account gets 1 to 10 consecutive events, repeated (the reference workload);
    uniform: each event picks an account at random; zipf: account k is picked with weight
    1/k^1.1; hot: account 1 gets 300 events spread through the run, the rest are uniform.
    """
    rng = random.Random(seed)
    if pattern == "bursty":
        out: list[int] = []
        while len(out) < events:
            out += [rng.randint(1, accounts)] * min(rng.randint(1, 10), events - len(out))
        return out
    if pattern == "zipf":
        weights = list(accumulate(1 / k**ZIPF_S for k in range(1, accounts + 1)))
        return rng.choices(range(1, accounts + 1), cum_weights=weights, k=events)
    if pattern == "hot" and accounts > 1:
        hot = set(rng.sample(range(events), min(HOT_EVENTS, events)))
        return [1 if i in hot else rng.randint(2, accounts) for i in range(events)]
    return [rng.randint(1, accounts) for _ in range(events)]


def longest_chain(accounts: Sequence[int]) -> int:
    """The most events any one account has: they must run one after another."""
    return max(Counter(accounts).values(), default=0)


def lower_bound_s(events: int, chain: int, slots: int, process_s: float) -> float:
    """No schedule drains `events` faster: d * max(longest chain, ceil(N / W))."""
    return process_s * max(chain, math.ceil(events / slots))


@dataclass(frozen=True, slots=True)
class PushSummary:
    """What a generator run queued."""

    accepted: int
    duplicates: int
    elapsed_s: float


PushMany = Callable[[Sequence[NewEvent]], Awaitable[list[PushResult]]]


async def push_workload(
    push_many: PushMany,
    accounts: Sequence[int],
    run_id: str,
    batch: int,
    rate: float,
    on_progress: Callable[[int], None],
) -> PushSummary:
    """Push one event per entry of `accounts`, `batch` per round trip, at most `rate` per second.

    Event ids are `<run_id>-<index>`, so running the same workload again queues it again,
    while a retried batch of the same run is deduplicated.
    """
    if rate:
        batch = max(1, min(batch, int(rate // 20)))
    accepted = duplicates = 0
    started = time.perf_counter()
    for start in range(0, len(accounts), batch):
        chunk = [
            NewEvent(account, f"{run_id}-{i}", {"n": i})
            for i, account in enumerate(accounts[start : start + batch], start)
        ]
        results = await push_many(chunk)
        queued = sum(r.queued for r in results)
        accepted += queued
        duplicates += len(results) - queued
        on_progress(len(chunk))
        if rate:
            ahead_s = (start + len(chunk)) / rate - (time.perf_counter() - started)
            if ahead_s > 0:
                await asyncio.sleep(ahead_s)
    return PushSummary(accepted, duplicates, time.perf_counter() - started)


@asynccontextmanager
async def open_target(
    settings: Settings, via: Via, api_url: str
) -> AsyncIterator[tuple[PushMany, Callable[[], Awaitable[int]]]]:
    """Where `gen` pushes: (push_many, live_slots) of the engine or of the API."""
    if via == "api":
        async with api_http(api_url, settings, 60) as http:
            api = ApiClient(http)
            yield api.push_many, api.live_slots
        return
    async with open_queue(settings) as queue:

        async def live_slots() -> int:
            return sum((await queue.live_consumers(settings.lease_seconds)).values())

        yield queue.push_many, live_slots
