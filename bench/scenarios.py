"""The scenarios: each runs evq as production does and returns one result cell."""

import asyncio
import base64
import collections
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson

from app.workload.client import pace
from app.workload.generator import longest_chain, lower_bound_s, workload
from app.workload.report import Attempt, order_violations, read_log
from bench import peer_runs
from bench.harness import SCRATCH, Bench, api_url_when_up
from stack.receiver import ReceiverProcess
from stack.servers import ConnectionKiller

PEER_EVENTS, PEER_ACCOUNTS = 10_000, 1_000
WRK_SCRIPT = Path(__file__).parent / "wrk" / "events.lua"
WINDOW = 5000  # unanswered events per WebSocket stream in the stream scenario
REPORTED = (
    *("events", "acked", "order_violations", "lost", "makespan_s", "lower_bound_s"),
    *("efficiency", "wait_p50_s", "wait_p99_s", "peak_concurrency", "longest_chain"),
)


def makespan(
    b: Bench, pattern: str, slots: int, order: str, process_s: float, kill_every_s: float = 0
) -> dict[str, Any]:
    """10,000 events over 1,000 accounts pushed into running consumers; the report of the run.

    With `kill_every_s`, every client connection is killed that often while they drain.
    """
    b.fresh()
    procs = b.consumers(slots, claim_order=order, process_seconds=process_s)
    b.evq("wait", f"--consumers={procs}", "--timeout=60")
    b.gen(10_000, 1_000, pattern, slots, process_seconds=process_s)
    cell: dict[str, Any] = {"pattern": pattern, "slots": slots, "claim_order": order}
    cell["process_s"] = process_s
    if kill_every_s:
        with ConnectionKiller(b.server.url, kill_every_s) as killer:
            b.evq("wait", "--timeout=900")
        cell |= {"kill_every_s": kill_every_s, "kill_rounds": killer.rounds}
        cell["connections_killed"] = killer.killed
    else:
        b.evq("wait", "--timeout=900")
    b.stop()
    report = b.report()
    return cell | {key: report[key] for key in REPORTED}


def redis_work(
    b: Bench, shards: int, events: int = 20_000, accounts: int = 2_000, slots: int = 512
) -> dict[str, Any]:
    """What Redis does per event with SHARDS=`shards`, for the push (`gen`) and the no-op
    drain apart: commands (INFO commandstats) and CPU microseconds of each master (INFO cpu),
    and the consumers' own CPU per event drained (less what they cost to start and stop).
    The drain twice: with batches as the consumer sizes them (`drain`), and one event at a
    time, as a slow handler gets them (`drain_k1`, BATCH_MAX=1), pushed again in between.
    Stable on a noisy machine, unlike rates: it decides how far a cluster scales."""
    b.fresh()
    # What consumers cost to start and stop, drained from an empty Redis: not per event.
    startup_s = b.drain(slots, process_seconds=0, shards=shards)
    cell: dict[str, Any] = {
        "masters": len(b.masters()),
        "shards": shards,
        "events": events,
        "events_per_account": events // accounts,
    }
    acked = violations = 0
    for phase, batch_max in (("drain", None), ("drain_k1", 1)):
        with b.work(events) as work:
            b.gen(events, accounts, "uniform", slots, shards=shards)
        if phase == "drain":
            cell["push_commands_per_event"] = work.commands_per_item
            cell["push_cpu_us_per_event_per_master"] = work.cpu_us_per_item_per_master
        limit = {} if batch_max is None else {"batch_max": batch_max}
        with b.work(events) as work:
            consumer_s = b.drain(slots, process_seconds=0, shards=shards, **limit)
        cell[f"{phase}_commands_per_event"] = work.commands_per_item
        cell[f"{phase}_cpu_us_per_event_per_master"] = work.cpu_us_per_item_per_master
        consumer_us = round((consumer_s - startup_s) / events * 1e6, 1)
        cell["consumer_cpu_us_per_event" + phase.removeprefix("drain")] = consumer_us
        report = b.report()
        acked, violations = acked + report["acked"], violations + report["order_violations"]
        b.log.unlink(missing_ok=True)
    return cell | {"acked": acked, "order_violations": violations}


def noop_drain(b: Bench, slots: int, events: int = 50_000, accounts: int = 5_000) -> dict[str, Any]:
    """A backlog drained by burst consumers whose handler returns at once; events per second."""
    attempts, _ = _evq_drained(b, "uniform", events, accounts, slots, 0)
    report = b.report()
    window_s = handling_window_s(attempts)
    return {
        "slots": slots,
        "events": events,
        "accounts": accounts,
        "acked": report["acked"],
        "order_violations": report["order_violations"],
        "lost": report["lost"],
        "drain_s": round(window_s, 3),
        "events_per_s": round(report["acked"] / window_s),
    }


def delivery(b: Bench, slots: int, receiver_s: float) -> dict[str, Any]:
    """HTTP delivery (HANDLER=app.handlers:http, signed) to `stack.receiver` taking
    `receiver_s` per request, 10,000 bursty events over 1,000 accounts.

    With a no-op receiver: the backlog queued first, then drained by burst consumers;
    deliveries per second and the consumers' CPU per delivery (less what they cost to start).
    Otherwise, as `makespan`: pushed into running consumers, the makespan against the bound
    `receiver_s x max(longest chain, ceil(N / W))`. Order is checked from the receiver's own
    record as well as from the event log."""
    b.fresh()
    record = SCRATCH / "received.jsonl"
    record.unlink(missing_ok=True)
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    receiver = ReceiverProcess(record, secrets=[secret], delay_s=receiver_s).start()
    url = receiver.url + "/hooks/{account_id}"
    http: dict[str, Any] = {"handler": "app.handlers:http", "delivery_url": url}
    http["delivery_secret"] = secret
    cell: dict[str, Any] = {"slots": slots, "receiver_s": receiver_s}
    try:
        if receiver_s:
            procs = b.consumers(slots, **http)
            b.evq("wait", f"--consumers={procs}", "--timeout=60")
            b.gen(PEER_EVENTS, PEER_ACCOUNTS, "bursty", slots, process_seconds=receiver_s)
            b.evq("wait", "--timeout=900")
            b.stop()
        else:
            startup_s = b.drain(slots, **http)
            b.gen(PEER_EVENTS, PEER_ACCOUNTS, "bursty", slots)
            consumer_s = b.drain(slots, **http)
            per = (consumer_s - startup_s) / PEER_EVENTS
            cell["consumer_cpu_us_per_delivery"] = round(per * 1e6, 1)
        lines = receiver.lines()
    finally:
        receiver.stop()
    report = b.report()
    cell["deliveries"] = len(lines)
    cell["receiver_order_violations"] = _out_of_order(lines)
    cell |= {key: report[key] for key in ("acked", "order_violations", "lost")}
    if receiver_s:
        cell |= {key: report[key] for key in ("makespan_s", "lower_bound_s", "efficiency")}
    else:
        window_s = handling_window_s(read_log([b.log]).attempts)
        cell["deliveries_per_s"] = round(report["acked"] / window_s)
    return cell


def _out_of_order(lines: list[dict[str, Any]]) -> int:
    """Deliveries the receiver accepted with a seq below one it had accepted for the account."""
    highest: dict[int, int] = {}
    late = 0
    for line in lines:
        if line["status"] == 200:
            if line["seq"] < highest.get(line["account"], 0):
                late += 1
            highest[line["account"]] = max(line["seq"], highest.get(line["account"], 0))
    return late


def handling_window_s(attempts: list[Attempt]) -> float:
    """From the first handler start to the last finish."""
    return (max(a.finished_ns for a in attempts) - min(a.started_ns for a in attempts)) / 1e9


def peers(b: Bench, system: str, slots: int = 100, sleep_s: float = 0.1) -> dict[str, Any]:
    """evq or a peer on the bursty 10,000-event workload, queued first and then drained: no-op
    jobs per second at stock 2-core settings with what Redis did per job for the push and the
    drain, and the makespan of `sleep_s` jobs at W=`slots` (first start to last finish)
    against the bound; order violations counted in both."""
    accounts = workload("bursty", PEER_EVENTS, PEER_ACCOUNTS, seed=1)
    bound = lower_bound_s(len(accounts), longest_chain(accounts), slots, sleep_s)
    if system == "evq":
        noop, cost = _evq_drained(b, "bursty", PEER_EVENTS, PEER_ACCOUNTS, 1_000, 0)
        sleeping, _ = _evq_drained(b, "bursty", PEER_EVENTS, PEER_ACCOUNTS, slots, sleep_s)
        settings = f"no-op: evq consume x 2, CONCURRENCY=500; W={slots}: x 1, CONCURRENCY={slots}"
    else:
        peer = next(p for p in peer_runs.PEERS if p.name == system)
        peer.install()
        noop, cost = peer_runs.run(b, peer, accounts, "noop", slots, 0)
        sleeping, _ = peer_runs.run(b, peer, accounts, "sleeping", slots, sleep_s)
        settings = peer.settings(slots)
    makespan_s = handling_window_s(sleeping) if sleeping else 0.0
    return {
        "system": system,
        "settings": settings,
        "noop_jobs_per_s": round(_done(noop) / handling_window_s(noop)) if noop else 0,
        "noop_violations": len(order_violations(noop)),
        "noop_lost": len(accounts) - _done(noop),
        **cost,
        "makespan_s": round(makespan_s, 2),
        "lower_bound_s": bound,
        "efficiency": round(bound / makespan_s, 3) if makespan_s else 0.0,
        "violations": len(order_violations(sleeping)),
        "lost": len(accounts) - _done(sleeping),
    }


def _evq_drained(
    b: Bench, pattern: str, events: int, accounts: int, slots: int, sleep_s: float
) -> tuple[list[Attempt], dict[str, float]]:
    """A backlog queued by `gen`, then drained by burst consumers; the attempts they logged,
    and Redis commands and CPU us per event of the push and of the drain (`Bench.work`)."""
    b.fresh()
    with b.work(events) as push:
        b.gen(events, accounts, pattern, slots, process_seconds=sleep_s)
    with b.work(events) as drain:
        b.drain(slots, process_seconds=sleep_s)
    return read_log([b.log], latest_run=True).attempts, peer_runs.costs(push, drain)


def _done(attempts: list[Attempt]) -> int:
    """Distinct events handled at least once."""
    return len({(a.account, a.seq) for a in attempts})


def push(b: Bench, events: int = 100_000, accounts: int = 10_000) -> dict[str, Any]:
    """`gen` straight into Redis, as fast as it goes."""
    b.fresh()
    rate = b.gen(events, accounts, "uniform", 1)
    return {"events": events, "accounts": accounts, "events_per_s": round(rate)}


def growth(b: Bench, events: int, accounts: int = 100_000) -> dict[str, Any]:
    """Redis memory per queued event, then the no-op drain rate and the consumer's peak RSS."""
    b.fresh()
    before = b.used_memory()
    b.gen(events, accounts, "uniform", 1024, process_seconds=0)
    per_event = (b.used_memory() - before) / events
    b.start("consume", concurrency=1024, process_seconds=0)
    started = time.monotonic()
    b.evq("wait", "--timeout=3600")
    drain_s = time.monotonic() - started
    rss_kib = _peak_rss_kib(b.procs[0].pid)
    b.stop()
    return {
        "events": events,
        "accounts": accounts,
        "redis_bytes_per_event": round(per_event, 1),
        "drain_s": round(drain_s, 2),
        "events_per_s": round(events / drain_s),
        "consumer_rss_mib": round(rss_kib / 1024, 1),
    }


def idle_memory(b: Bench, accounts: int = 10_000, idle_s: float = 5.0) -> dict[str, Any]:
    """Redis bytes each account still holds once its events are drained, then once it has been
    idle for ACCOUNT_IDLE_SECONDS (short here; a few days in production)."""
    settings = {"account_idle_seconds": idle_s, "dedupe_seconds": idle_s / 2}
    events = 5 * accounts
    touched = len(set(workload("bursty", events, accounts, 1)))
    # A smaller run first: Redis' script cache and its buffers sized by the largest call stay
    # after FLUSHALL, so what is left at the end is what the accounts left.
    b.gen(events // 10, accounts // 10, "bursty", 1024, process_seconds=0, **settings)
    b.drain(1024, process_seconds=0, **settings)
    b.fresh()
    before = b.used_memory()
    b.gen(events, accounts, "bursty", 1024, process_seconds=0, **settings)
    b.drain(1024, process_seconds=0, **settings)
    drained = b.used_memory()
    started = time.monotonic()
    while b.account_keys() and time.monotonic() - started < 120:
        time.sleep(0.5)
    forgotten_s = time.monotonic() - started
    time.sleep(2)  # a few server cron runs: emptied hash tables shrink
    return {
        "accounts": touched,
        "events": events,
        "account_idle_s": idle_s,
        "bytes_per_account_drained": round((drained - before) / touched, 1),
        "bytes_per_account_idle": round((b.used_memory() - before) / touched, 1),
        "account_keys_left": b.account_keys(),
        "forgotten_after_s": round(forgotten_s, 1),
    }


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def api(b: Bench, seconds: int = 10) -> dict[str, Any]:
    """Accepted events per second through POST /events and POST /events/batch, driven by wrk."""
    b.fresh()
    url = api_url_when_up(b)
    singles = _wrk(url, connections=32, seconds=seconds)
    batches = _wrk(url, connections=4, seconds=seconds, batch=True)
    accepted = json.loads(b.evq("stats"))["accepted"]
    b.stop()
    return {
        "single_connections": 32,
        "single_events_per_s": round(singles["requests_per_s"]),
        "single_mean_latency": singles["latency"],
        "batch_connections": 4,
        "batch_events_per_s": round(batches["requests_per_s"] * 1000),
        "batch_mean_latency": batches["latency"],
        "errors": singles["errors"] + batches["errors"],
        "accepted_in_redis": accepted,
    }


def _wrk(url: str, connections: int, seconds: int, batch: bool = False) -> dict[str, Any]:
    """Run wrk with bench/wrk/events.lua; requests per second, mean latency, latency p50 and
    p99 in ms, error count."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is missing: apt-get install wrk (make bench installs it as root)")
    args = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"]
    args += ["-s", str(WRK_SCRIPT), url, *(["--", "batch"] if batch else [])]
    out = subprocess.run(
        args,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    latency = re.search(r"Latency\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"(?:Non-2xx or 3xx responses|timeout) (\d+)", out))
    found = {"requests_per_s": rate, "latency": latency, "errors": errors}
    for pct in (50, 99):
        value, unit = re.search(rf"\b{pct}%\s+([\d.]+)(us|ms|s)\b", out).groups()  # type: ignore[union-attr]
        found[f"p{pct}_ms"] = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    return found


def stream(
    b: Bench, via: str, connections: int, frame: int = 1, rate: float = 0, seconds: int = 5
) -> dict[str, Any]:
    """Events per second into Redis and the latency from send to answer, through the API:
    `via` "single" or "batch" HTTP (wrk), or "ws": `connections` WebSocket streams sending
    `frame` events to a frame, as fast as the API takes them (or at `rate` events/s in all)."""
    b.fresh()
    url = api_url_when_up(b)
    cell: dict[str, Any] = {"via": via, "connections": connections, "frame": frame}
    if via == "ws":
        events = int(rate * seconds) if rate else 30_000 * seconds
        measured = asyncio.run(_stream_events(url, connections, frame, events, rate))
        cell |= {"rate": rate or "max", **measured}
    else:
        frame = 1000 if via == "batch" else 1
        cell |= {"frame": frame, "rate": "max"}
        found = _wrk(url, connections=connections, seconds=seconds, batch=via == "batch")
        cell["events"] = round(found["requests_per_s"] * frame * seconds)
        cell["events_per_s"] = round(found["requests_per_s"] * frame)
        cell |= {"ack_p50_ms": found["p50_ms"], "ack_p99_ms": found["p99_ms"]}
    cell["in_redis"] = json.loads(b.evq("stats"))["accepted"]
    b.stop()
    return cell


async def _stream_events(
    url: str, connections: int, frame: int, events: int, rate: float
) -> dict[str, Any]:
    """Send `events` over `connections` streams, at most WINDOW unanswered on each (the API's
    default WS_MAX_UNACKED); events/s from the first send to the last answer, and each
    event's time from its frame's send to its answer. The client is lean, like wrk for HTTP:
    frames built beforehand, answers counted, not parsed (`_Counted`)."""
    host, port = url.removeprefix("http://").split(":")
    per = events // connections
    framed: list[list[bytes]] = []
    for n in range(connections):
        framed.append([])
        for at in range(0, per, frame):
            items = [{"account_id": (n * per + i) % 10_000 + 1, "event_id": f"w{n}-{i}"}
                     for i in range(at, min(per, at + frame))]  # fmt: skip
            framed[n].append(_client_frame(orjson.dumps(items[0] if frame == 1 else items)))
    loop = asyncio.get_running_loop()
    streams = []
    for _ in range(connections):
        _, counted = await loop.create_connection(_Counted, host, int(port))
        await counted.upgrade(host, int(port))
        streams.append(counted)
    started = time.perf_counter()

    async def one(stream: "_Counted", frames: list[bytes]) -> None:
        for i, body in enumerate(frames):
            await stream.room()
            stream.sent.append((time.perf_counter(), min(frame, per - i * frame)))
            stream.unanswered += stream.sent[-1][1]
            stream.transport.write(body)
            await stream.drained()
            await pace(started, (i + 1) * frame * connections, rate)
        while stream.sent:
            stream.done.clear()
            await stream.done.wait()

    await asyncio.gather(*map(one, streams, framed))
    elapsed = time.perf_counter() - started
    latencies = sorted(x for stream in streams for x in stream.latencies)
    for stream in streams:
        stream.transport.close()
    return {
        "events": per * connections,
        "events_per_s": round(per * connections / elapsed),
        "ack_p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
        "ack_p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 2),
    }


def _client_frame(payload: bytes) -> bytes:
    """A masked text frame (RFC 6455) with an all-zero key, so the payload goes as it is."""
    size = len(payload)
    if size < 126:
        head = bytes((0x81, 0x80 | size))
    elif size < 1 << 16:
        head = bytes((0x81, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x81, 0x80 | 127)) + size.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


class _Counted(asyncio.Protocol):
    """A WebSocket client connection that counts the server's frames (one per event) and
    times each sent frame's events to the answer of its last one."""

    def __init__(self) -> None:
        self.sent: collections.deque[tuple[float, int]] = collections.deque()
        self.latencies: list[float] = []
        self.done = asyncio.Event()  # set whenever every frame sent so far is answered
        self._buffer = b""
        self._upgraded = asyncio.Event()
        self._answers_left = 0  # of the oldest sent frame
        self.unanswered = 0
        self._room = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    async def upgrade(self, host: str, port: int) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            f"GET /ws/events HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        await asyncio.wait_for(self._upgraded.wait(), 10)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def drained(self) -> None:
        await self._writable.wait()

    async def room(self) -> None:
        """Until fewer than WINDOW events wait for their answer."""
        while self.unanswered >= WINDOW:
            self._room.clear()
            await self._room.wait()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data
        if not self._upgraded.is_set():
            head, found, buffer = buffer.partition(b"\r\n\r\n")
            if not found:
                self._buffer = head
                return
            if not head.startswith(b"HTTP/1.1 101"):
                raise RuntimeError(f"handshake refused: {head[:80]!r}")
            self._upgraded.set()
        at = 0
        while len(buffer) - at >= 2:
            size, start = buffer[at + 1] & 0x7F, at + 2
            if size == 126:
                if len(buffer) - at < 4:
                    break
                size, start = int.from_bytes(buffer[at + 2 : at + 4], "big"), at + 4
            if len(buffer) < start + size:
                break
            at = start + size
            self._answered()
        self._buffer = buffer[at:]

    def _answered(self) -> None:
        if not self._answers_left:
            self._answers_left = self.sent[0][1]
        self._answers_left -= 1
        self.unanswered -= 1
        if self.unanswered < WINDOW:
            self._room.set()
        if not self._answers_left:
            sent_at, count = self.sent.popleft()
            self.latencies.extend([time.perf_counter() - sent_at] * count)
            if not self.sent:
                self.done.set()
