"""One PNG of a run: handler concurrency over time against W, and the ten longest accounts."""

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from app.workload.report import Attempt, Report, Run, concurrency_steps

if TYPE_CHECKING:
    from matplotlib.axes import Axes

COLOURS = {"ack": "tab:green", "nack": "tab:orange", "dead": "tab:red", "lost_lease": "black"}
GANTT_ACCOUNTS = 10


class PlotUnavailable(Exception):
    """matplotlib is not installed (it comes with the `plot` extra)."""


def draw(run: Run, report: Report, path: Path) -> None:
    """Write the two panels to `path`; time is seconds from the first enqueue."""
    try:
        import matplotlib  # noqa: PLC0415 (optional dependency, only for --plot)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as exc:
        raise PlotUnavailable("--plot needs matplotlib: pip install 'evq[plot]'") from exc
    attempts = run.attempts
    t0 = min((a.enqueued_ns for a in attempts), default=0)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), height_ratios=(3, 2))
    steps = concurrency_steps(attempts)
    top.step(
        [(t - t0) / 1e9 for t, _ in steps],
        [running for _, running in steps],
        where="post",
        label="handlers running",
    )
    top.axhline(report.slots, color="tab:red", linestyle="--", label=f"W = {report.slots} slots")
    top.set_ylabel("concurrent handlers")
    top.set_title(
        f"{report.events:,} events, makespan {report.makespan_s:.1f} s, "
        f"bound {report.lower_bound_s:.1f} s, efficiency {report.efficiency:.3f}"
    )
    top.legend(loc="upper right")
    _gantt(bottom, attempts, t0)
    bottom.set_xlabel("seconds since the first enqueue")
    top.sharex(bottom)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _gantt(axes: "Axes", attempts: list[Attempt], t0: int) -> None:
    by_account: dict[int, list[Attempt]] = defaultdict(list)
    for a in attempts:
        by_account[a.account].append(a)
    longest = sorted(by_account, key=lambda k: len(by_account[k]), reverse=True)[:GANTT_ACCOUNTS]
    for row, account in enumerate(longest):
        for outcome, colour in COLOURS.items():
            bars = [
                ((a.started_ns - t0) / 1e9, (a.finished_ns - a.started_ns) / 1e9)
                for a in by_account[account]
                if a.outcome == outcome
            ]
            axes.broken_barh(bars, (row - 0.4, 0.8), color=colour, edgecolor="white")
    axes.set_yticks(range(len(longest)), [f"account {k}" for k in longest])
    axes.invert_yaxis()
    axes.set_title("ten longest accounts, one bar per attempt (green ack, orange nack)")
