"""Throwaway servers and the waits around them: redis-server on a free port, free ports and
cluster port blocks, polling, and a connection killer for fault runs."""

import asyncio
import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import redis as sync_redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.engine import TRANSIENT, Queue, open_queue
from app.settings import Settings

T = TypeVar("T")
INSTALL_HINT = (
    "redis-server is not on PATH: install it with 'apt-get install redis-server' "
    "(make test does this when run as root)"
)
NODES = 6  # the local cluster: 3 masters and 3 replicas
BUS_OFFSET = 10_000  # Redis Cluster's bus listens on port + 10000


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_block(first: int = 21_000, last: int = 29_000) -> int:
    """A base port whose NODES ports and their bus ports are all free right now, reserved for
    this process until it exits: two test workers looking at once never pick the same block."""
    for base in range(first, last, NODES):
        lock = _reserved(base)
        if lock is None:
            continue
        ports = [base + i for i in range(NODES)] + [base + i + BUS_OFFSET for i in range(NODES)]
        try:
            for port in ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            os.close(lock)
            continue
        return base  # the lock stays open, and held, until this process exits
    raise RuntimeError("no free block of cluster ports")


def _reserved(base: int) -> int | None:
    """An exclusive lock on the block at `base` (a lock file in the temp dir), or None when a
    process holds it already, this one included. The lock goes with the process."""
    path = Path(tempfile.gettempdir()) / f"evq-cluster-block-{base}.lock"
    lock = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        return None
    return lock


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `condition()` until true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def answers(url: str) -> bool:
    """Whether a GET of `url` answers 200 (an API probe)."""
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _asking_once(port: int, password: str | None) -> sync_redis.Redis:
    """A client on `port` with no retries: redis-py's default backs off for about a second
    before it says no."""
    return sync_redis.Redis(
        port=port, password=password, socket_timeout=1, retry=Retry(NoBackoff(), 0)
    )


def serving_pid(port: int, password: str | None = None) -> int | None:
    """The process id of the Redis that answers on `port`, or None if none answers."""
    client = _asking_once(port, password)
    try:
        return int(client.info("server")["process_id"])
    except sync_redis.RedisError:
        return None
    finally:
        client.close()


def pings(port: int, password: str | None = None) -> bool:
    """Whether a Redis on `port` answers PING (not while it loads its data)."""
    client = _asking_once(port, password)
    try:
        return bool(client.ping())
    except (sync_redis.ConnectionError, sync_redis.BusyLoadingError, sync_redis.TimeoutError):
        return False
    finally:
        client.close()


def redis_binary() -> str:
    """The redis-server on PATH, or a RuntimeError that says how to install one."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(INSTALL_HINT)
    return binary


@dataclass
class RedisServer:
    """A throwaway redis-server on a free port, with its own data dir."""

    data_dir: Path
    appendonly: bool = False
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    options: tuple[str, ...] = ()  # more redis-server options
    password: str | None = None
    _started: bool = field(default=False, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers. A first start whose port was taken since
        `free_port` looked (by another test worker's server, say) moves to another free port;
        a restart keeps its port, which its clients know."""
        first = not self._started
        for _ in range(5 if first else 1):
            if self._launch():
                self._started = True
                return
            if first:
                self.port = free_port()
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def _launch(self) -> bool:
        """Run redis-server on `self.port`; whether it is the one that answers there."""
        binary = redis_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--dir", str(self.data_dir), "--appendonly", "yes" if self.appendonly else "no"]
        args += ["--appendfsync", "always"] if self.appendonly else []
        args += ["--maxmemory-policy", "noeviction", "--lazyfree-lazy-expire", "yes", *self.options]
        args += ["--requirepass", self.password] if self.password else []
        process = self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        with contextlib.suppress(AssertionError):  # not up within 10 s: judged below
            wait_for(
                lambda: process.poll() is not None or pings(self.port, self.password),
                10,
                f"redis-server on {self.port}",
            )
        if process.poll() is None and serving_pid(self.port, self.password) == process.pid:
            return True
        self.stop()
        return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@contextlib.contextmanager
def running(server: RedisServer) -> Iterator[RedisServer]:
    """Start `server` for the duration of the block."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


def engine(settings: Settings, use: Callable[[Queue], Awaitable[T]]) -> T:
    """`use(queue)` on an engine of its own, on one Redis or a cluster alike; rides out what
    tests and benchmarks do to Redis (a pause, a failover) for up to 10 s."""

    async def main() -> T:
        async with open_queue(settings) as queue:
            return await use(queue)

    for _ in range(50):
        try:
            return asyncio.run(main())
        except TRANSIENT:
            time.sleep(0.2)
    return asyncio.run(main())


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
