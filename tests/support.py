"""Test helpers shared by the suites: a real redis-server, consumer processes, handlers."""

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, cast

import httpx
import redis as sync_redis

from app.engine import Event, Queue
from app.settings import Settings

REPO = Path(__file__).resolve().parent.parent
INSTALL_HINT = (
    "redis-server is not on PATH: install it with 'apt-get install redis-server' "
    "(make test does this when run as root)"
)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class RedisServer:
    """A throwaway redis-server on a free port, with its own data dir."""

    data_dir: Path
    appendonly: bool = False
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    options: tuple[str, ...] = ()  # more redis-server options
    password: str | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(INSTALL_HINT)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--dir", str(self.data_dir), "--appendonly", "yes" if self.appendonly else "no"]
        args += ["--appendfsync", "always"] if self.appendonly else []
        args += ["--maxmemory-policy", "noeviction", *self.options]
        args += ["--requirepass", self.password] if self.password else []
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        client = sync_redis.Redis(port=self.port, password=self.password)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(sync_redis.ConnectionError, sync_redis.BusyLoadingError):
                if client.ping():
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


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


NODES = 6
BUS_OFFSET = 10_000  # Redis Cluster's bus listens on port + 10000


def free_block(first: int = 21_000, last: int = 29_000) -> int:
    """A base port whose NODES ports and their bus ports are all free right now."""
    for base in range(first, last, NODES):
        ports = [base + i for i in range(NODES)] + [base + i + BUS_OFFSET for i in range(NODES)]
        try:
            for port in ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free block of cluster ports")


def make(target: str, var: Path, base: int) -> str:
    """Run a cluster target of the Makefile on VAR and CLUSTER_PORT; its output."""
    done = subprocess.run(
        ["make", "-s", "-C", str(REPO), target, f"VAR={var}", f"CLUSTER_PORT={base}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


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
def api_process(redis_url: str, **env: str) -> Iterator[ApiProcess]:
    """`evq api` as a real process on a free port with `env`, once it answers."""
    port = free_port()
    values = {**os.environ, "REDIS_URL": redis_url, "API_PORT": str(port), **env}
    values["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "api"], env=values, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers(f"{url}/healthz"), 20, "evq api to answer")
        yield ApiProcess(url, proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def answers(url: str) -> bool:
    """Whether a GET of `url` answers 200 (an API probe)."""
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(condition: "object", timeout: float, what: str) -> None:
    """Poll `condition()` until true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


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


async def all_keys(queue: Queue) -> list[bytes]:
    """Every key of every master."""
    found: list[bytes] = []
    for master in queue.nodes.masters():
        found += cast(list[bytes], await master.keys("*"))
    return sorted(found)


async def flush_scripts(queue: Queue) -> None:
    """What a restart or a failover does to the script cache of every master."""
    for master in queue.nodes.masters():
        await master.script_flush()


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


class ConnectionKiller:
    """Kills every normal client connection (the consumer's, not its own) every `period_s`."""

    def __init__(self, url: str, period_s: float) -> None:
        self._client = sync_redis.Redis.from_url(url)
        self._period_s = period_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.rounds = 0
        self.killed = 0

    def __enter__(self) -> "ConnectionKiller":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self._client.close()

    def _run(self) -> None:
        while not self._done.wait(self._period_s):
            self.killed += int(self._client.client_kill_filter(_type="normal"))
            self.rounds += 1


@contextlib.contextmanager
def running(server: RedisServer) -> Iterator[RedisServer]:
    """Start `server` for the duration of the block."""
    server.start()
    try:
        yield server
    finally:
        server.stop()
