"""Writes docs/benchmarks.md and its PNG plots from the result files under bench/results/."""

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.harness import RESULTS
from stack import REPO

GROWTH_TARGET_EVENTS = 1_000_000
DOC = REPO / "docs" / "benchmarks.md"
TARGETS = {
    "grid": ("efficiency, CLAIM_ORDER=longest, worst cell", 0.98),
    "headline": ("efficiency, 1 s handler, worst run", 0.99),
    "cluster": ("efficiency on the 3-master cluster, 1 s handler, worst run", 0.99),
    "noop": ("no-op drain, events/s, best W", 25_000),
    "push": ("gen push, events/s", 50_000),
    "growth": ("Redis bytes per queued event, largest backlog", 200),
    "faults": ("makespan with connections killed / calm", 1.10),
    "stream": ("one WebSocket stream of single events / batch API, events/s", 1.0),
    "delivery": ("HTTP delivery to a 0.1 s receiver, efficiency, worst W", 0.97),
}
LOWER_IS_BETTER = ("growth", "faults")


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
    when = sorted(result["machine"]["when"] for result in found.values())
    out = [
        f"## The {name} set\n",
        f"Measured {when[0]} to {when[-1]} on {machine['cpus']} CPUs, "
        f"Python {machine['python']}, Redis {machine['redis']}.\n",
        _targets(found),
    ]
    tables = {
        "grid": _grid,
        "headline": _headline,
        "cluster": _headline,
        "work": _plain,
        "cluster_work": _plain,
        "cost": _plain,
        "cluster_cost": _plain,
        "faults": _faults,
        "noop": _plain,
        "push": _plain,
        "peers": _peers,
        "api": _plain,
        "stream": _plain,
        "delivery": _delivery,
        "growth": _plain,
        "idle": _plain,
    }
    for scenario, table in tables.items():
        if scenario in found:
            out.append(f"### {scenario}\n\n{table(found[scenario]['cells'])}\n")
            if scenario in PLOTS:
                png = DOC.parent / f"bench-{name}-{scenario}.png"
                PLOTS[scenario](found[scenario]["cells"], png)
                out.append(f"![{scenario}]({png.name})\n")
    return "\n".join(out)


def _targets(found: dict[str, dict[str, Any]]) -> str:
    rows = ["| target | wanted | measured | met |", "| --- | --- | --- | --- |"]
    for scenario in TARGETS:
        if scenario not in found:
            continue
        t = target(scenario, found[scenario]["cells"])
        assert t is not None
        shown = f"{t['measured']:,g}" if t["measured"] < 1000 else f"{t['measured']:,.0f}"
        if scenario == "growth":
            shown += f" at {t['at_events']:,} events"
        met = {True: "yes", None: f"not judged below {GROWTH_TARGET_EVENTS:,} events"}.get(
            t["met"], f"no: short by {t['short_by_pct']}%"
        )
        rows.append(f"| {t['what']} | {t['wanted']:,} | {shown} | {met} |")
    return "\n".join(rows) + "\n"


def target(scenario: str, cells: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The issue's target for `scenario`, what the cells measured, and by how much it missed."""
    if scenario not in TARGETS or not cells:
        return None
    what, wanted = TARGETS[scenario]
    measured = _measured(scenario, cells)
    lower_is_better = scenario in LOWER_IS_BETTER
    met = measured <= wanted if lower_is_better else measured >= wanted
    gap = (measured - wanted) if lower_is_better else (wanted - measured)
    found: dict[str, Any] = {"what": what, "wanted": wanted, "measured": measured, "met": met}
    found["short_by_pct"] = 0.0 if met else round(100 * gap / wanted, 1)
    if scenario == "growth":
        found["at_events"] = max(c["events"] for c in cells)
        if found["at_events"] < GROWTH_TARGET_EVENTS:  # not the size the target is set at
            found["met"] = found["short_by_pct"] = None
    return found


def _measured(scenario: str, cells: list[dict[str, Any]]) -> float:
    if scenario == "grid":
        return min(float(c["efficiency"]) for c in cells if c["claim_order"] == "longest")
    if scenario in ("headline", "cluster", "delivery"):  # delivery: not the no-op receiver's
        return min(float(c["efficiency"]) for c in cells if c.get("receiver_s", 1))
    if scenario == "growth":
        return float(max(cells, key=lambda c: c["events"])["redis_bytes_per_event"])
    if scenario == "stream":
        batch = next(c["events_per_s"] for c in cells if c["via"] == "batch")
        one = next(
            c["events_per_s"]
            for c in cells
            if (c["via"], c["connections"], c["frame"], c["rate"]) == ("ws", 1, 1, "max")
        )
        return round(float(one) / float(batch), 3)
    if scenario == "faults":
        calm, killed = (
            min(c["makespan_s"] for c in cells if bool(c.get("kill_every_s")) is k)
            for k in (False, True)
        )
        return round(float(killed) / float(calm), 3)
    return max(float(c["events_per_s"]) for c in cells)


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


def _delivery(cells: list[dict[str, Any]]) -> str:
    rows = [
        "| receiver | W | deliveries/s | consumer CPU per delivery | makespan (bound) "
        "| efficiency | order violations: event log, receiver | lost |",
        "| --- " * 8 + "|",
    ]
    for c in cells:
        rate = f"{c['deliveries_per_s']:,}" if "deliveries_per_s" in c else ""
        cpu = (
            f"{c['consumer_cpu_us_per_delivery']} us" if "consumer_cpu_us_per_delivery" in c else ""
        )
        span, eff = "", ""
        if "makespan_s" in c:
            span = f"{c['makespan_s']:.2f} s ({c['lower_bound_s']:.2f} s)"
            eff = f"{c['efficiency']:.3f}"
        receiver = f"{c['receiver_s']:g} s" if c["receiver_s"] else "no-op"
        rows.append(
            f"| {receiver} | {c['slots']:,} | {rate} | {cpu} | {span} | {eff} "
            f"| {c['order_violations']}, {c['receiver_order_violations']} | {c['lost']} |"
        )
    return "\n".join(rows)


def _faults(cells: list[dict[str, Any]]) -> str:
    rows = [
        "| connections killed | makespan | bound | efficiency | order violations | lost |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in cells:
        killed = "none"
        if c.get("kill_every_s"):
            killed = f"every {c['kill_every_s']:g} s: {c['connections_killed']:,}"
            killed += f" in {c['kill_rounds']:,} rounds"
        rows.append(
            f"| {killed} | {c['makespan_s']:.2f} s | {c['lower_bound_s']:.2f} s"
            f" | {c['efficiency']:.3f} | {c['order_violations']} | {c['lost']} |"
        )
    return "\n".join(rows)


def _peers(cells: list[dict[str, Any]]) -> str:
    rows = [
        "| system | no-op jobs/s | no-op violations | Redis per job, push: commands, CPU "
        "| Redis per job, drain: commands, CPU | makespan s (bound) | efficiency "
        "| violations | lost | settings |",
        "| --- " * 10 + "|",
    ]
    for c in cells:
        push = drain = "not measured"
        if "push_commands_per_job" in c:
            push = f"{c['push_commands_per_job']:.1f}, {c['push_cpu_us_per_job']:.1f} us"
            drain = f"{c['drain_commands_per_job']:.1f}, {c['drain_cpu_us_per_job']:.1f} us"
        rows.append(
            f"| {c['system']} | {c['noop_jobs_per_s']:,} | {c['noop_violations']:,} | {push} "
            f"| {drain} | {c['makespan_s']:.2f} ({c['lower_bound_s']:.1f}) "
            f"| {c['efficiency']:.3f} | {c['violations']:,} | {c['lost'] + c['noop_lost']:,} "
            f"| `{c['settings']}` |"
        )
    return "\n".join(rows)


def _plot_grid(cells: list[dict[str, Any]], png: Path) -> None:
    """Efficiency against W, one panel per pattern, one line per claim order."""
    patterns = list(dict.fromkeys(c["pattern"] for c in cells))
    fig, axes = plt.subplots(1, len(patterns), figsize=(4 * len(patterns), 3.6), sharey=True)
    for ax, pattern in zip(fig.axes if len(patterns) > 1 else [axes], patterns, strict=True):
        for order in dict.fromkeys(c["claim_order"] for c in cells):
            line = [c for c in cells if c["pattern"] == pattern and c["claim_order"] == order]
            ax.plot([c["slots"] for c in line], [c["efficiency"] for c in line], "o-", label=order)
        ax.axhline(TARGETS["grid"][1], color="tab:red", linestyle="--", linewidth=1)
        ax.set(xscale="log", title=pattern, xlabel="W (slots)")
    fig.axes[0].set_ylabel("efficiency = bound / makespan")
    fig.axes[0].legend()
    _save(fig, png)


def _plot_peers(cells: list[dict[str, Any]], png: Path) -> None:
    """No-op jobs per second and efficiency at W=100, one bar per system."""
    names = [c["system"] for c in cells]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.bar(names, [c["noop_jobs_per_s"] for c in cells])
    left.set(title="no-op jobs per second", ylabel="jobs/s")
    right.bar(names, [c["efficiency"] for c in cells])
    right.set(title="efficiency, 0.1 s jobs, W=100", ylim=(0, 1))
    for ax, key in ((left, "noop_violations"), (right, "violations")):
        for x, c in enumerate(cells):
            ax.annotate(f"{c[key]:,} viol.", (x, 0), ha="center", va="bottom", fontsize=8)
    _save(fig, png)


def _save(fig: Any, png: Path) -> None:
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


PLOTS = {"grid": _plot_grid, "peers": _plot_peers}
