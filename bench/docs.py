"""Writes docs/benchmarks.md (and its grid plot) from the result files under bench/results/."""

import json
from pathlib import Path
from typing import Any

from bench.harness import RESULTS
from tests.support import REPO

DOC = REPO / "docs" / "benchmarks.md"
TARGETS = {
    "grid": ("efficiency, CLAIM_ORDER=longest, worst cell", 0.98),
    "headline": ("efficiency, 1 s handler, worst run", 0.97),
    "noop": ("no-op drain, events/s, best W", 8_000),
    "push": ("gen push, events/s", 50_000),
    "growth": ("Redis bytes per queued event, largest backlog", 200),
}


def render() -> Path:
    """Rewrite the document from every result set on disk (full first, then short)."""
    parts = [
        "# Benchmarks\n",
        "Written by `python -m bench.run` (`make bench`: short set; `make bench-full`: all).",
        "Efficiency = lower bound / makespan, where the bound is",
        "`d x max(longest account chain, ceil(N / W))`: no schedule can beat it.\n",
    ]
    for name in ("full", "short"):
        found = {p.stem: json.loads(p.read_text()) for p in sorted((RESULTS / name).glob("*.json"))}
        if found:
            parts.append(_section(name, found))
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(parts))
    return DOC


def _section(name: str, found: dict[str, dict[str, Any]]) -> str:
    machine = next(iter(found.values()))["machine"]
    out = [
        f"## The {name} set\n",
        f"Measured {machine['when']} on {machine['cpus']} CPUs, Python {machine['python']}, "
        f"Redis {machine['redis']}.\n",
        _targets(found),
    ]
    tables = {
        "grid": _grid,
        "headline": _headline,
        "noop": _plain,
        "push": _plain,
        "api": _plain,
        "growth": _plain,
    }
    for scenario, table in tables.items():
        if scenario in found:
            out.append(f"### {scenario}\n\n{table(found[scenario]['cells'])}\n")
    return "\n".join(out)


def _targets(found: dict[str, dict[str, Any]]) -> str:
    rows = ["| target | wanted | measured | met |", "| --- | --- | --- | --- |"]
    for scenario, (what, wanted) in TARGETS.items():
        if scenario not in found:
            continue
        cells = found[scenario]["cells"]
        measured = _measured(scenario, cells)
        met = measured <= wanted if scenario == "growth" else measured >= wanted
        shown = f"{measured:,}"
        if scenario == "growth":
            shown += f" at {max(c['events'] for c in cells):,} events (target: at 1,000,000)"
        rows.append(f"| {what} | {wanted:,} | {shown} | {'yes' if met else 'no'} |")
    return "\n".join(rows) + "\n"


def _measured(scenario: str, cells: list[dict[str, Any]]) -> float:
    if scenario == "grid":
        return min(c["efficiency"] for c in cells if c["claim_order"] == "longest")
    if scenario == "headline":
        return min(c["efficiency"] for c in cells)
    if scenario == "growth":
        return max(cells, key=lambda c: c["events"])["redis_bytes_per_event"]
    return max(c["events_per_s"] for c in cells)


def _grid(cells: list[dict[str, Any]]) -> str:
    orders = list(dict.fromkeys(c["claim_order"] for c in cells))
    rows = [
        "| pattern | W | " + " | ".join(orders) + " | violations |",
        "| --- | --- | " + " | ".join("---" for _ in orders) + " | --- |",
    ]
    keyed = {(c["pattern"], c["slots"], c["claim_order"]): c for c in cells}
    for pattern, slots in dict.fromkeys((c["pattern"], c["slots"]) for c in cells):
        row = [keyed[(pattern, slots, o)] for o in orders if (pattern, slots, o) in keyed]
        effs = " | ".join(f"{c['efficiency']:.3f}" for c in row)
        violations = sum(c["order_violations"] for c in row)
        rows.append(f"| {pattern} | {slots} | {effs} | {violations} |")
    return "\n".join(rows)


def _headline(cells: list[dict[str, Any]]) -> str:
    rows = ["| W | makespan s | bound s | efficiency | violations | lost |", "| --- " * 6 + "|"]
    for c in cells:
        rows.append(
            f"| {c['slots']} | {c['makespan_s']:.2f} | {c['lower_bound_s']:.2f} | "
            f"{c['efficiency']:.3f} | {c['order_violations']} | {c['lost']} |"
        )
    return "\n".join(rows)


def _plain(cells: list[dict[str, Any]]) -> str:
    keys = list(cells[0])
    rows = ["| " + " | ".join(keys) + " |", "| --- " * len(keys) + "|"]
    rows += [
        "| " + " | ".join(f"{c[k]:,}" if isinstance(c[k], int) else str(c[k]) for k in keys) + " |"
        for c in cells
    ]
    return "\n".join(rows)
