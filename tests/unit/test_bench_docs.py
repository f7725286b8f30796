"""The benchmark summary judges each target and says by how much a miss falls short."""

from typing import Any

from bench.docs import target


def grid_cell(order: str, efficiency: float) -> dict[str, Any]:
    return {"claim_order": order, "efficiency": efficiency}


def test_grid_target_takes_the_worst_longest_cell() -> None:
    cells = [grid_cell("longest", 0.99), grid_cell("longest", 0.931), grid_cell("random", 0.5)]
    found = target("grid", cells)
    assert found is not None
    assert (found["measured"], found["met"], found["short_by_pct"]) == (0.931, False, 5.0)


def test_throughput_target_met_by_the_best_cell() -> None:
    found = target("noop", [{"events_per_s": 22_000}, {"events_per_s": 26_000}])
    assert found is not None
    assert (found["measured"], found["met"], found["short_by_pct"]) == (26_000, True, 0.0)


def test_growth_is_judged_only_at_a_million_events() -> None:
    small = target("growth", [{"events": 10_000, "redis_bytes_per_event": 700.0}])
    large = target("growth", [{"events": 1_000_000, "redis_bytes_per_event": 230.0}])
    assert small is not None and large is not None
    assert (small["met"], small["short_by_pct"]) == (None, None)
    assert (large["met"], large["short_by_pct"]) == (False, 15.0)


def test_faults_target_is_the_makespan_ratio_under_connection_kills() -> None:
    """Killed connections may stretch the drain by 10% at most: 1.15 misses by 4.5%."""
    calm = {"kill_every_s": 0, "makespan_s": 10.0}
    found = target("faults", [calm, {"kill_every_s": 0.3, "makespan_s": 11.5}])
    assert found is not None
    assert (found["measured"], found["met"], found["short_by_pct"]) == (1.15, False, 4.5)


def test_scenarios_without_a_target_have_none() -> None:
    assert target("peers", [{"system": "evq"}]) is None
