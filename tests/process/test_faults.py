"""Ordering and no-loss under real consumer processes: many slots, kill -9, SIGSTOP, SIGTERM."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from app.cli.commands import app
from app.engine import NewEvent
from app.log import rotated
from app.workload.report import Attempt, order_violations
from stack.servers import wait_for
from tests.process.helpers import (
    counter,
    dead_letters,
    graceful_stop,
    in_flight,
    live_consumers,
    push,
    push_workload,
    wait_burst,
    wait_settled,
    wait_started,
)
from tests.support import Consumers, assert_all_acked_once_in_order, attempts


def test_many_consumers_keep_per_account_order(redis_url: str, consumers: Consumers) -> None:
    """I1, I2: three processes x 40 slots ack 2,000 bursty events once each, in seq order."""
    for _ in range(3):
        consumers.start(concurrency=40, process_seconds=0.002)
    # All three running first: one still importing when SIGTERM comes would die by the signal.
    wait_for(lambda: live_consumers(redis_url) == 3, 30, "three consumers' heartbeats")
    push_workload(redis_url, 2000, 200, seed=1)
    wait_settled(redis_url, 2000, timeout=90)
    graceful_stop(consumers.procs)
    found = assert_all_acked_once_in_order(consumers.event_log, 2000)
    assert len({a.pid for a in found}) == 3


def test_pushes_during_consumption_are_not_lost(redis_url: str, consumers: Consumers) -> None:
    """No lost wake-up: events pushed while slots drain the same accounts are all handled."""
    consumers.start(concurrency=20, process_seconds=0.001)
    for wave in range(20):
        push(redis_url, [NewEvent(a, f"w{wave}-{a}") for a in range(1, 31)])
    wait_settled(redis_url, 600, timeout=60)
    graceful_stop(consumers.procs)
    assert_all_acked_once_in_order(consumers.event_log, 600)


def test_kill_9_mid_handler_redelivers_attempt_2(redis_url: str, consumers: Consumers) -> None:
    """I2, I3: events in flight when a consumer is killed are redelivered once, as attempt 2."""
    push_workload(redis_url, 60, 6, seed=3)
    victim = consumers.start(concurrency=6, process_seconds=0.3, lease_seconds=1)
    wait_for(lambda: counter(redis_url, "acked") >= 3 and in_flight(redis_url), 30, "work")
    victim.kill()
    victim.wait()
    lost = in_flight(redis_url)
    assert lost
    consumers.start(burst=True, concurrency=6, process_seconds=0.01, lease_seconds=1)
    wait_burst(consumers.procs[1:])
    found = assert_all_acked_once_in_order(consumers.event_log, 60)
    redelivered = {(a.account, a.seq) for a in found if a.outcome == "ack" and a.attempt == 2}
    assert redelivered == set(lost.items())
    assert counter(redis_url, "redelivered") == len(lost)


def test_stalled_consumer_loses_lease_and_its_ack_is_refused(
    redis_url: str, consumers: Consumers
) -> None:
    """I4, I5: a SIGSTOPped owner is replaced after its lease; on SIGCONT its ack is refused."""
    push_workload(redis_url, 30, 3, seed=4)
    stalled = consumers.start(concurrency=3, process_seconds=0.5, lease_seconds=1)
    wait_for(lambda: counter(redis_url, "acked") >= 1 and in_flight(redis_url), 30, "work")
    os.kill(stalled.pid, signal.SIGSTOP)
    taken = in_flight(redis_url)
    taker = consumers.start(concurrency=3, process_seconds=0.05, lease_seconds=1)
    wait_for(lambda: counter(redis_url, "redelivered") >= len(taken), 30, "takeover")
    os.kill(stalled.pid, signal.SIGCONT)
    wait_settled(redis_url, 30, timeout=60)
    wait_for(
        lambda: any(a.outcome == "lost_lease" for a in attempts(consumers.event_log)),
        10,
        "the stale ack to be refused",
    )
    graceful_stop(consumers.procs)
    found = assert_all_acked_once_in_order(consumers.event_log, 30)
    refused = {(a.account, a.seq) for a in found if a.outcome == "lost_lease"}
    assert refused <= set(taken.items())
    assert all(a.pid == stalled.pid for a in found if a.outcome == "lost_lease")
    assert any(a.pid == taker.pid and a.attempt == 2 for a in found if a.outcome == "ack")


def test_failures_retry_in_place_and_keep_order(redis_url: str, consumers: Consumers) -> None:
    """With FAIL_RATE, events are retried where they stand and the account order holds."""
    push_workload(redis_url, 300, 20, seed=5)
    consumers.start(burst=True, concurrency=10, fail_rate=0.3, max_attempts=30)
    consumers.start(burst=True, concurrency=10, fail_rate=0.3, max_attempts=30)
    wait_burst(consumers.procs)
    found = assert_all_acked_once_in_order(consumers.event_log, 300)
    assert counter(redis_url, "nacked") == sum(a.outcome == "nack" for a in found) > 0
    assert counter(redis_url, "dead") == 0


def drained_around(
    redis_url: str, consumers: Consumers, marked: NewEvent, **settings: object
) -> list[Attempt]:
    """Account 1's events ok1, `marked`, ok2 drained by a burst consumer with `settings`; the
    attempts its event log shows."""
    push(redis_url, [NewEvent(1, "ok1"), marked, NewEvent(1, "ok2")])
    consumers.start(burst=True, **settings)
    wait_burst(consumers.procs)
    return attempts(consumers.event_log)


def test_poison_event_is_dead_lettered_and_account_goes_on(
    redis_url: str, consumers: Consumers
) -> None:
    """An always-failing event is tried MAX_ATTEMPTS times, dead-lettered; later ones run."""
    found = drained_around(
        redis_url,
        consumers,
        NewEvent(1, "bad", {"poison": True}),
        handler="tests.support:failing_marked",
        max_attempts=3,
    )
    assert [(a.event_id, a.attempt, a.outcome) for a in found] == [
        ("ok1", 1, "ack"),
        ("bad", 1, "nack"),
        ("bad", 2, "nack"),
        ("bad", 3, "dead"),
        ("ok2", 1, "ack"),
    ]
    [entry] = dead_letters(redis_url)
    assert entry["event_id"] == "bad"
    assert "ValueError: poison event bad" in entry["error"]
    assert entry["attempts"] == 3


@pytest.mark.parametrize(
    "handler", ["tests.support:hanging_marked", "tests.support:hanging_marked_sync"]
)
def test_hung_handler_times_out_and_the_account_goes_on(
    redis_url: str, consumers: Consumers, handler: str
) -> None:
    """HANDLER_TIMEOUT_SECONDS: a handler that hangs (async: cancelled; sync: left in its
    thread) fails its attempt with reason timeout, is retried and dead-lettered like any
    failure, and the account's later events run in order; each timeout is logged."""
    found = drained_around(
        redis_url,
        consumers,
        NewEvent(1, "stuck", {"hang": True}),
        handler=handler,
        max_attempts=2,
        handler_timeout_seconds=0.5,
    )
    assert [(a.event_id, a.attempt, a.outcome) for a in found] == [
        ("ok1", 1, "ack"),
        ("stuck", 1, "nack"),
        ("stuck", 2, "dead"),
        ("ok2", 1, "ack"),
    ]
    stuck = [a for a in found if a.event_id == "stuck"]
    took = [(a.finished_ns - a.started_ns) / 1e9 for a in stuck]
    assert all(0.45 < s < 2 for s in took), took  # wall clock against the loop's
    [entry] = dead_letters(redis_url)
    assert entry["error"].startswith("timeout: the handler ran longer than 0.5 s")
    assert consumers.event_log.read_text().count('"handler_timed_out"') == 2


def test_dedupe_across_processes(redis_url: str, consumers: Consumers) -> None:
    """I6: a re-sent event_id is reported duplicate and handled once."""
    first = push(redis_url, [NewEvent(5, "dup"), NewEvent(5, "next")])
    again = push(redis_url, [NewEvent(5, "dup")])
    assert [r.queued for r in first] == [True, True]
    assert (again[0].queued, again[0].seq) == (False, first[0].seq)
    consumers.start(burst=True)
    wait_burst(consumers.procs)
    assert_all_acked_once_in_order(consumers.event_log, 2)


def test_an_account_claimed_ahead_keeps_its_lease_while_it_waits_for_a_slot(
    redis_url: str, consumers: Consumers
) -> None:
    """One slot with a 0.4 s handler holds a second account claimed ahead, and renews it: it
    waits about 2 s for the slot, twice the lease, and then runs without losing its lease or
    charging its first event a second attempt."""
    push(redis_url, [NewEvent(a, f"a{a}-{i}") for a in (1, 2, 3) for i in range(5)])
    consumers.start(burst=True, concurrency=1, process_seconds=0.4, lease_seconds=1)
    wait_for(lambda: len(in_flight(redis_url)) == 2, 10, "an account claimed ahead of the one slot")
    wait_burst(consumers.procs)
    found = assert_all_acked_once_in_order(consumers.event_log, 15)
    assert all(a.attempt == 1 for a in found)
    assert counter(redis_url, "redelivered") == 0


@pytest.mark.parametrize("handler", ["app.handlers:reference", "tests.support:sleeping"])
def test_sigterm_finishes_current_events_and_loses_nothing(
    redis_url: str, consumers: Consumers, handler: str
) -> None:
    """SIGTERM mid-run: current events finish and are acked, the process exits 0, no redelivery."""
    push_workload(redis_url, 100, 10, seed=6)
    consumers.start(concurrency=5, process_seconds=0.3, handler=handler)
    wait_for(lambda: counter(redis_url, "acked") >= 5 and in_flight(redis_url), 30, "work")
    graceful_stop(consumers.procs, timeout=5)
    assert in_flight(redis_url) == {}
    consumers.start(burst=True, concurrency=5, handler=handler)
    wait_burst(consumers.procs[1:])
    found = assert_all_acked_once_in_order(consumers.event_log, 100)
    assert all(a.attempt == 1 for a in found)
    assert counter(redis_url, "redelivered") == 0


def test_event_log_rotates_by_size_and_the_report_reads_it_whole(
    redis_url: str, consumers: Consumers
) -> None:
    """EVENT_LOG_MAX_BYTES: two processes writing one log rotate it (`event.log.1`, `.2`, ...)
    without losing or splitting a line, and `evq report` reads the rotated files as one log."""
    for _ in range(2):
        consumers.start(concurrency=20, event_log_max_bytes=65536, event_log_keep=100)
    wait_for(lambda: live_consumers(redis_url) == 2, 30, "two consumers' heartbeats")
    push_workload(redis_url, 2000, 100, seed=9)
    wait_settled(redis_url, 2000, timeout=60)
    graceful_stop(consumers.procs)
    log = consumers.event_log
    files = rotated(log)
    assert len(files) >= 5
    assert all(path.stat().st_size < 4 * 65536 for path in files)
    found = [a for path in files for a in attempts(path)]
    assert len({(a.account, a.seq) for a in found if a.outcome == "ack"}) == 2000
    assert order_violations(found) == []
    report = CliRunner().invoke(
        app, ["report", str(log), "--json", "--all"], env={"REDIS_URL": redis_url}
    )
    assert report.exit_code == 0, report.output
    assert json.loads(report.stdout)["acked"] == 2000


@pytest.mark.parametrize(("handler_s", "slots"), [(0.01, 30), (0.002, 2)])
def test_twenty_kill_9s_leave_no_settled_event_out_of_the_proof(
    redis_url: str, consumers: Consumers, handler_s: float, slots: int
) -> None:
    """Consumers with a 0.01 s handler (batches of up to 10), or a 0.002 s one on few slots
    (batches of up to 50), are killed -9 twenty times during a drain (each replaced at once): `evq
    report` finds every event settled, 0 lost and 0 violations, counting the attempts whose
    outcome line a kill cut off from their settling line and Redis."""
    env = {**os.environ, "REDIS_URL": redis_url, "EVENT_LOG": str(consumers.event_log)}
    settings = {"concurrency": slots, "process_seconds": handler_s, "lease_seconds": 1}
    for _ in range(2):
        consumers.start(**settings)
    wait_for(lambda: live_consumers(redis_url) == 2, 30, "two consumers' heartbeats")
    gen = [sys.executable, "-m", "app", "gen", "--events", "4000", "--accounts", "200"]
    subprocess.run([*gen, "--seed", "5"], env=env, check=True, capture_output=True)
    rng = random.Random(20)
    for _ in range(20):
        time.sleep(rng.uniform(0.05, 0.25))
        live = [p for p in consumers.procs if p.poll() is None]
        os.kill(rng.choice(live).pid, signal.SIGKILL)
        consumers.start(**settings)
    wait_settled(redis_url, 4000, timeout=90)
    wait_started(redis_url, consumers.procs)
    graceful_stop([p for p in consumers.procs if p.poll() is None])
    done = subprocess.run(
        [sys.executable, "-m", "app", "report", str(consumers.event_log), "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    report = json.loads(done.stdout)
    assert (report["lost"], report["order_violations"]) == (0, 0), report
    assert report["acked"] == 4000 and done.returncode == 0
