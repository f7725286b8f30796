"""HTTP delivery (`HANDLER=app.handlers:http`) with real processes: consumers on a real
redis-server POST to `stack.receiver`, which records every request it gets. Order, signatures,
retries and fencing are checked from the receiver's own record."""

import base64
import collections
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from app.engine import NewEvent
from stack.receiver import ReceiverProcess
from stack.servers import wait_for
from tests.process.helpers import (
    counter,
    dead_letters,
    in_flight,
    push,
    push_workload,
    wait_burst,
    wait_settled,
)
from tests.support import Consumers, api_process, attempts

SECRET = "whsec_" + base64.b64encode(b"evq test secret, 32 bytes long!!").decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"the secret before the rotation").decode()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[ReceiverProcess]:
    process = ReceiverProcess(tmp_path / "received.jsonl", secrets=[SECRET]).start()
    yield process
    process.kill()


def delivering(receiver: ReceiverProcess, **env: object) -> dict[str, object]:
    """The settings of a consumer that delivers to `receiver`."""
    return {
        "HANDLER": "app.handlers:http",
        "DELIVERY_URL": receiver.url + "/hooks/{account_id}",
        "DELIVERY_SECRET": SECRET,
        **env,
    }


def delivered(lines: list[dict[str, Any]]) -> dict[int, list[int]]:
    """account -> the seqs the receiver accepted (2xx), in the order it accepted them."""
    found: dict[int, list[int]] = collections.defaultdict(list)
    for line in lines:
        if 200 <= line["status"] < 300:
            found[line["account"]].append(line["seq"])
    return found


def outcome_lines(log: Path) -> list[dict[str, Any]]:
    """The event log's outcome lines (acked, nacked, dead), as written."""
    lines = (json.loads(line) for line in log.read_bytes().splitlines() if b'"outcome"' in line)
    return [line for line in lines if line.get("event") != "event_settling"]


def assert_each_once_in_order(lines: list[dict[str, Any]], pushed: int, again: int = 0) -> None:
    """Every event accepted, in seq order per account; at most `again` accepted a second time
    right after the first (a receiver that died after recording, before answering)."""
    accepted = delivered(lines)
    assert sum(len(seqs) for seqs in accepted.values()) - pushed <= again
    for account, seqs in accepted.items():
        once = [seq for i, seq in enumerate(seqs) if i == 0 or seqs[i - 1] != seq]
        assert once == sorted(set(seqs)), f"account {account}: {seqs[:10]}..."
    assert sum(len(set(seqs)) for seqs in accepted.values()) == pushed


def test_every_event_is_delivered_once_in_seq_order(
    redis_url: str, consumers: Consumers, receiver: ReceiverProcess
) -> None:
    plan = push_workload(redis_url, 5000, 200)
    procs = [consumers.start(burst=True, concurrency=100, **delivering(receiver)) for _ in "ab"]
    wait_burst(procs, timeout=90)
    lines = receiver.lines()
    assert len(lines) == 5000, "each event delivered once: nothing failed"
    assert_each_once_in_order(lines, 5000)
    pushed_ids = {(e.account, e.event_id) for e in plan}
    bodies = [httpx.Response(200, content=line["body"]).json() for line in lines]
    assert {(b["account_id"], b["event_id"]) for b in bodies} == pushed_ids
    assert all(b["payload"] == {"i": int(b["event_id"][1:])} for b in bodies)
    acked = [a for a in attempts(consumers.event_log) if a.outcome == "ack"]
    assert len(acked) == 5000
    with api_process(redis_url) as api:
        metrics = httpx.get(f"{api.url}/metrics").text
        overview = httpx.get(f"{api.url}/overview").json()
    assert 'evq_deliveries_total{outcome="2xx"} 5000.0' in metrics
    assert "evq_delivery_seconds_count 5000.0" in metrics
    assert overview["deliveries"] == {"2xx": 5000}


def test_signatures_verify_with_the_standardwebhooks_package(
    redis_url: str, consumers: Consumers, tmp_path: Path
) -> None:
    receiver = ReceiverProcess(tmp_path / "rotating.jsonl", secrets=[OLD_SECRET]).start()
    try:
        push_workload(redis_url, 40, 8)
        env = delivering(receiver, delivery_secret=f"{OLD_SECRET} {SECRET}")
        wait_burst([consumers.start(burst=True, **env)])
        lines = receiver.lines()
    finally:
        receiver.kill()
    assert [line["status"] for line in lines] == [200] * 40, "the receiver verified each"
    for secret in (OLD_SECRET, SECRET):  # signed with both while the secret rotates
        for line in lines:
            Webhook(secret).verify(line["body"], line["headers"])
    line = lines[0]
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(line["body"].replace('"attempt":1', '"attempt":2'), line["headers"])
    moved = {
        **line["headers"],
        "webhook-timestamp": str(int(line["headers"]["webhook-timestamp"]) - 1),
    }
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(line["body"], moved)
    assert (
        line["headers"]["webhook-id"]
        == httpx.Response(200, content=line["body"]).json()["event_id"]
    )


def test_a_failing_receiver_is_retried_with_backoff_in_order(
    redis_url: str, consumers: Consumers, receiver: ReceiverProcess
) -> None:
    receiver.control(status=500, seconds=1.5)
    push_workload(redis_url, 300, 10)
    env = delivering(receiver, max_attempts=50, retry_backoff_seconds=0.05)
    wait_burst([consumers.start(burst=True, concurrency=10, **env)], timeout=60)
    lines = receiver.lines()
    failed = [line for line in lines if line["status"] == 500]
    assert failed, "the receiver answered 500 for a while"
    assert_each_once_in_order(lines, 300)
    assert counter(redis_url, "nacked") == len(failed)
    retried = {(line["account"], line["seq"]) for line in failed}
    later = [
        line
        for line in lines
        if (line["account"], line["seq"]) in retried and line["status"] == 200
    ]
    assert all(line["attempt"] >= 2 for line in later)


def test_retry_after_is_waited_out(
    redis_url: str, consumers: Consumers, receiver: ReceiverProcess
) -> None:
    receiver.control(status=429, retry_after=2, times=1)
    push(redis_url, [NewEvent(5, f"e{i}") for i in range(3)])
    wait_burst([consumers.start(burst=True, **delivering(receiver))], timeout=30)
    lines = receiver.lines()
    assert [line["status"] for line in lines] == [429, 200, 200, 200]
    assert lines[1]["seq"] == lines[0]["seq"] and lines[1]["attempt"] == 2
    waited_s = (lines[1]["at_ns"] - lines[0]["at_ns"]) / 1e9
    assert 2.0 <= waited_s < 4.0, waited_s  # the backoff alone is a millisecond here


@pytest.mark.parametrize("policy", ["skip", "park"])
def test_a_410_dead_letters_at_once(
    redis_url: str, consumers: Consumers, receiver: ReceiverProcess, policy: str
) -> None:
    receiver.control(status=410, account=7, times=1)
    push(redis_url, [NewEvent(a, f"e{a}-{i}") for a in (7, 8) for i in range(3)])
    proc = consumers.start(**delivering(receiver, poison_policy=policy))
    expected = 5 if policy == "skip" else 3  # parked: account 7's two later events wait
    wait_for(
        lambda: sum(map(len, delivered(receiver.lines()).values())) >= expected, 20, "deliveries"
    )
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=15)
    accepted = delivered(receiver.lines())
    assert len(accepted[8]) == 3
    assert len(accepted.get(7, [])) == (2 if policy == "skip" else 0)
    (letter,) = dead_letters(redis_url)
    assert letter["attempts"] == 1, "a permanent failure is not retried"
    assert "HTTP 410" in letter["error"] and "refused" in letter["error"]
    assert counter(redis_url, "dead") == 1


def test_an_event_id_that_cannot_be_a_header_is_dead_lettered_at_once(
    redis_url: str, consumers: Consumers, receiver: ReceiverProcess
) -> None:
    push(redis_url, [NewEvent(5, "a"), NewEvent(5, "b\r\nx-evil: 1"), NewEvent(5, "c")])
    wait_burst([consumers.start(burst=True, **delivering(receiver))], timeout=30)
    assert [line["headers"]["webhook-id"] for line in receiver.lines()] == ["a", "c"]
    (letter,) = dead_letters(redis_url)
    assert letter["attempts"] == 1 and "line break" in letter["error"]


def test_a_hanging_receiver_is_timed_out(
    redis_url: str, consumers: Consumers, receiver: ReceiverProcess
) -> None:
    receiver.control(hang=20, status=503, times=1)
    push(redis_url, [NewEvent(3, f"e{i}") for i in range(3)])
    env = delivering(receiver, delivery_timeout_seconds=1)
    started = time.monotonic()
    wait_burst([consumers.start(burst=True, **env)], timeout=20)
    assert time.monotonic() - started < 10
    assert delivered(receiver.lines())[3] == sorted(delivered(receiver.lines())[3])
    assert len(delivered(receiver.lines())[3]) == 3
    (timed_out,) = [a for a in attempts(consumers.event_log) if a.outcome == "nack"]
    assert timed_out.attempt == 1


def test_a_receiver_down_for_5_s_loses_nothing_and_is_resumed_within_a_second(
    redis_url: str, consumers: Consumers, receiver: ReceiverProcess
) -> None:
    push_workload(redis_url, 3000, 100)
    proc = consumers.start(concurrency=50, **delivering(receiver))
    wait_for(lambda: len(receiver.lines()) >= 300, 20, "deliveries before the outage")
    receiver.kill()
    time.sleep(5)
    before = len(receiver.lines())
    receiver.start()
    back = time.time_ns()
    wait_for(lambda: len(receiver.lines()) > before, 5, "deliveries after the outage")
    first_after_s = (receiver.lines()[before]["at_ns"] - back) / 1e9
    assert first_after_s < 1.0, first_after_s
    wait_settled(redis_url, 3000, 60)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert counter(redis_url, "dead") == 0, "an outage costs each account one attempt"
    # A request the receiver recorded as it was killed, unanswered, is delivered again.
    assert_each_once_in_order(receiver.lines(), 3000, again=50)
    nacks = [line for line in outcome_lines(consumers.event_log) if line["outcome"] == "nack"]
    assert nacks and all(line["delivery"] == "connection" for line in nacks)
    assert max(a.attempt for a in attempts(consumers.event_log)) <= 3


def test_a_killed_owner_s_delivery_comes_again_with_a_larger_token(
    redis_url: str, consumers: Consumers, receiver: ReceiverProcess
) -> None:
    receiver.control(hang=2, status=200, account=9, times=1)
    push(redis_url, [NewEvent(9, "only")])
    first = consumers.start(**delivering(receiver))
    wait_for(lambda: 9 in in_flight(redis_url), 20, "the event in flight")
    time.sleep(0.5)  # its POST is with the receiver, which hangs
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    consumers.start(**delivering(receiver))
    wait_settled(redis_url, 1, 30)
    stale, again = receiver.lines()
    assert stale["headers"]["webhook-id"] == again["headers"]["webhook-id"] == "only"
    assert (stale["attempt"], again["attempt"]) == (1, 2)
    assert again["token"] > stale["token"]
    # The stale owner's retry, should one arrive late, is refused by the token it carries.
    late = httpx.post(
        receiver.url + "/hooks/9",
        content=stale["body"],
        headers={**stale["headers"], "evq-account": "9", "evq-token": str(stale["token"])},
    )
    assert late.status_code == 409
