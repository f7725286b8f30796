"""Nothing lost on a flaky connection: killed connections, a paused Redis, handlers raising odd
types, an event log that cannot be written, blocking pops longer than the socket timeout."""

import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from subprocess import Popen

import redis as sync_redis

from app.engine import NewEvent
from app.workload.report import Attempt
from bench.scenarios import handling_window_s
from stack import REPO
from stack.servers import ConnectionKiller, wait_for
from tests.process.helpers import (
    counter,
    graceful_stop,
    held,
    live_consumers,
    push,
    push_workload,
    wait_burst,
    wait_settled,
)
from tests.support import Consumers, assert_all_acked_once_in_order, attempts


def log_mentions(log: Path, needle: str) -> int:
    return log.read_text().count(needle)


def logged(log: Path) -> int:
    """How many attempts the event log holds so far."""
    return len(attempts(log)) if log.exists() else 0


def drain(url: str, log: Path, chaos: bool) -> tuple[list[Attempt], ConnectionKiller | None]:
    """Queue the same 2,000-event workload, drain it with one burst consumer of 20 slots."""
    sync_redis.Redis.from_url(url).flushall()
    push_workload(url, 2000, 100, seed=11)
    group = Consumers(url, log)
    proc = group.start(burst=True, concurrency=20, process_seconds=0.1)
    try:
        wait_for(lambda: live_consumers(url) == 1, 30, "the consumer's heartbeat")
        if not chaos:
            wait_burst([proc], timeout=120)
            return assert_all_acked_once_in_order(log, 2000), None
        with ConnectionKiller(url, period_s=0.3) as killer:
            wait_burst([proc], timeout=120)
        return assert_all_acked_once_in_order(log, 2000), killer
    finally:
        group.stop_all()


def test_connections_killed_through_a_whole_drain(redis_url: str, tmp_path: Path) -> None:
    """Connections killed every 300 ms through a 2,000-event drain: nothing lost, no order
    violation, no attempt without a handler call, and the drain within 10% of a calm one."""
    calm, _ = drain(redis_url, tmp_path / "calm.log", chaos=False)
    stormy, killer = drain(redis_url, tmp_path / "chaos.log", chaos=True)
    assert killer is not None
    assert killer.killed >= killer.rounds > 10, "the connections were not killed"
    assert log_mentions(tmp_path / "chaos.log", "redis_faults_ridden_out") > 0
    assert len(stormy) == 2000, "an attempt was logged twice or lost its lease"
    assert {a.attempt for a in stormy} == {1}, "an attempt was counted that never ran"
    assert counter(redis_url, "redelivered") == counter(redis_url, "nacked") == 0
    ratio = handling_window_s(stormy) / handling_window_s(calm)
    assert ratio <= 1.10, f"the drain under chaos took {ratio:.3f} x the calm one"


def test_redis_paused_longer_than_the_socket_timeout(redis_url: str, consumers: Consumers) -> None:
    """CLIENT PAUSE for 2.5 s with a 1 s socket timeout and an 8 s lease: calls time out and are
    sent again, no account changes owner, nothing is redelivered, the drain finishes."""
    push_workload(redis_url, 600, 60, seed=12)
    consumers.start(concurrency=10, process_seconds=0.05, lease_seconds=8, redis_timeout_seconds=1)
    wait_for(lambda: counter(redis_url, "acked") >= 100, 30, "work before the pause")
    pauser = sync_redis.Redis.from_url(redis_url)
    pauser.execute_command("CLIENT", "PAUSE", 2500, "ALL")
    paused_at = time.monotonic()
    wait_settled(redis_url, 600, timeout=60)
    assert time.monotonic() - paused_at >= 2.5
    pauser.close()
    graceful_stop(consumers.procs)
    found = assert_all_acked_once_in_order(consumers.event_log, 600)
    assert len(found) == 600 and {a.attempt for a in found} == {1}
    assert counter(redis_url, "redelivered") == 0
    assert log_mentions(consumers.event_log, "lease_lost") == 0
    assert log_mentions(consumers.event_log, "redis_faults_ridden_out") > 0


def test_handler_raising_an_unexpected_type_costs_no_slot(
    redis_url: str, consumers: Consumers
) -> None:
    """A handler raising a BaseException subclass fails that attempt only: the one slot goes
    on, the event is retried in place, and the account stays in order."""
    push(redis_url, [NewEvent(1, f"e{i}", {"odd": i in (2, 5)}) for i in range(8)])
    proc = consumers.start(burst=True, concurrency=1, handler="tests.support:raises_unexpected")
    wait_burst([proc])
    found = attempts(consumers.event_log)
    assert [(a.event_id, a.attempt, a.outcome) for a in found if a.event_id in ("e2", "e5")] == [
        ("e2", 1, "nack"),
        ("e2", 2, "ack"),
        ("e5", 1, "nack"),
        ("e5", 2, "ack"),
    ]
    assert "Unexpected: unexpected failure of e2" in consumers.event_log.read_text()
    assert_all_acked_once_in_order(consumers.event_log, 8)


def limit_file_size(proc: Popen[bytes], log: Path) -> None:
    """From now on the process cannot grow any file beyond the event log's size: its log
    writes fail with EFBIG, as on a full disk."""
    soft = log.stat().st_size
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (soft, resource.RLIM_INFINITY))


def test_event_log_write_failing_for_a_while(redis_url: str, consumers: Consumers) -> None:
    """Event-log writes that fail for half a second are written once the file takes them
    again: every ack is in the log once, in order."""
    push_workload(redis_url, 400, 10, seed=13)
    proc = consumers.start(burst=True, concurrency=2, process_seconds=0.01)
    wait_for(lambda: logged(consumers.event_log) >= 20, 30, "logged work")
    limit_file_size(proc, consumers.event_log)
    time.sleep(0.5)
    unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, unlimited)
    wait_burst([proc])
    assert proc.stderr is not None
    assert b"event_log_write_failed" in proc.stderr.read()
    assert_all_acked_once_in_order(consumers.event_log, 400)


def test_consumer_whose_slots_keep_failing_exits_1(redis_url: str, consumers: Consumers) -> None:
    """An event log that stays unwritable fails slot after slot: the consumer says so on stderr
    and exits 1 for supervisord to restart it, and Redis still holds every event."""
    push_workload(redis_url, 400, 40, seed=14)
    proc = consumers.start(concurrency=4, process_seconds=0.01, lease_seconds=1)
    wait_for(lambda: logged(consumers.event_log) >= 10, 30, "logged work")
    limit_file_size(proc, consumers.event_log)
    assert proc.wait(timeout=30) == 1
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    assert b"unexpected failures within 60 s" in stderr
    assert b"event_log_line_lost" in stderr  # the lines the file refused are not gone
    assert counter(redis_url, "acked") + held(redis_url) == 400


def test_claim_block_longer_than_the_socket_timeout(redis_url: str, consumers: Consumers) -> None:
    """CLAIM_BLOCK_SECONDS=10 with a 1 s socket timeout: idle claimers block for less than the
    timeout, so idling raises no fault, and pushed events are still claimed at once."""
    consumers.start(claim_block_seconds=10, redis_timeout_seconds=1, lease_seconds=5)
    wait_for(lambda: live_consumers(redis_url) == 1, 30, "the consumer's heartbeat")
    time.sleep(2.5)  # idle across two socket timeouts
    push(redis_url, [NewEvent(1, f"e{i}") for i in range(10)])
    wait_settled(redis_url, 10, timeout=10)
    graceful_stop(consumers.procs)
    assert_all_acked_once_in_order(consumers.event_log, 10)
    assert log_mentions(consumers.event_log, "redis_faults_ridden_out") == 0


def test_evq_wait_rides_out_killed_connections(redis_url: str, consumers: Consumers) -> None:
    """`evq wait` polls through connection kills and returns only once the drain is done."""
    push_workload(redis_url, 400, 40, seed=15)
    consumers.start(concurrency=10, process_seconds=0.02)
    env = {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": str(REPO)}
    with ConnectionKiller(redis_url, period_s=0.2) as killer:
        waited = subprocess.run(
            [sys.executable, "-m", "app", "wait", "--timeout", "60"],
            env=env,
            capture_output=True,
            check=False,
        )
    assert waited.returncode == 0, waited.stderr
    assert killer.rounds > 3
    assert counter(redis_url, "acked") == 400
