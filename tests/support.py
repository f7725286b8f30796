"""Test helpers shared by the suites: a real redis-server, consumer processes, handlers."""

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, cast

from app.engine import Event, Queue
from app.settings import Settings
from app.workload.report import Attempt, order_violations, read_log
from stack import REPO
from stack.servers import answers, free_port, wait_for


def settings(url: str, **overrides: object) -> Settings:
    """Test settings: no .env file, short timings."""
    values: dict[str, object] = {
        "redis_url": url,
        "concurrency": 4,
        "process_seconds": 0.0,
        "lease_seconds": 5.0,
        "reaper_seconds": 0.2,
        "claim_block_seconds": 0.1,
        "retry_backoff_seconds": 0.001,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


@dataclass
class Consumers:
    """Starts `evq consume` processes against one server and one event log."""

    url: str
    event_log: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, burst: bool = False, **env: object) -> subprocess.Popen[bytes]:
        values = {
            "REDIS_URL": self.url,
            "EVENT_LOG": str(self.event_log),
            "CONCURRENCY": "4",
            "PROCESS_SECONDS": "0",
            "LEASE_SECONDS": "5",
            "REAPER_SECONDS": "0.2",
            "CLAIM_BLOCK_SECONDS": "0.1",
            "RETRY_BACKOFF_SECONDS": "0.001",
            "PYTHONPATH": str(REPO),
        }
        values.update({k.upper(): str(v) for k, v in env.items()})
        args = [sys.executable, "-m", "app", "consume", *(["--burst"] if burst else [])]
        proc = subprocess.Popen(
            args, env={**os.environ, **values}, cwd=self.event_log.parent, stderr=subprocess.PIPE
        )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            proc.wait(timeout=10)
            if proc.stderr:
                proc.stderr.close()


class ApiProcess(NamedTuple):
    url: str  # base URL
    pid: int


@contextlib.contextmanager
def api_process(redis_url: str, log: Path | None = None, **env: str) -> Iterator[ApiProcess]:
    """`evq api` as a real process on a free port with `env`, once it answers; its output
    (the access log included) goes to `log` when given."""
    port = free_port()
    values = {**os.environ, "REDIS_URL": redis_url, "API_PORT": str(port), **env}
    values["PYTHONPATH"] = str(REPO)
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "api"], env=values, stdout=out, stderr=out
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers(f"{url}/healthz"), 20, "evq api to answer")
        yield ApiProcess(url, proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if log:
            out.close()


def failing_marked(settings: Settings) -> "object":
    """Handler factory for tests: fails every event whose payload says `poison`."""

    def handle(event: Event) -> None:
        if isinstance(event.payload, dict) and event.payload.get("poison"):
            raise ValueError(f"poison event {event.event_id}")

    return handle


def poisoned_until_fixed(settings: Settings) -> "object":
    """Handler factory for tests: sleeps PROCESS_SECONDS, and fails every event whose payload
    says `poison` until the file FIXED_MARKER names exists (an operator's fix deployed)."""
    fixed = Path(os.environ["FIXED_MARKER"])

    def handle(event: Event) -> None:
        time.sleep(settings.process_seconds)
        if isinstance(event.payload, dict) and event.payload.get("poison") and not fixed.exists():
            raise ValueError(f"poison event {event.event_id}")

    return handle


def hanging_marked(settings: Settings) -> "object":
    """Handler factory for tests: an async handler that never returns for events whose
    payload says `hang`."""

    async def handle(event: Event) -> None:
        if isinstance(event.payload, dict) and event.payload.get("hang"):
            await asyncio.sleep(3600)

    return handle


def hanging_marked_sync(settings: Settings) -> "object":
    """The same as a sync handler; it hangs 6 s (a thread cannot be cancelled, and the
    process waits for its threads when it exits)."""

    def handle(event: Event) -> None:
        if isinstance(event.payload, dict) and event.payload.get("hang"):
            time.sleep(6)

    return handle


def sleeping(settings: Settings) -> "object":
    """Handler factory for tests: a sync handler that sleeps PROCESS_SECONDS."""

    def handle(event: Event) -> None:
        time.sleep(settings.process_seconds)

    return handle


class Routed:
    """Redis commands sent to the master of their key's slot: `Routed(queue).llen(key)` on one
    Redis and on a cluster alike."""

    def __init__(self, queue: Queue) -> None:
        self._nodes = queue.nodes

    def __getattr__(self, command: str) -> Any:
        def send(key: str | bytes, *args: Any, **options: Any) -> Any:
            name = key.decode() if isinstance(key, bytes) else key
            return getattr(self._nodes.for_key(name), command)(key, *args, **options)

        return send


async def in_flight(queue: Queue, account: int) -> list[bytes]:
    """The bodies of the account's batch in flight: the head of its pending list, as many as
    its state's `size`."""
    count = int(await Routed(queue).hget(queue.keys.state(account), "size") or 0)
    if not count:
        return []
    return cast(list[bytes], await Routed(queue).lrange(queue.keys.pending(account), 0, count - 1))


async def all_keys(queue: Queue) -> list[bytes]:
    """Every key of every master."""
    found: list[bytes] = []
    for master in queue.nodes.masters():
        found += cast(list[bytes], await master.keys("*"))
    return sorted(found)


async def flush_scripts(queue: Queue) -> None:
    """What a restart without persistence does to the functions of every master."""
    for master in queue.nodes.masters():
        await master.function_flush()


async def ready_scores(queue: Queue) -> dict[int, float]:
    """Account -> score of every shard's ready index."""
    scores: dict[int, float] = {}
    for shard in range(queue.keys.shards):
        ready = queue.keys.ready(shard)
        for member, score in await Routed(queue).zrange(ready, 0, -1, withscores=True):
            scores[int(member)] = score
    return scores


async def server_clock_us(queue: Queue) -> int:
    """The Redis server's clock in microseconds (the floor of every seq and token)."""
    seconds, micros = await queue.nodes.masters()[0].time()
    return int(seconds) * 1_000_000 + int(micros)


async def snapshot(queue: Queue) -> dict[object, object]:
    """Every key with its value (not its TTL), to show that a call changed nothing."""
    found: dict[object, object] = {}
    redis = Routed(queue)
    for key in await all_keys(queue):
        kind = await redis.type(key)
        if kind == b"string":
            found[key] = await redis.get(key)
        elif kind == b"list":
            found[key] = await redis.lrange(key, 0, -1)
        elif kind == b"hash":
            found[key] = await redis.hgetall(key)
        elif kind == b"set":
            found[key] = await redis.smembers(key)
        else:
            found[key] = await redis.zrange(key, 0, -1, withscores=True)
    return found


class Unexpected(BaseException):
    """An error of a type no handler should raise (not even an Exception)."""


def raises_unexpected(settings: Settings) -> "object":
    """Handler factory for tests: the first attempt of an event whose payload says `odd`
    raises `Unexpected`; everything else sleeps PROCESS_SECONDS."""

    async def handle(event: Event) -> None:
        if isinstance(event.payload, dict) and event.payload.get("odd") and event.attempt == 1:
            raise Unexpected(f"unexpected failure of {event.event_id}")
        await asyncio.sleep(settings.process_seconds)

    return handle


def attempts(log: Path) -> list[Attempt]:
    """Every attempt the event log holds."""
    return read_log([log]).attempts


def assert_all_acked_once_in_order(log: Path, expected: int) -> list[Attempt]:
    """I1 and I2 from the log: every event acked exactly once, per-account order kept."""
    found = attempts(log)
    acked = collections.Counter((a.account, a.seq) for a in found if a.outcome == "ack")
    assert len(acked) == expected, f"{len(acked)} distinct events acked, expected {expected}"
    twice = [key for key, n in acked.items() if n > 1]
    assert not twice, f"acked more than once: {twice[:5]}"
    assert order_violations(found) == []
    return found
