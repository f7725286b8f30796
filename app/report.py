"""Reads the event log: proves per-account order (I1) and measures the run against its bound."""

import itertools
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Attempt:
    """One handled attempt as the consumer logged it."""

    account: int
    seq: int
    event_id: str
    attempt: int
    outcome: str
    pid: int
    slot: int
    enqueued_ns: int
    started_ns: int
    finished_ns: int


def read_log(path: Path, latest_run: bool = False) -> tuple[dict[str, Any] | None, list[Attempt]]:
    """The last `run_started` marker and the attempts (only those after it when `latest_run`)."""
    marker: dict[str, Any] | None = None
    attempts: list[Attempt] = []
    for record in _records(path):
        if "outcome" in record:
            attempts.append(
                Attempt(**{name: record[name] for name in Attempt.__dataclass_fields__})
            )
        elif record.get("event") == "run_started":
            marker = record
            if latest_run:
                attempts.clear()
    return marker, attempts


def _records(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as lines:
        for line in lines:
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record


def order_violations(attempts: Iterable[Attempt]) -> list[str]:
    """Every breach of I1 among acked events: seq out of order, overlap, or acked twice."""
    by_account: dict[int, list[Attempt]] = defaultdict(list)
    for a in attempts:
        if a.outcome == "ack":
            by_account[a.account].append(a)
    problems: list[str] = []
    for account, acked in by_account.items():
        acked.sort(key=lambda a: a.started_ns)
        for before, after in itertools.pairwise(acked):
            if after.seq <= before.seq:
                problems.append(f"account {account}: seq {after.seq} acked after seq {before.seq}")
            if after.started_ns < before.finished_ns:
                problems.append(
                    f"account {account}: seq {after.seq} started before seq {before.seq} finished"
                )
    return problems
