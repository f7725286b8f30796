"""What a consumer counts: the measurements its slots take (folded into Redis with each
heartbeat) and the process's own counters. The slots bump them; the process reads and resets."""

import bisect
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from app.engine.registry import DELIVERED, FIELDS, HISTOGRAMS, LEASE_LOST
from app.handlers import Delivery


@dataclass(slots=True)
class Tally:
    """Measurements since the last heartbeat (histogram buckets by upper bound, counts and
    sums per histogram, lease losses), and counters for the process's own log lines: events
    settled, lease losses and connection faults ridden out since start or the last report."""

    counts: Counter[str] = field(default_factory=Counter)
    sums: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    settled: int = 0  # attempts handled and settled (acked, nacked or dead-lettered)
    lease_losses: int = 0
    faults: int = 0  # connection faults ridden out since the renewer last reported them

    def observe(self, name: str, seconds: float) -> None:
        fields = FIELDS[name]
        self.counts[fields[bisect.bisect_left(HISTOGRAMS[name], seconds)]] += 1
        self.counts[fields[-2]] += 1
        self.sums[fields[-1]] += seconds

    def delivered(self, delivery: Delivery) -> None:
        """An attempt that handed its event to another service: its outcome and latency."""
        self.counts[DELIVERED + delivery.outcome] += 1
        self.observe("delivery", delivery.latency_s)

    def lease_lost(self) -> None:
        self.lease_losses += 1
        self.counts[LEASE_LOST] += 1

    def take(self) -> tuple[dict[str, int], dict[str, float]]:
        """Everything measured for the metrics hash so far, and start again."""
        counts, sums = dict(self.counts), dict(self.sums)
        self.counts.clear()
        self.sums.clear()
        return counts, sums

    def put_back(self, counts: dict[str, int], sums: dict[str, float]) -> None:
        """What a heartbeat that failed did not fold in (it may have: then it counts twice)."""
        self.counts.update(counts)
        for name, total in sums.items():
            self.sums[name] += total
