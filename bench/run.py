"""Runs the benchmark scenarios and rewrites bench/results/<set>/ and docs/benchmarks.md.

python -m bench.run            the short set (make bench, under 10 minutes; no peers)
python -m bench.run --full     everything (make bench-full)
python -m bench.run --only noop --only push
python -m bench.run --full --only grid --order longest   the grid the target is set on
"""

import argparse
import sys
from collections.abc import Callable
from typing import Any

from bench import docs, peer_runs, scenarios
from bench.harness import Bench, bench, write

ORDERS = ("longest", "oldest", "random")
PEERS = ("evq", *(peer.name for peer in peer_runs.PEERS))
Cell = Callable[[Bench], dict[str, Any]]


SHARDS = (1, 16, 256)
ON_CLUSTER = ("cluster", "cluster_work", "cluster_cost")


def plan(full: bool, orders: tuple[str, ...] = ORDERS) -> dict[str, list[Cell]]:
    """Scenario name -> its cells, for the short or the full set; the grid's for `orders`."""
    patterns = ("bursty", "uniform", "zipf", "hot") if full else ("bursty",)
    widths = (10, 50, 100, 200, 500, 1000) if full else (100, 1000)
    return {
        "grid": [
            _cell(scenarios.makespan, pattern, w, order, 0.1)
            for pattern in patterns
            for w in widths
            for order in orders
        ],
        "headline": [_cell(scenarios.makespan, "bursty", w, "longest", 1.0) for w in (100, 1000)],
        # The same on the local 3-master Redis Cluster.
        "cluster": [_cell(scenarios.makespan, "bursty", w, "longest", 1.0) for w in (100, 1000)],
        # Redis commands and CPU per event at several SHARDS, on one Redis and on the cluster.
        "work": [_cell(scenarios.redis_work, shards) for shards in SHARDS],
        "cluster_work": [_cell(scenarios.redis_work, shards) for shards in SHARDS],
        # What one event costs Redis and the consumer, at 10 and at 100 events per account:
        # the figures the lean hot path is measured by, on one Redis and on the cluster.
        "cost": [_cell(scenarios.redis_work, 16, 20_000, n) for n in (2_000, 200)],
        "cluster_cost": [_cell(scenarios.redis_work, 16, 20_000, n) for n in (2_000, 200)],
        # The 0.1 s bursty drain at W=100, calm and with every connection killed every 0.3 s.
        "faults": [
            _cell(scenarios.makespan, "bursty", 100, "longest", 0.1, kill) for kill in (0, 0.3)
        ],
        "noop": [
            _cell(scenarios.noop_drain, w) for w in ((64, 128, 256, 512, 1024) if full else (1024,))
        ],
        "push": [_cell(scenarios.push)],
        # Seven minutes here (RQ alone takes three), so only in the full set.
        "peers": [_cell(scenarios.peers, system) for system in PEERS] if full else [],
        "api": [_cell(scenarios.api)],
        # Through the API: HTTP single and batch, then WebSocket streams.
        "stream": [
            _cell(scenarios.stream, "single", 32),
            _cell(scenarios.stream, "batch", 4),
            *(_cell(scenarios.stream, "ws", n) for n in (1, 4, 16)),
            _cell(scenarios.stream, "ws", 1, 100),
            _cell(scenarios.stream, "ws", 1, 1, 5_000),
        ],
        # HTTP delivery: to a no-op receiver at W=1,000, and to one taking 0.1 s per request.
        "delivery": [
            _cell(scenarios.delivery, w, receiver_s)
            for w, receiver_s in ((1000, 0), (1000, 0.1), (200, 0.1))
        ],
        "growth": [
            _cell(scenarios.growth, n)
            for n in ((10_000, 100_000, 1_000_000) if full else (10_000,))
        ],
        "idle": [_cell(scenarios.idle_memory)],
    }


def _cell(scenario: Callable[..., dict[str, Any]], *args: Any) -> Cell:
    return lambda b: scenario(b, *args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every scenario and cell")
    parser.add_argument("--only", action="append", help="run just these scenarios")
    parser.add_argument(
        "--order", choices=ORDERS, help="the grid for this CLAIM_ORDER only (its target's)"
    )
    args = parser.parse_args()
    name = "full" if args.full else "short"
    scenarios_to_run = plan(args.full, (args.order,) if args.order else ORDERS)
    unknown = set(args.only or ()) - scenarios_to_run.keys()
    if unknown:
        known = ", ".join(scenarios_to_run)
        parser.error(f"unknown scenario {', '.join(sorted(unknown))}; pick from {known}")
    for scenario, cells in scenarios_to_run.items():
        if not cells or (args.only and scenario not in args.only):
            continue
        results = []
        with bench(scenario, cluster=scenario in ON_CLUSTER) as b:
            for i, cell in enumerate(cells, 1):
                results.append(cell(b))
                print(f"{scenario} {i}/{len(cells)}: {results[-1]}", file=sys.stderr, flush=True)
        path = write(f"{name}/{scenario}", results, target=docs.target(scenario, results))
        print(f"wrote {path}", file=sys.stderr)
    print(f"wrote {docs.render()}", file=sys.stderr)


if __name__ == "__main__":
    main()
