"""The local stack of `make up`, `down`, `ps` and `demo`: a redis-server and a supervisord of
the project's own (NUMPROCS consumers and the API), their state under VAR; or, with CLUSTER=1,
the same on the local Redis Cluster of `make cluster-up`.

Every setting of the consumers and `gen` (CONCURRENCY, PROCESS_SECONDS, ...) passes through
from the environment, where `make demo PROCESS_SECONDS=0.2` puts it, and beats `.env`.
"""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from stack import REPO
from stack.servers import redis_binary

SUPERVISOR_CONF = REPO / "docker" / "supervisor" / "supervisord.conf"
STOP_WAIT_S = 60.0


@dataclass(frozen=True)
class Stack:
    """Where the local stack lives and what it runs, from the environment (make's variables)."""

    var: Path
    redis_port: int
    cluster: bool
    cluster_port: int
    numprocs: int
    api_port: int

    @classmethod
    def from_env(cls) -> "Stack":
        env = os.environ
        return cls(
            var=Path(env.get("VAR", "var")).resolve(),
            redis_port=int(env.get("REDIS_PORT", "6379")),
            cluster=env.get("CLUSTER") == "1",
            cluster_port=int(env.get("CLUSTER_PORT", "7000")),
            numprocs=int(env.get("NUMPROCS", "2")),
            api_port=int(env.get("API_PORT", "8000")),
        )

    @property
    def redis_url(self) -> str:
        if self.cluster:
            return f"redis+cluster://127.0.0.1:{self.cluster_port}"
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def env(self) -> dict[str, str]:
        """The environment of every process of the stack (the .venv's commands first)."""
        return {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "EVQ_VAR": str(self.var),
            "NUMPROCS": str(self.numprocs),
            "REDIS_URL": self.redis_url,
            "EVENT_LOG": str(self.var / "log" / "event.log"),
            "API_PORT": str(self.api_port),
        }

    def run(self, *args: str, quiet: bool = False) -> int:
        """Run a command of the stack's environment; its exit code."""
        out = subprocess.DEVNULL if quiet else None
        return subprocess.run(args, env=self.env, stdout=out, stderr=out, check=False).returncode

    def must(self, *args: str) -> None:
        """Run a command; exit with its code when it fails."""
        code = self.run(*args)
        if code:
            raise SystemExit(code)

    def ctl(self, *args: str, quiet: bool = False) -> int:
        return self.run("supervisorctl", "-c", str(SUPERVISOR_CONF), *args, quiet=quiet)

    def redis_answers(self) -> bool:
        return self.run("evq", "stats", quiet=True) == 0


def up(stack: Stack) -> None:
    """Start Redis (unless it answers, or CLUSTER=1) and supervisord, and wait until NUMPROCS
    consumers have sent a heartbeat."""
    for sub in ("redis", "log", "run"):
        (stack.var / sub).mkdir(parents=True, exist_ok=True)
    if stack.cluster:
        if not stack.redis_answers():
            raise SystemExit(
                f"no Redis Cluster answering on port {stack.cluster_port}: run 'make cluster-up'"
                " first"
            )
        print(f"redis: the cluster on port {stack.cluster_port}")
        (stack.var / "run" / "on-cluster").touch()
    elif stack.redis_answers():
        print(f"redis: already answering on port {stack.redis_port}")
    else:
        _start_redis(stack)
    if stack.ctl("pid", quiet=True) == 0:
        print("supervisord: already running (make down first to change NUMPROCS)")
    else:
        stack.must("supervisord", "-c", str(SUPERVISOR_CONF))
        print(
            f"supervisord: starting {stack.numprocs} consumers and the API on port"
            f" {stack.api_port}, logs in {stack.var / 'log'}"
        )
    stack.must("evq", "wait", "--consumers", str(stack.numprocs), "--timeout", "60")
    stack.ctl("status")


def _start_redis(stack: Stack) -> None:
    log = stack.var / "log" / "redis.log"
    stack.must(
        redis_binary(), "--port", str(stack.redis_port), "--bind", "127.0.0.1",
        "--dir", str(stack.var / "redis"), "--save", "", "--appendonly", "yes",
        "--maxmemory-policy", "noeviction", "--lazyfree-lazy-expire", "yes", "--daemonize", "yes",
        "--pidfile", str(stack.var / "run" / "redis.pid"), "--logfile", str(log),
    )  # fmt: skip
    deadline = time.monotonic() + 5
    while not stack.redis_answers():
        if time.monotonic() > deadline:
            raise SystemExit(f"redis did not start: see {log}")
        time.sleep(0.1)
    print(f"redis: started on port {stack.redis_port}, AOF in {stack.var / 'redis'}")


def down(stack: Stack) -> None:
    """Stop supervisord (each consumer drains its current events first), then our Redis."""
    pid = _pid(stack.var / "run" / "supervisord.pid")
    if pid is not None:
        stack.ctl("shutdown", quiet=True)
        _wait_gone(pid)
        print("supervisord: stopped (consumers drained their current events)")
    else:
        print("supervisord: not running")
    (stack.var / "run" / "on-cluster").unlink(missing_ok=True)
    if stack.cluster:
        print("redis: the cluster keeps running ('make cluster-down')")
        return
    pid = _pid(stack.var / "run" / "redis.pid")
    if pid is None:
        print("redis: not running (or not started by make up)")
        return
    os.kill(pid, signal.SIGTERM)
    _wait_gone(pid)
    print("redis: stopped")


def on_cluster(stack: Stack) -> bool:
    """Whether `make up CLUSTER=1` started the stack that runs now."""
    return (stack.var / "run" / "on-cluster").exists()


def ps(stack: Stack) -> None:
    """What supervisord runs, and the queue's counters when Redis answers."""
    stack.ctl("status")
    if stack.redis_answers():
        print(f"redis: up at {stack.redis_url}")
        stack.run("evq", "stats")
    else:
        print(f"redis: not answering at {stack.redis_url}")


def demo(stack: Stack) -> None:
    """The main job: 10,000 bursty events for 1,000 accounts through the running stack, the
    drain, then the report."""
    up(stack)
    stack.must("gen", "--events", "10000", "--accounts", "1000", "--seed", "1")
    stack.must("evq", "wait")
    stack.must("evq", "report", "--plot", str(stack.var / "report.png"))
    print("The stack is still running: 'make ps' shows it, 'make down' stops it.")


def _pid(pidfile: Path) -> int | None:
    """The pid in `pidfile` when that process runs."""
    try:
        pid = int(pidfile.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + STOP_WAIT_S
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise SystemExit(f"process {pid} did not stop within {STOP_WAIT_S:g} s")
