"""Metrics: what consumers measure, folded into Redis; what the API, the dashboard and
`evq top` show of it.

A consumer counts into a `Tally` and folds it into one Redis hash with its heartbeat, every
HEARTBEAT_S (HINCRBY of each histogram bucket, count and sum), so supervisord's numprocs
consumers need no port each, and restarting one resets nothing. Everything else comes from the
queue's own counters and keys. `snapshot` reads it all; `exposition` renders it in
Prometheus' text format for `GET /metrics`.
"""

import asyncio
import bisect
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry
from redis.asyncio.client import Pipeline

from app.engine.queue import Queue, enqueued_ns, seq_of

HEARTBEAT_S = 1.0  # how often a consumer sends its heartbeat, busy slots and tally
SAMPLE = 200  # accounts per shard read for the oldest event and the longest backlogs
TOP = 10  # longest backlogs shown
# Seconds; the handler takes about 1 s, an event waits from seconds to the whole backlog.
BUCKETS = {
    "processing": (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0),
    "wait": (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0),
}
COUNTERS = {  # stats name -> (metric, help)
    "accepted": ("evq_events_enqueued_total", "Events accepted into the queue (duplicates not)."),
    "refused": (
        "evq_events_refused_total",
        "Events refused because their account's backlog was at MAX_BACKLOG_PER_ACCOUNT.",
    ),
    "acked": ("evq_events_processed_total", "Events handled successfully and acked."),
    "nacked": ("evq_events_failed_total", "Handler attempts that failed (each nack)."),
    "dead": ("evq_events_dead_lettered_total", "Events moved to the dead letters."),
    "redelivered": (
        "evq_events_redelivered_total",
        "Events handed out again after their owner died or lost its lease.",
    ),
    "replayed": ("evq_events_replayed_total", "Dead letters an operator queued again."),
    "purged": ("evq_dead_letters_purged_total", "Dead letters an operator deleted."),
}


# Per histogram, the hash fields of its buckets (by upper bound, +Inf last), count and sum.
_FIELDS = {
    name: (*(f"{name}:{b:g}" for b in bounds), f"{name}:+Inf", f"{name}:count", f"{name}:sum")
    for name, bounds in BUCKETS.items()
}


class Tally:
    """A consumer's measurements since its last heartbeat: histogram buckets (by upper
    bound), counts and sums per histogram, and lease losses."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.sums: defaultdict[str, float] = defaultdict(float)

    def observe(self, name: str, seconds: float) -> None:
        fields = _FIELDS[name]
        self.counts[fields[bisect.bisect_left(BUCKETS[name], seconds)]] += 1
        self.counts[fields[-2]] += 1
        self.sums[fields[-1]] += seconds

    def count(self, name: str) -> None:
        self.counts[name] += 1

    def take(self) -> tuple[dict[str, int], dict[str, float]]:
        """Everything counted so far, and start again."""
        counts, sums = dict(self.counts), dict(self.sums)
        self.counts.clear()
        self.sums.clear()
        return counts, sums

    def put_back(self, counts: dict[str, int], sums: dict[str, float]) -> None:
        """What a heartbeat that failed did not fold in (it may have: then it counts twice)."""
        self.counts.update(counts)
        for field, total in sums.items():
            self.sums[field] += total


@dataclass(frozen=True, slots=True)
class Consumer:
    name: str  # host:pid
    slots: int
    busy: int
    heartbeat_age_s: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The queue right now, as every view shows it."""

    at: float  # unix seconds
    stats: dict[str, int]
    consumers: list[Consumer]
    oldest_event_age_s: float | None  # of the sampled accounts; None when nothing waits
    longest: list[tuple[int, int]]  # (account, pending events), longest first, sampled
    measured: dict[str, float]  # the consumers' folded tally

    @property
    def slots(self) -> int:
        return sum(c.slots for c in self.consumers)

    @property
    def busy(self) -> int:
        return sum(c.busy for c in self.consumers)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("measured")
        out["longest"] = [{"account_id": a, "backlog": n} for a, n in self.longest]
        out.update(slots=self.slots, busy=self.busy, lease_losses=self.lease_losses)
        return out

    @property
    def lease_losses(self) -> int:
        return int(self.measured.get("lease_lost", 0))


async def snapshot(queue: Queue, live_within_s: float) -> Snapshot:
    """Counters, consumers, and a sample of up to SAMPLE active accounts per shard for the
    oldest unsettled event and the longest backlogs: exact while a shard has fewer active
    accounts, an estimate beyond (like SQS's ApproximateAgeOfOldestMessage)."""
    stats, consumers, measured, sample = await asyncio.gather(
        queue.stats(),
        queue.consumers(live_within_s),
        queue.measurements(),
        _sample(queue),
    )
    now = time.time()
    heads = [seq for _, _, seq in sample if seq is not None]
    oldest = max(0.0, now - enqueued_ns(min(heads)) / 1e9) if heads else None
    longest = sorted(((n, a) for a, n, _ in sample if n), reverse=True)[:TOP]
    return Snapshot(
        at=now,
        stats=stats,
        consumers=[Consumer(n, *found) for n, found in sorted(consumers.items())],
        oldest_event_age_s=oldest,
        longest=[(a, n) for n, a in longest],
        measured=measured,
    )


async def _sample(queue: Queue) -> list[tuple[int, int, int | None]]:
    """(account, pending events, seq of its oldest unsettled event) of sampled accounts."""
    keys = queue.keys
    members = await queue.each_shard(
        lambda pipe, shard: pipe.srandmember(keys.active(shard), SAMPLE)
    )
    accounts = {shard: [int(a) for a in found] for shard, (found,) in enumerate(members)}

    def read(pipe: Pipeline, shard: int) -> None:
        for account in accounts[shard]:
            pipe.llen(keys.pending(account))
            pipe.lindex(keys.in_flight(account), 0)
            pipe.lindex(keys.pending(account), 0)

    shards = [shard for shard, found in accounts.items() if found]
    out = []
    for shard, replies in zip(shards, await queue.each_shard(read, shards), strict=True):
        for i, account in enumerate(accounts[shard]):
            length, flying, head = replies[3 * i : 3 * i + 3]
            body = flying or head
            out.append((account, length, seq_of(body) if body else None))
    return out


def exposition(found: Snapshot) -> bytes:
    """`found` in Prometheus' text format (no label carries an account id)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(found))
    return generate_latest(registry)


class _Families(Collector):
    def __init__(self, found: Snapshot) -> None:
        self._found = found

    def collect(self) -> Iterator[Metric]:
        found, stats = self._found, self._found.stats
        for name, (metric, text) in COUNTERS.items():
            yield CounterMetricFamily(metric.removesuffix("_total"), text, value=stats[name])
        lost = CounterMetricFamily(
            "evq_lease_losses", "Events whose owner lost its lease before settling them."
        )
        lost.add_metric([], found.lease_losses)
        yield lost
        gauges = (
            ("evq_backlog_events", "Events pending or in flight.", stats["backlog"]),
            ("evq_accounts_waiting", "Accounts ready to be claimed.", stats["ready"]),
            ("evq_accounts_active", "Accounts with unsettled events.", stats["active"]),
            ("evq_dead_letters", "Dead letters kept.", stats["dead_letters"]),
            ("evq_consumers", "Consumers with a heartbeat within the lease.", len(found.consumers)),
            ("evq_slots", "Handler slots of the live consumers.", found.slots),
            ("evq_slots_busy", "Slots handling an event now.", found.busy),
        )
        for metric, text, value in gauges:
            yield GaugeMetricFamily(metric, text, value=value)
        paused = GaugeMetricFamily(
            "evq_accounts_paused", "Accounts not claimed (operator or parked).", labels=["reason"]
        )
        paused.add_metric(["operator"], stats["paused"])
        paused.add_metric(["parked"], stats["parked"])
        yield paused
        yield GaugeMetricFamily(
            "evq_oldest_event_age_seconds",
            "Age of the oldest event not yet settled (sampled beyond 200 accounts per shard).",
            value=found.oldest_event_age_s or 0.0,
        )
        up = GaugeMetricFamily("evq_consumer_up", "1 per live consumer.", labels=["consumer"])
        for consumer in found.consumers:
            up.add_metric([consumer.name], 1)
        yield up
        for name, metric, text in (
            ("wait", "evq_event_wait_seconds", "From enqueue to ack, per acked event."),
            ("processing", "evq_event_processing_seconds", "Handler time of an acked event."),
        ):
            yield _histogram(found.measured, name, metric, text)


def _histogram(measured: dict[str, float], name: str, metric: str, text: str) -> Metric:
    running, buckets = 0.0, []
    for bound in (*(f"{b:g}" for b in BUCKETS[name]), "+Inf"):
        running += measured.get(f"{name}:{bound}", 0)
        buckets.append((bound, running))
    return HistogramMetricFamily(
        metric, text, buckets=buckets, sum_value=measured.get(f"{name}:sum", 0.0)
    )
