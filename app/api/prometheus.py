"""`GET /metrics`: the queue's snapshot in Prometheus' text format (no label carries an
account id). The consumers' histograms come from the metrics hash (`app.engine.registry`)."""

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from app.engine.inspect import Snapshot
from app.engine.registry import HISTOGRAMS

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
            ("delivery", "evq_delivery_seconds", "Time of one HTTP delivery, any outcome."),
        ):
            yield _histogram(found.measured, name, metric, text)
        deliveries = CounterMetricFamily(
            "evq_deliveries",
            "HTTP deliveries by outcome: 2xx to 5xx, timeout, connection.",
            labels=["outcome"],
        )
        for outcome, count in found.deliveries.items():
            deliveries.add_metric([outcome], count)
        yield deliveries


def _histogram(measured: dict[str, float], name: str, metric: str, text: str) -> Metric:
    running, buckets = 0.0, []
    for bound in (*(f"{b:g}" for b in HISTOGRAMS[name]), "+Inf"):
        running += measured.get(f"{name}:{bound}", 0)
        buckets.append((bound, running))
    return HistogramMetricFamily(
        metric, text, buckets=buckets, sum_value=measured.get(f"{name}:sum", 0.0)
    )
