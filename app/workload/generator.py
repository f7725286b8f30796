"""Workloads (pure and seeded) and the pusher that queues them in pipelined batches."""

import math
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Literal, Protocol

import orjson
from pydantic import ValidationError

from app.api.schema import EventIn
from app.engine import NewEvent, PushResult, open_queue, registry
from app.settings import Settings
from app.workload.client import ApiClient, StreamClient, api_http, as_sent, pace

Pattern = Literal["bursty", "uniform", "zipf", "hot"]
Via = Literal["redis", "api", "ws"]
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
    """What a generator run queued: accepted, duplicates (ids accepted before, a resent tail
    included) and refused (MAX_BACKLOG_PER_ACCOUNT)."""

    accepted: int
    duplicates: int
    refused: int
    elapsed_s: float


PushMany = Callable[[Sequence[NewEvent]], Awaitable[list[PushResult]]]
Progress = Callable[[int], None]


def planned_events(accounts: Sequence[int], run_id: str) -> list[NewEvent]:
    """One event per entry of `accounts`, with ids `<run_id>-<index>`: running the same
    workload again queues it again, while a retried batch of the same run is deduplicated."""
    return [NewEvent(account, f"{run_id}-{i}", {"n": i}) for i, account in enumerate(accounts)]


def shared_prefix(events: Sequence[NewEvent]) -> str:
    """What every event id starts with (`<run_id>-` for a recorded run): how `evq report`
    tells a run's events in the log."""
    return os.path.commonprefix([e.event_id for e in events])  # noqa: RUF071 (by character)


class WorkloadFileError(ValueError):
    """A workload file that cannot be read, or a line of it that is not an event."""


def write_events(path: Path, events: Sequence[NewEvent]) -> None:
    """A workload file: one event per line, as `POST /events` takes it (JSON Lines)."""
    with path.open("wb") as out:
        for e in events:
            out.write(orjson.dumps(as_sent(e)) + b"\n")


def read_events(path: Path) -> list[NewEvent]:
    """The events of a workload file, in its order; blank lines are skipped. Every line is
    checked as the API checks an event, so a bad file is refused before anything is sent."""
    events: list[NewEvent] = []
    try:
        with path.open("rb") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    events.append(EventIn.model_validate_json(line).new_event())
                except ValidationError as exc:
                    first = exc.errors()[0]
                    where = ".".join(map(str, first["loc"])) or "line"
                    raise WorkloadFileError(f"{path}:{number}: {where}: {first['msg']}") from exc
    except OSError as exc:
        raise WorkloadFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not events:
        raise WorkloadFileError(f"{path} holds no event")
    return events


async def push_workload(
    push_many: PushMany,
    events: Sequence[NewEvent],
    batch: int,
    rate: float,
    on_progress: Progress,
) -> PushSummary:
    """Push `events` in order, `batch` per round trip, at most `rate` per second."""
    accepted = duplicates = refused = 0
    started = time.perf_counter()
    for start in range(0, len(events), batch):
        chunk = events[start : start + batch]
        results = await push_many(chunk)
        accepted += sum(r.queued for r in results)
        refused += sum(r.refused for r in results)
        duplicates += sum(r.duplicate for r in results)
        on_progress(len(chunk))
        await pace(started, start + len(chunk), rate)
    return PushSummary(accepted, duplicates, refused, time.perf_counter() - started)


def frame_size(batch: int, rate: float) -> int:
    """Events per round trip or frame: `batch`, but small enough to spread a limited rate
    over the second (20 sends per second)."""
    return max(1, min(batch, int(rate // 20))) if rate else batch


class Target(Protocol):
    """Where `gen` sends a workload."""

    async def live_slots(self) -> int: ...

    async def send(
        self, events: Sequence[NewEvent], batch: int, rate: float, on_progress: Progress
    ) -> PushSummary: ...


@dataclass(frozen=True, slots=True)
class _Pushed:
    """Through push_many round trips: the engine's, or the API's batch route."""

    push_many: PushMany
    slots: Callable[[], Awaitable[int]]

    async def live_slots(self) -> int:
        return await self.slots()

    async def send(
        self, events: Sequence[NewEvent], batch: int, rate: float, on_progress: Progress
    ) -> PushSummary:
        return await push_workload(
            self.push_many, events, frame_size(batch, rate), rate, on_progress
        )


@dataclass(frozen=True, slots=True)
class _Streamed:
    """Over WebSocket streams to the API."""

    api: ApiClient
    streams: StreamClient

    async def live_slots(self) -> int:
        return await self.api.live_slots()

    async def send(
        self, events: Sequence[NewEvent], batch: int, rate: float, on_progress: Progress
    ) -> PushSummary:
        started = time.perf_counter()
        answers = await self.streams.send(events, frame_size(batch, rate), rate, on_progress)
        return PushSummary(
            answers.accepted, answers.duplicates, answers.refused, time.perf_counter() - started
        )


@asynccontextmanager
async def open_target(
    settings: Settings, via: Via, api_url: str, connections: int = 1
) -> AsyncIterator[Target]:
    """Where `gen` sends: the engine, the API's batch route, or `connections` WebSocket
    streams to the API."""
    if via in ("api", "ws"):
        async with api_http(api_url, settings, 60) as http:
            api = ApiClient(http)
            if via == "api":
                yield _Pushed(api.push_many, api.live_slots)
            else:
                yield _Streamed(api, StreamClient(api_url, settings, connections))
        return
    async with open_queue(settings) as queue:

        async def live_slots() -> int:
            return sum((await registry.live_consumers(queue, settings.lease_seconds)).values())

        yield _Pushed(queue.push_many, live_slots)
