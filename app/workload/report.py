"""Reads the event log: proves per-account order (I1) and measures the run against its bound."""

import dataclasses
import itertools
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from app.workload.generator import lower_bound_s

SETTLED = ("ack", "dead")


@dataclass(frozen=True, slots=True)
class Attempt:
    """One handled attempt as the consumer logged it."""

    account: int
    seq: int
    event_id: str
    attempt: int
    outcome: str
    host: str
    pid: int
    slot: int
    enqueued_ns: int
    started_ns: int
    finished_ns: int
    token: int = 0  # the fencing token of the claim (lines of older versions: 0)
    replay: int = 0  # how many times an operator had replayed it from the dead letters


# What an attempt's log line holds; `host`, `token` and `replay` may be missing.
LOGGED = tuple(Attempt.__dataclass_fields__)


@dataclass(frozen=True, slots=True)
class Run:
    """The attempts of one generator run (or of the whole log) and what `gen` said of it."""

    attempts: list[Attempt]
    run_id: str | None = None
    id_prefix: str | None = None  # what the run's event ids start with
    accepted: int | None = None
    slots: int | None = None
    longest_chain: int | None = None
    process_s: float | None = None
    malformed: int = 0  # lines of the logs that are not a whole record
    # Attempts whose settle was about to be sent (`event_settling` lines), the settle as their
    # outcome; `resolve` keeps those whose outcome line is missing but Redis took the settle.
    settling: list[Attempt] = field(default_factory=list)
    resolved: int = 0  # attempts counted from a settling line and Redis


@dataclass(frozen=True, slots=True)
class Report:
    """The figures `evq report` prints; `lost` is None when it could not be checked."""

    run_id: str | None
    events: int
    accounts: int
    acked: int
    nacked: int
    dead: int
    redelivered: int
    replayed: int
    lost_lease: int
    order_violations: int
    lost: int | None
    makespan_s: float
    lower_bound_s: float
    efficiency: float
    wait_p50_s: float
    wait_p95_s: float
    wait_p99_s: float
    peak_concurrency: int
    slots: int
    longest_chain: int
    process_s: float
    violations: list[str] = field(default_factory=list)
    malformed: int = 0
    resolved: int = 0

    @property
    def ok(self) -> bool:
        """No order violation, nothing lost, and every line of the logs read."""
        return self.order_violations == 0 and not self.lost and not self.malformed

    def as_json(self) -> dict[str, Any]:
        """Every figure, rounded for reading; the violations themselves stay in the text form."""
        out = asdict(self)
        out.pop("violations")
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def read_log(paths: Sequence[Path], latest_run: bool = False) -> Run:
    """All attempts in the logs (one per consumer host, or one shared), or (`latest_run`) those
    of the run the newest marker names."""
    markers: dict[str, dict[str, Any]] = {}
    pushed: dict[str, int] = {}
    attempts: list[Attempt] = []
    unread = [0]
    settling: list[Attempt] = []
    for record in (record for path in paths for record in _records(path, unread)):
        if "outcome" in record or "settling" in record:
            attempt = _attempt(record)
            if attempt is None:
                unread[0] += 1
            else:
                (attempts if "outcome" in record else settling).append(attempt)
        elif record.get("event") == "run_started":
            markers[record["run_id"]] = record
        elif record.get("event") == "run_pushed":
            pushed[record["run_id"]] = record["accepted"]
    if not latest_run or not markers:
        return Run(attempts, malformed=unread[0], settling=settling)
    # The newest by its timestamp; in the order read where markers carry none.
    _, (run_id, marker) = max(
        enumerate(markers.items()), key=lambda item: (item[1][1].get("timestamp", ""), item[0])
    )
    prefix = marker.get("id_prefix", f"{run_id}-")
    return Run(
        [a for a in attempts if a.event_id.startswith(prefix)],
        settling=[a for a in settling if a.event_id.startswith(prefix)],
        run_id=run_id,
        id_prefix=prefix,
        accepted=pushed.get(run_id),
        slots=marker["slots"],
        longest_chain=marker["longest_chain"],
        process_s=marker["process_s"],
        malformed=unread[0],
    )


def _records(path: Path, unread: list[int]) -> Iterator[dict[str, Any]]:
    """The JSON objects of `path`, one a line; a line that is not one counts in `unread[0]`."""
    with path.open("rb") as lines:
        for line in lines:
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                yield record
            elif line.strip():
                unread[0] += 1


def _attempt(record: dict[str, Any]) -> Attempt | None:
    """The attempt an outcome or settling line records (a settling line's settle as its
    outcome); None when a field it needs is missing or wrong."""
    fields = {name: record[name] for name in LOGGED if name in record}
    if "outcome" not in record:
        fields["outcome"] = record["settling"]
    try:
        attempt = Attempt(**{"host": "", **fields})
    except TypeError:
        return None
    numbers = (
        attempt.account,
        attempt.seq,
        attempt.attempt,
        attempt.started_ns,
        attempt.finished_ns,
    )
    if not all(isinstance(n, int) for n in numbers) or not isinstance(attempt.event_id, str):
        return None
    return attempt


async def resolve(
    run: Run, state_of: Callable[[int, str, int | None], Awaitable[dict[str, Any] | None]]
) -> Run:
    """`run` with the attempts whose outcome line is missing (their consumer died between
    the settle and that line) counted as Redis has them: an ack or a dead-lettering that
    landed. An attempt of which a later attempt was logged did not settle its event and is
    left out; so is one Redis still holds the event of (it will be handed out again).
    `state_of` gets the attempt's seq too, unless it is a replay (whose seq the account's
    acks passed long before it ran)."""
    logged = {(a.account, a.seq, a.attempt) for a in run.attempts}
    latest: dict[tuple[int, int], int] = {}
    for a in (*run.attempts, *run.settling):
        latest[(a.account, a.seq)] = max(latest.get((a.account, a.seq), 0), a.attempt)
    found = []
    for a in run.settling:
        if (a.account, a.seq, a.attempt) in logged or latest[(a.account, a.seq)] > a.attempt:
            continue
        state = await state_of(a.account, a.event_id, None if a.replay else a.seq)
        now = {"acked": "ack", "dead": "dead"}.get(state["state"]) if state else None
        if now is not None and now == a.outcome:
            found.append(a)
    return dataclasses.replace(run, attempts=[*run.attempts, *found], resolved=len(found))


def order_violations(attempts: Iterable[Attempt]) -> list[str]:
    """Every breach of I1 among acked events: seq out of order, overlap, or acked twice.

    A replayed dead letter is a delivery of its own: an operator sent it back after later
    events ran, so its seq is not compared with theirs. It must still not overlap another
    event of its account, and every other event keeps to seq order.
    """
    by_account: dict[int, list[Attempt]] = defaultdict(list)
    for a in attempts:
        if a.outcome == "ack":
            by_account[a.account].append(a)
    problems: list[str] = []
    for account, acked in by_account.items():
        acked.sort(key=lambda a: a.started_ns)
        for before, after in itertools.pairwise(acked):
            if after.started_ns < before.finished_ns:
                problems.append(
                    f"account {account}: seq {after.seq} started before seq {before.seq} finished"
                )
        in_order = [a for a in acked if not a.replay]
        for before, after in itertools.pairwise(in_order):
            if after.seq <= before.seq:
                problems.append(f"account {account}: seq {after.seq} acked after seq {before.seq}")
    return problems


def summarize(run: Run, waiting: int | None, slots: int | None = None) -> Report:
    """The report of `run`; `waiting` is how many of its events Redis still holds (None: unknown).

    W is `slots`, else what `gen` recorded, else the distinct (host, pid, slot) seen in the log;
    d is what `gen` recorded, else the median duration of an acked attempt.
    """
    attempts = run.attempts
    events = {(a.account, a.seq) for a in attempts}
    outcomes = {o: {(a.account, a.seq) for a in attempts if a.outcome == o} for o in SETTLED}
    violations = order_violations(attempts)
    total_slots = slots or run.slots or len({(a.host, a.pid, a.slot) for a in attempts}) or 1
    chain = run.longest_chain or max(Counter(a for a, _ in events).values(), default=0)
    process_s = run.process_s if run.process_s is not None else _median_duration_s(attempts)
    total = run.accepted if run.accepted is not None else len(events)
    bound = lower_bound_s(total, chain, total_slots, process_s)
    makespan = (
        (max(a.finished_ns for a in attempts) - min(a.enqueued_ns for a in attempts)) / 1e9
        if attempts
        else 0.0
    )
    waits = _first_waits_s(attempts)
    lost = None
    if run.accepted is not None and waiting is not None:
        lost = max(0, run.accepted - len(outcomes["ack"] | outcomes["dead"]) - waiting)
    return Report(
        run_id=run.run_id,
        events=total,
        accounts=len({a for a, _ in events}),
        acked=len(outcomes["ack"]),
        nacked=sum(a.outcome == "nack" for a in attempts),
        dead=len(outcomes["dead"] - outcomes["ack"]),
        redelivered=_redelivered(attempts),
        replayed=len({(a.account, a.seq, a.replay) for a in attempts if a.replay}),
        lost_lease=sum(a.outcome == "lost_lease" for a in attempts),
        order_violations=len(violations),
        lost=lost,
        makespan_s=makespan,
        lower_bound_s=bound,
        efficiency=bound / makespan if makespan else 0.0,
        wait_p50_s=_percentile(waits, 50),
        wait_p95_s=_percentile(waits, 95),
        wait_p99_s=_percentile(waits, 99),
        peak_concurrency=peak_concurrency(attempts),
        slots=total_slots,
        longest_chain=chain,
        process_s=process_s,
        violations=violations,
        malformed=run.malformed,
        resolved=run.resolved,
    )


def _redelivered(attempts: list[Attempt]) -> int:
    """Attempts handed out again without a nack of the one before: a crash or a lost lease."""
    nacked = {(a.account, a.seq, a.attempt) for a in attempts if a.outcome == "nack"}
    return sum(a.attempt > 1 and (a.account, a.seq, a.attempt - 1) not in nacked for a in attempts)


def _first_waits_s(attempts: list[Attempt]) -> list[float]:
    """Per event, the time from enqueue to the start of its first logged attempt."""
    first: dict[tuple[int, int], Attempt] = {}
    for a in attempts:
        seen = first.get((a.account, a.seq))
        if seen is None or a.started_ns < seen.started_ns:
            first[(a.account, a.seq)] = a
    return sorted((a.started_ns - a.enqueued_ns) / 1e9 for a in first.values())


def _percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _median_duration_s(attempts: list[Attempt]) -> float:
    durations = [(a.finished_ns - a.started_ns) / 1e9 for a in attempts if a.outcome == "ack"]
    return statistics.median(durations) if durations else 0.0


def concurrency_steps(attempts: Iterable[Attempt]) -> list[tuple[int, int]]:
    """(time_ns, handlers running from then on) at every start and finish, in time order.

    An attempt that ends as another starts does not count as overlapping it.
    """
    edges = sorted(
        itertools.chain.from_iterable(((a.started_ns, 1), (a.finished_ns, -1)) for a in attempts)
    )
    running = itertools.accumulate(delta for _, delta in edges)
    return list(zip((t for t, _ in edges), running, strict=True))


def peak_concurrency(attempts: Iterable[Attempt]) -> int:
    """The most handlers running at one instant."""
    return max((running for _, running in concurrency_steps(attempts)), default=0)


def _faster(report: Report) -> str:
    """Above 1, why: the bound takes every attempt to last PROCESS_SECONDS, as the reference
    handler's do, and this run's handler (an HTTP delivery, say) took less."""
    if report.efficiency <= 1:
        return ""
    return (
        f"; above 1: the attempts took less than PROCESS_SECONDS={report.process_s:g} s,"
        " which the bound assumes"
    )


def render(report: Report) -> str:
    """The report as aligned lines for a terminal."""
    lost = "not checked (Redis unreachable or no gen run)" if report.lost is None else report.lost
    lines = [
        ("run", report.run_id or "whole log"),
        ("events", report.events),
        ("accounts", report.accounts),
        ("acked", report.acked),
        ("dead", report.dead),
        ("nacked attempts", report.nacked),
        ("redelivered", report.redelivered),
        ("replayed", report.replayed),
        ("lost leases", report.lost_lease),
        ("order violations", report.order_violations),
        ("lost", lost),
        ("makespan", f"{report.makespan_s:.2f} s (first enqueue to last finish)"),
        (
            "lower bound",
            f"{report.lower_bound_s:.2f} s = {report.process_s:g} s x max(chain "
            f"{report.longest_chain}, ceil({report.events} / W={report.slots}))",
        ),
        ("efficiency", f"{report.efficiency:.3f} (bound / makespan){_faster(report)}"),
        (
            "wait p50/p95/p99",
            f"{report.wait_p50_s:.3f} / {report.wait_p95_s:.3f} / {report.wait_p99_s:.3f} s",
        ),
        ("peak concurrency", f"{report.peak_concurrency} of W={report.slots}"),
    ]
    if report.resolved:
        lines.append(("resolved", f"{report.resolved} (settled in Redis, outcome line missing)"))
    if report.malformed:
        lines.append(("malformed lines", f"{report.malformed} (not read: the proof is incomplete)"))
    text = "\n".join(f"{name:<17} {value}" for name, value in lines)
    shown = report.violations[:20]
    if shown:
        more = len(report.violations) - len(shown)
        text += "\n\nviolations:\n" + "\n".join(f"  {v}" for v in shown)
        text += f"\n  ... and {more} more" if more else ""
    return text
