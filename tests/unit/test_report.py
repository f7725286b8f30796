"""The report counts exactly what hand-made event logs contain."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli.commands import app
from app.workload.report import Report, read_log, render, resolve, summarize

S = 1_000_000_000  # one second in ns
RUN = "r1"
NO_REDIS = {"REDIS_URL": "redis://127.0.0.1:1/0"}  # refused at once: lost is not checked


def attempt(
    account: int,
    seq: int,
    start_s: float,
    end_s: float,
    outcome: str = "ack",
    attempt: int = 1,
    slot: int = 0,
    enqueued_s: float = 0.0,
) -> dict[str, object]:
    """One log line as the consumer writes it."""
    return {
        "event": f"event_{outcome}",
        "account": account,
        "seq": seq,
        "event_id": f"{RUN}-{account}-{seq}",
        "attempt": attempt,
        "outcome": outcome,
        "pid": 7,
        "slot": slot,
        "enqueued_ns": int(enqueued_s * S),
        "started_ns": int(start_s * S),
        "finished_ns": int(end_s * S),
    }


def write_log(tmp_path: Path, lines: list[dict[str, object]], accepted: int) -> Path:
    marker = {"event": "run_started", "run_id": RUN, "slots": 2, "longest_chain": 2}
    path = tmp_path / "event.log"
    records = [
        {"event": "run_started", "run_id": "r0", "slots": 9, "longest_chain": 9, "process_s": 9},
        {**attempt(5, 1, 0, 1), "event_id": "r0-5-1"},
        {**marker, "process_s": 1.0},
        *lines,
        {"event": "run_pushed", "run_id": RUN, "accepted": accepted},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def report_of(path: Path, waiting: int | None = 0) -> Report:
    return summarize(read_log([path], latest_run=True), waiting)


def test_clean_run_is_counted_and_bounded(tmp_path: Path) -> None:
    """Two accounts drained in order on two slots: no violation, efficiency 1, waits measured."""
    log = write_log(
        tmp_path,
        [attempt(1, 1, 0, 1), attempt(1, 2, 1, 2), attempt(2, 1, 0.5, 1.5, slot=1)],
        accepted=3,
    )
    report = summarize(read_log([log], latest_run=True), waiting=0)
    assert (report.events, report.accounts, report.acked, report.dead) == (3, 2, 3, 0)
    assert (report.order_violations, report.lost, report.redelivered) == (0, 0, 0)
    assert report.makespan_s == 2.0
    assert report.lower_bound_s == 2.0  # 1 s x max(chain 2, ceil(3 / 2))
    assert report.efficiency == 1.0
    assert report.peak_concurrency == 2
    assert (report.wait_p50_s, report.wait_p99_s) == (0.5, 1.0)
    assert report.ok


def test_overlap_is_one_violation(tmp_path: Path) -> None:
    """Seq 2 starting before seq 1 finished breaks I1 once."""
    log = write_log(tmp_path, [attempt(1, 1, 0, 1), attempt(1, 2, 0.5, 1.5, slot=1)], 2)
    report = report_of(log)
    assert report.order_violations == 1
    assert "started before seq 1 finished" in report.violations[0]


def test_out_of_seq_order_is_one_violation(tmp_path: Path) -> None:
    """Seq 2 acked before seq 1, without overlap, breaks I1 once."""
    log = write_log(tmp_path, [attempt(1, 2, 0, 1), attempt(1, 1, 1, 2)], 2)
    report = report_of(log)
    assert report.order_violations == 1
    assert "seq 1 acked after seq 2" in report.violations[0]


def test_redelivery_is_counted_but_a_nack_retry_is_not(tmp_path: Path) -> None:
    """Attempt 2 after a lost lease is a redelivery; attempt 2 after a nack is a retry."""
    lines = [
        attempt(1, 1, 0, 1, outcome="lost_lease"),
        attempt(1, 1, 1, 2, attempt=2),
        attempt(2, 1, 0, 1, outcome="nack"),
        attempt(2, 1, 1, 2, attempt=2),
    ]
    report = report_of(write_log(tmp_path, lines, 2))
    assert report.redelivered == 1
    assert report.lost_lease == 1
    assert report.nacked == 1
    assert report.acked == 2
    assert report.order_violations == 0


def test_dead_letter_is_settled_not_lost(tmp_path: Path) -> None:
    """A dead-lettered event counts as dead, not acked and not lost."""
    lines = [
        attempt(1, 1, 0, 1, outcome="nack"),
        attempt(1, 1, 1, 2, "dead", 2),
        attempt(1, 2, 2, 3),
    ]
    report = report_of(write_log(tmp_path, lines, 2))
    assert (report.acked, report.dead, report.lost) == (1, 1, 0)


@pytest.mark.parametrize(("waiting", "lost"), [(0, 1), (1, 0), (None, None)])
def test_lost_is_accepted_minus_settled_minus_waiting(
    tmp_path: Path, waiting: int | None, lost: int | None
) -> None:
    """An accepted event neither settled nor still in Redis is lost; unknown without Redis."""
    report = report_of(write_log(tmp_path, [attempt(1, 1, 0, 1)], accepted=2), waiting)
    assert report.lost == lost


def test_cli_json_and_exit_status(tmp_path: Path) -> None:
    """`evq report --json --all` prints the documented keys and exits 1 on a violation."""
    log = write_log(tmp_path, [attempt(1, 1, 0, 1), attempt(1, 2, 0.5, 1.5, slot=1)], 2)
    result = CliRunner().invoke(app, ["report", str(log), "--json", "--all"], env=NO_REDIS)
    assert result.exit_code == 1
    found = json.loads(result.stdout)
    keys = {"events", "accounts", "acked", "dead", "redelivered", "order_violations", "lost"}
    keys |= {"makespan_s", "lower_bound_s", "efficiency", "wait_p50_s", "wait_p99_s"}
    assert keys | {"peak_concurrency"} <= found.keys()
    assert found["events"] == 3  # the whole log: the earlier run's event too
    assert found["order_violations"] == 1


def test_cli_plot_writes_a_png(tmp_path: Path) -> None:
    """`--plot` writes a PNG file."""
    log = write_log(tmp_path, [attempt(1, 1, 0, 1), attempt(2, 1, 0, 1, slot=1)], 2)
    result = CliRunner().invoke(
        app, ["report", str(log), "--plot", str(tmp_path / "run.png")], env=NO_REDIS
    )
    assert (tmp_path / "run.png").read_bytes()[:4] == b"\x89PNG", result.output


def test_cli_missing_log_is_a_usage_error(tmp_path: Path) -> None:
    """A missing log file gives exit 2 and a message, not a traceback."""
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nope.log")])
    assert result.exit_code == 2
    assert "no event log" in result.output


def test_cli_says_when_nothing_was_handled(tmp_path: Path) -> None:
    """A log without handled events is reported (zeros) with a note, not silently."""
    log = write_log(tmp_path, [], 0)
    result = CliRunner().invoke(app, ["report", str(log)], env=NO_REDIS)
    assert result.exit_code == 0
    assert "no handled event" in result.stderr


def test_cli_proves_order_across_the_logs_of_several_hosts(tmp_path: Path) -> None:
    """Each host writes its own log; named together (or by a glob) the report merges them: an
    account handed from one host to another in order is clean, an overlap across hosts is
    found, and the run marker may sit in either file."""
    first = write_log(tmp_path, [{**attempt(1, 1, 0, 1), "host": "a"}], accepted=3)
    second = tmp_path / "other" / "event.log"
    second.parent.mkdir()
    lines = [{**attempt(1, 2, 1, 2), "host": "b"}, {**attempt(2, 1, 0, 1), "host": "b"}]
    second.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = CliRunner().invoke(app, ["report", str(first), str(second), "--json"], env=NO_REDIS)
    found = json.loads(result.stdout)
    assert (result.exit_code, found["acked"], found["order_violations"]) == (0, 3, 0)
    overlap = {**attempt(1, 3, 1.5, 2.5), "host": "b"}
    second.write_text(second.read_text() + json.dumps(overlap) + "\n")
    pattern = str(tmp_path / "**" / "event.log")
    result = CliRunner().invoke(app, ["report", str(first), pattern, "--json"], env=NO_REDIS)
    assert result.exit_code == 1
    assert json.loads(result.stdout)["order_violations"] == 1


def test_a_replayed_dead_letter_is_a_delivery_of_its_own(tmp_path: Path) -> None:
    """seq 2 dies, 3 runs, then an operator replays 2: not an order violation, counted as a
    replay and no longer as dead; a replay that overlaps another event still is one."""
    lines = [
        attempt(1, 1, 0, 1),
        attempt(1, 2, 1, 2, outcome="dead"),
        attempt(1, 3, 2, 3),
        {**attempt(1, 2, 4, 5), "replay": 1},
    ]
    found = report_of(write_log(tmp_path, lines, accepted=3))
    assert (found.order_violations, found.replayed, found.dead, found.acked) == (0, 1, 0, 3)
    assert found.lost == 0
    overlapping = [*lines[:3], {**attempt(1, 2, 2.5, 5), "replay": 1}]
    found = report_of(write_log(tmp_path, overlapping, accepted=3))
    assert found.order_violations == 1
    out_of_order = [attempt(1, 1, 0, 1), attempt(1, 3, 1, 2), attempt(1, 2, 2, 3)]
    assert report_of(write_log(tmp_path, out_of_order, accepted=3)).order_violations == 1


def test_malformed_lines_are_counted_and_fail_the_proof(tmp_path: Path) -> None:
    """A line that is not JSON, one cut short and an outcome line missing a field are each
    counted, shown, and make the report exit 1; the whole lines around them are still read."""
    path = write_log(tmp_path, [attempt(1, 1, 0, 1), attempt(1, 2, 1, 2)], accepted=2)
    whole = attempt(2, 1, 0, 1)
    broken = {k: v for k, v in attempt(2, 2, 1, 2).items() if k != "started_ns"}
    with path.open("a") as log:
        log.write("not json\n" + json.dumps(whole)[:40] + "\n" + json.dumps(broken) + "\n")
    found = report_of(path)
    assert (found.malformed, found.acked, found.ok) == (3, 2, False)
    done = CliRunner().invoke(app, ["report", str(path)], env=NO_REDIS)
    assert done.exit_code == 1
    assert "malformed lines   3" in done.output


async def test_a_settle_whose_outcome_line_is_missing_is_resolved_from_redis(
    tmp_path: Path,
) -> None:
    """An attempt logged as settling with no outcome line counts as Redis has it: acked when
    its ack landed, not when Redis still holds the event or a later attempt ran. The lookup
    gets the attempt's seq, except for a replay's."""
    settling = [
        {**attempt(1, 1, 0, 1), "settling": "ack"},  # acked in Redis: resolved
        {**attempt(1, 2, 1, 2), "settling": "ack"},  # still pending in Redis: not settled
        {**attempt(2, 1, 0, 1), "settling": "ack"},  # attempt 2 ran after it: not settled
        {**attempt(3, 1, 0, 1), "settling": "ack", "replay": 1},  # a replay, still pending
    ]
    for line in settling:
        del line["outcome"]
    path = write_log(tmp_path, [*settling, attempt(2, 1, 3, 4, attempt=2)], accepted=4)
    states = {"r1-1-1": "acked", "r1-1-2": "pending", "r1-2-1": "acked", "r1-3-1": "pending"}
    asked: dict[str, int | None] = {}

    async def state_of(account: int, event_id: str, seq: int | None) -> dict[str, object]:
        asked[event_id] = seq
        return {"state": states[event_id]}

    run = await resolve(read_log([path], latest_run=True), state_of)
    assert asked == {"r1-1-1": 1, "r1-1-2": 2, "r1-3-1": None}
    found = summarize(run, waiting=2)
    assert (found.acked, found.resolved, found.lost, found.order_violations) == (2, 1, 0, 0)
    assert "resolved          1" in render(found)


def test_an_efficiency_above_one_says_why(tmp_path: Path) -> None:
    """Attempts faster than PROCESS_SECONDS (a handler other than the reference one) beat the
    bound, and the report says that the bound assumed PROCESS_SECONDS."""
    log = write_log(tmp_path, [attempt(1, 1, 0, 0.1), attempt(1, 2, 0.1, 0.2)], accepted=2)
    report = report_of(log)
    assert report.efficiency == pytest.approx(10.0)
    assert "above 1: the attempts took less than PROCESS_SECONDS=1 s" in render(report)
    calm = write_log(tmp_path, [attempt(1, 1, 0, 1), attempt(1, 2, 1, 2)], accepted=2)
    assert "above 1" not in render(report_of(calm))
