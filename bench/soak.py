"""The soak: events stream in through the API for a long while, with random faults, and
nothing may be lost, handled twice or out of order, and memory must stay flat.

python -m bench.soak                 30 minutes (make soak)
python -m bench.soak --minutes 3     a short one
python -m bench.soak --minutes 5 --process-seconds 0.002 --concurrency 2 --rate 1500
                                     backlogs drained in batches of up to 50 events

Two consumer processes (restarted like supervisord restarts them) and `evq api` run against a
redis-server of their own. A pusher posts batches to `POST /events/batch` at `--rate` events/s
over 1,000 accounts and sends a batch again, the same event ids, until it is answered. Every
20 to 40 s one fault, in turn: a consumer killed -9 (restarted after 1 s), a consumer stopped
past its lease (SIGSTOP, SIGCONT), every Redis connection killed, Redis stopped for 3 s, the
API killed -9 (restarted). Every 5 s: backlog, Redis memory and keys, the processes' memory.
At the end it drains, checks the event log (rotated on the way) against what the pusher got
accepted, as `evq report` does (an attempt whose outcome line a kill cut off counts from its
settling line and Redis), and writes bench/results/soak.json and docs/soak.png.
"""

import argparse
import asyncio
import collections
import contextlib
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis as sync_redis

from app.engine import NewEvent, inspect
from app.log import rotated
from app.settings import Settings
from app.workload.client import ApiClient, ApiError
from app.workload.report import order_violations, read_log, resolve
from bench.harness import Bench, api_url_when_up, bench, write
from stack import REPO, servers

SETTINGS: dict[str, object] = {
    "concurrency": 50,
    "process_seconds": 0.05,
    "lease_seconds": 5,
    "dedupe_seconds": 120,
    "account_idle_seconds": 300,
    "event_log_max_bytes": 16 * 1024 * 1024,
    "event_log_keep": 1000,
}
ACCOUNTS = 1_000
FAULTS = ("kill9", "stall", "connections", "redis_pause", "api_kill")
PNG = REPO / "docs" / "soak.png"


class Stack:
    """The processes under test, and what it takes to fault and restart them."""

    def __init__(self, b: Bench) -> None:
        self.b = b
        self.consumers = [self._consumer() for _ in range(2)]
        self.api_url = api_url_when_up(b, **SETTINGS)
        self.api = b.procs[-1]
        self.redis_pid = b.server.process.pid  # type: ignore[union-attr]

    def _consumer(self) -> subprocess.Popen[bytes]:
        return self.b.start("consume", **SETTINGS)

    def fault(self, kind: str, rng: random.Random) -> None:
        if kind == "kill9":
            i = rng.randrange(len(self.consumers))
            self.consumers[i].kill()
            self.consumers[i].wait()
            time.sleep(1)
            self.consumers[i] = self._consumer()
        elif kind == "stall":
            victim = rng.choice(self.consumers)
            victim.send_signal(signal.SIGSTOP)
            time.sleep(float(SETTINGS["lease_seconds"]) + 2)  # type: ignore[arg-type]
            victim.send_signal(signal.SIGCONT)
        elif kind == "connections":
            client = sync_redis.Redis.from_url(self.b.server.url)
            client.client_kill_filter(_type="normal", skipme=True)
            client.close()
        elif kind == "redis_pause":
            os.kill(self.redis_pid, signal.SIGSTOP)
            time.sleep(3)
            os.kill(self.redis_pid, signal.SIGCONT)
        else:
            self.api.kill()
            self.api.wait()
            time.sleep(1)
            self.api_url = api_url_when_up(self.b, **SETTINGS)
            self.api = self.b.procs[-1]

    def rss_mib(self) -> dict[str, float]:
        return {
            "consumers_rss_mib": sum(_rss_mib(p.pid) for p in self.consumers),
            "api_rss_mib": _rss_mib(self.api.pid),
        }


def _rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


class Pusher(threading.Thread):
    """Pushes batches through `gen --via api`'s client at `rate` events/s; a batch that fails
    is sent again, the same event ids, until it is answered."""

    def __init__(self, stack: Stack, rate: float, seed: int) -> None:
        super().__init__(daemon=True)
        self.stack, self.rate, self.rng = stack, rate, random.Random(seed)
        self.stop = threading.Event()
        self.sent: dict[str, int] = {}  # event id -> account, once answered
        self.duplicates = self.retries = 0

    def run(self) -> None:
        asyncio.run(self._push())

    async def _push(self) -> None:
        started = time.monotonic()
        while not self.stop.is_set():
            await asyncio.sleep(0.1)
            n = len(self.sent)
            due = int(self.rate * (time.monotonic() - started)) - n
            events = [
                NewEvent(self.rng.randint(1, ACCOUNTS), f"s{i}", {"i": i})
                for i in range(n, n + due)
            ]
            for start in range(0, len(events), 500):
                await self._send(events[start : start + 500])

    async def _send(self, events: list[NewEvent]) -> None:
        while True:
            async with httpx.AsyncClient(base_url=self.stack.api_url, timeout=10) as http:
                with contextlib.suppress(ApiError):
                    results = await ApiClient(http).push_many(events)
                    self.duplicates += sum(not r.queued for r in results)
                    self.sent.update((e.event_id, e.account) for e in events)
                    return
            self.retries += 1
            await asyncio.sleep(0.2)


def sample(b: Bench) -> dict[str, Any]:
    """The counters summed over the shards, Redis' memory and its number of keys."""
    counts = servers.engine(Settings(_env_file=None, redis_url=b.server.url), inspect.stats)
    client = sync_redis.Redis.from_url(b.server.url)
    keys = int(client.dbsize())
    client.close()
    return {
        **{name: counts[name] for name in ("accepted", "acked", "dead")},
        "redis_used_mib": round(b.used_memory() / 2**20, 2),
        "redis_keys": keys,
    }


def soak(minutes: float, rate: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    samples: list[dict[str, Any]] = []
    faults: list[tuple[float, str]] = []
    with bench("soak") as b:
        b.fresh()
        stack = Stack(b)
        pusher = Pusher(stack, rate, seed)
        started = time.monotonic()
        pusher.start()
        next_fault = started + rng.uniform(20, 40)
        next_sample = started
        while (now := time.monotonic()) < started + minutes * 60:
            if now >= next_sample:
                taken = sample(b)
                backlog = taken["accepted"] - taken["acked"] - taken["dead"]
                samples.append(
                    {"t_s": round(now - started, 1), "backlog": backlog, **taken} | stack.rss_mib()
                )
                next_sample += 5
            if now >= next_fault:
                kind = FAULTS[len(faults) % len(FAULTS)]
                faults.append((round(now - started, 1), kind))
                stack.fault(kind, rng)
                next_fault = time.monotonic() + rng.uniform(20, 40)
            time.sleep(0.2)
        pusher.stop.set()
        pusher.join()
        drain_started = time.monotonic()
        while True:
            final = sample(b)
            if final["acked"] + final["dead"] >= final["accepted"]:
                break
            if time.monotonic() - drain_started > 600:
                raise RuntimeError(f"not drained after 600 s: {final}")
            time.sleep(1)
        b.stop()
        logged = read_log(rotated(b.log))
        settings = Settings(_env_file=None, redis_url=b.server.url)
        proof = servers.engine(
            settings,
            lambda queue: resolve(logged, lambda a, e, s: inspect.event_state(queue, a, e, s)),
        )
        attempts = proof.attempts
    settled = {a.event_id for a in attempts if a.outcome in ("ack", "dead")}
    acked = collections.Counter((a.account, a.seq) for a in attempts if a.outcome == "ack")
    warm = [s for s in samples if s["t_s"] >= 300] or samples
    return {
        "minutes": minutes,
        "rate_per_s": rate,
        "settings": SETTINGS,
        "faults": dict(collections.Counter(kind for _, kind in faults)),
        "events_sent": len(pusher.sent),
        "push_retries": pusher.retries,
        "duplicates_on_retry": pusher.duplicates,
        "redis_accepted": final["accepted"],
        "redis_acked": final["acked"],
        "redis_dead": final["dead"],
        "log_files": len(rotated(b.log)),
        "logged_settled": len(settled),
        "resolved_from_redis": proof.resolved,
        "missing_from_log": len(set(pusher.sent) - settled),
        "acked_twice": sum(n > 1 for n in acked.values()),
        "order_violations": len(order_violations(attempts)),
        "redis_used_mib_after_5_min": [
            min(s["redis_used_mib"] for s in warm),
            max(s["redis_used_mib"] for s in warm),
        ],
        "redis_keys_after_5_min": [
            min(s["redis_keys"] for s in warm),
            max(s["redis_keys"] for s in warm),
        ],
        "consumers_rss_mib_after_5_min": [
            min(s["consumers_rss_mib"] for s in warm),
            max(s["consumers_rss_mib"] for s in warm),
        ],
        "max_backlog": max(s["backlog"] for s in samples),
        "fault_log": faults,
        "samples": samples,
    }


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    samples = result["samples"]
    t = [s["t_s"] / 60 for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    axes[0].plot(t, [s["backlog"] for s in samples])
    axes[0].set_ylabel("backlog (events)")
    axes[1].plot(t, [s["redis_used_mib"] for s in samples], label="Redis used_memory")
    axes[1].plot(t, [s["consumers_rss_mib"] for s in samples], label="2 consumers, RSS")
    axes[1].plot(t, [s["api_rss_mib"] for s in samples], label="API, RSS")
    axes[1].set_ylabel("MiB")
    axes[1].legend(loc="upper left", fontsize=8)
    axes[2].plot(t, [s["redis_keys"] for s in samples])
    axes[2].set_ylabel("Redis keys")
    axes[2].set_xlabel("minutes")
    for ax in axes:
        for at, _ in result["fault_log"]:
            ax.axvline(at / 60, color="grey", alpha=0.3, linewidth=0.8)
    fig.suptitle(
        f"soak: {result['rate_per_s']:g} events/s through the API for {result['minutes']:g} min,"
        f" a fault every 20-40 s (grey)"
    )
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate", type=float, default=200, help="events per second")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--process-seconds", type=float, default=0.05, help="the reference handler's time"
    )
    parser.add_argument("--concurrency", type=int, default=50, help="slots per consumer")
    args = parser.parse_args()
    SETTINGS["process_seconds"] = args.process_seconds
    SETTINGS["concurrency"] = args.concurrency
    result = soak(args.minutes, args.rate, args.seed)
    plot(result, PNG)
    path = write("soak", [result])
    summary = {k: v for k, v in result.items() if k not in ("samples", "fault_log")}
    print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    print(f"wrote {path} and {PNG}")


if __name__ == "__main__":
    main()
