"""Operating a running system with real consumer processes: replay, park on poison, pause and
resume, /metrics against the event log, SIGUSR1."""

import asyncio
import json
import os
import signal
from pathlib import Path

import orjson
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from app.api.app import create_app
from app.cli.commands import app
from app.engine import NewEvent
from app.workload.report import Run, summarize
from stack.servers import wait_for
from tests.api.test_api import Lifespan
from tests.process.helpers import counter, graceful_stop, push, push_workload, wait_burst
from tests.support import Consumers, assert_all_acked_once_in_order, attempts, settings

POISONED = "tests.support:poisoned_until_fixed"


def evq(url: str, *args: str) -> str:
    """Run an `evq` command on the test Redis; its output (it must succeed)."""
    done = CliRunner().invoke(app, list(args), env={"REDIS_URL": url})
    assert done.exit_code == 0, done.output
    return done.output


def account_events(n: int = 1) -> list[NewEvent]:
    """ok1, bad (a poison payload), ok2, ok3 for account `n`."""
    ids = ("ok1", "bad", "ok2", "ok3")
    return [NewEvent(n, i, {"poison": True} if i == "bad" else {"i": i}) for i in ids]


def handled(log: Path, account: int) -> list[tuple[str, str, int]]:
    """(event id, outcome, replay) of the account's attempts, in the order they started."""
    found = sorted((a for a in attempts(log) if a.account == account), key=lambda a: a.started_ns)
    return [(a.event_id, a.outcome, a.replay) for a in found]


def test_replayed_dead_letter_runs_again_and_the_report_keeps_order(
    redis_url: str, consumers: Consumers, tmp_path: Path
) -> None:
    """POISON_POLICY=skip: bad dies and the account goes on; after a fix the replay runs it
    once more, logged as a replay. The report counts it and finds no violation."""
    fixed = tmp_path / "fixed"
    os.environ["FIXED_MARKER"] = str(fixed)
    push(redis_url, account_events())
    consumers.start(burst=True, handler=POISONED, max_attempts=2)
    wait_burst(consumers.procs)
    fixed.touch()
    assert "replayed 1 dead letters" in evq(redis_url, "dead", "replay", "--event-id", "bad")
    consumers.start(burst=True, handler=POISONED)
    wait_burst(consumers.procs[1:])
    assert handled(consumers.event_log, 1) == [
        ("ok1", "ack", 0),
        ("bad", "nack", 0),
        ("bad", "dead", 0),
        ("ok2", "ack", 0),
        ("ok3", "ack", 0),
        ("bad", "ack", 1),
    ]
    report = summarize(Run(attempts(consumers.event_log), accepted=4), waiting=0)
    assert (report.order_violations, report.replayed, report.dead, report.lost) == (0, 1, 0, 0)
    assert counter(redis_url, "dead_letters") == 0


def test_park_holds_the_account_until_the_fix_and_replay(
    redis_url: str, consumers: Consumers, tmp_path: Path
) -> None:
    """POISON_POLICY=park: bad parks account 1, so ok2 and ok3 wait while other accounts
    drain; replaying after a fix runs bad, ok2 and ok3 in seq order."""
    fixed = tmp_path / "fixed"
    os.environ["FIXED_MARKER"] = str(fixed)
    push(redis_url, [*account_events(1), *(NewEvent(a, f"x{a}") for a in range(2, 30))])
    consumers.start(handler=POISONED, max_attempts=2, poison_policy="park")
    wait_for(lambda: counter(redis_url, "acked") == 29, 30, "the other accounts drained")
    assert counter(redis_url, "parked") == 1
    assert counter(redis_url, "backlog") == 2  # ok2 and ok3 wait behind the parked event
    found = json.loads(evq(redis_url, "event", "1", "ok2"))
    assert (found["state"], found["position"]) == ("pending", 1)
    fixed.touch()
    evq(redis_url, "dead", "replay", "--account", "1")
    wait_for(lambda: counter(redis_url, "acked") == 32, 30, "account 1 drained")
    # The outcome lines follow Redis' answer to the settle.
    wait_for(lambda: len(handled(consumers.event_log, 1)) == 6, 10, "account 1's lines")
    assert handled(consumers.event_log, 1) == [
        ("ok1", "ack", 0),
        ("bad", "nack", 0),
        ("bad", "dead", 0),
        ("bad", "ack", 1),
        ("ok2", "ack", 0),
        ("ok3", "ack", 0),
    ]
    acked = [a for a in attempts(consumers.event_log) if a.account == 1 and a.outcome == "ack"]
    assert [a.seq for a in acked] == sorted(a.seq for a in acked)  # the replay in its place
    assert counter(redis_url, "parked") == 0


def test_pause_holds_an_account_while_others_drain(redis_url: str, consumers: Consumers) -> None:
    """A paused account keeps accepting events but none runs; resumed, it drains in order."""
    push(redis_url, [NewEvent(1, f"p{i}") for i in range(10)])
    assert "paused" in evq(redis_url, "pause", "1")
    push(redis_url, [NewEvent(a, f"x{a}") for a in range(2, 40)])
    push(redis_url, [NewEvent(1, "p10")])  # accepted while paused
    consumers.start(process_seconds=0.01)
    wait_for(lambda: counter(redis_url, "acked") == 38, 30, "the other accounts drained")
    assert counter(redis_url, "backlog") == 11
    assert all(a.account != 1 for a in attempts(consumers.event_log))
    assert "resumed" in evq(redis_url, "resume", "1")
    wait_for(lambda: counter(redis_url, "backlog") == 0, 30, "account 1 drained")
    graceful_stop(consumers.procs)  # the last ack's log line follows its reply from Redis
    assert_all_acked_once_in_order(consumers.event_log, 49)


def metrics_text(url: str) -> str:
    """GET /metrics of the app on `url`."""

    async def scrape() -> str:
        async with Lifespan(create_app(settings(url))) as api:
            return (await api.get("/metrics")).text

    return asyncio.run(scrape())


def test_metrics_match_stats_and_the_event_log(redis_url: str, consumers: Consumers) -> None:
    """After a run with failures, /metrics says what `evq stats` and the event log say: the
    counters, and as many handler-time and wait observations as acked events."""
    push_workload(redis_url, 300, 30, seed=3)
    for _ in range(2):
        consumers.start(burst=True, fail_rate=0.2, max_attempts=2, process_seconds=0.01)
    wait_burst(consumers.procs)
    stats = orjson.loads(evq(redis_url, "stats"))
    log = attempts(consumers.event_log)
    outcomes = [a.outcome for a in log]
    text = metrics_text(redis_url)
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["evq_events_enqueued_total"] == stats["accepted"] == 300
    assert samples["evq_events_processed_total"] == stats["acked"] == outcomes.count("ack")
    assert samples["evq_events_failed_total"] == stats["nacked"]
    assert stats["nacked"] == outcomes.count("nack") + outcomes.count("dead")
    assert samples["evq_events_dead_lettered_total"] == outcomes.count("dead") > 0
    assert samples["evq_backlog_events"] == 0
    for histogram in ("evq_event_processing_seconds", "evq_event_wait_seconds"):
        assert samples[f"{histogram}_count"] == outcomes.count("ack")
        assert samples[f"{histogram}_bucket"] == outcomes.count("ack")  # the +Inf bucket
    durations = sum((a.finished_ns - a.started_ns) / 1e9 for a in log if a.outcome == "ack")
    assert abs(samples["evq_event_processing_seconds_sum"] - durations) < 0.01 * len(log)


def test_sigusr1_logs_the_state_and_the_consumer_goes_on(
    redis_url: str, consumers: Consumers
) -> None:
    """SIGUSR1 writes one consumer_state line (slots, held accounts with token and lease left,
    settled count, uptime); the consumer keeps draining and exits cleanly."""
    push(redis_url, [NewEvent(a, f"e{a}-{i}") for a in range(1, 4) for i in range(8)])
    proc = consumers.start(burst=True, process_seconds=0.3, concurrency=4)
    wait_for(lambda: counter(redis_url, "acked") >= 3, 30, "some events acked")
    proc.send_signal(signal.SIGUSR1)

    def state() -> dict[str, object] | None:
        for line in consumers.event_log.read_text().splitlines():
            if '"consumer_state"' in line:
                found: dict[str, object] = json.loads(line)
                return found
        return None

    wait_for(lambda: state() is not None, 10, "the consumer_state line")
    found = state()
    assert found is not None
    assert (found["slots"], found["pid"]) == (4, proc.pid)
    assert found["busy"] == 3 and found["free"] == 1, found
    held = found["held"]
    assert isinstance(held, list)
    assert sorted(h["account"] for h in held) == [1, 2, 3]
    assert all(h["token"] > 0 and 0 < h["lease_left_s"] <= 5 for h in held)
    assert isinstance(found["settled"], int) and found["settled"] >= 3
    wait_burst(consumers.procs)
    assert_all_acked_once_in_order(consumers.event_log, 24)
