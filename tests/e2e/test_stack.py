"""The real local stack: make up (Redis, supervisord, 2 consumers, API), gen, report, down."""

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from stack import REPO
from stack.servers import free_port, wait_for

NUMPROCS = 2
ENV = {"CONCURRENCY": "50", "PROCESS_SECONDS": "0.2", "LEASE_SECONDS": "5"}


class Stack:
    """`make` targets of the local stack with their state in a temporary VAR and port."""

    def __init__(self, var: Path) -> None:
        self.var = var
        self.port = free_port()
        self.api = f"http://127.0.0.1:{free_port()}"
        self.env = {
            **os.environ,
            **ENV,
            "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}",
            "REDIS_URL": f"redis://127.0.0.1:{self.port}/0",
            "EVQ_VAR": str(var),
            "EVENT_LOG": str(var / "log" / "event.log"),
            "API_PORT": self.api.rsplit(":", 1)[1],
        }

    def make(self, target: str) -> str:
        return self.run(
            "make",
            "-s",
            "-C",
            str(REPO),
            target,
            f"VAR={self.var}",
            f"REDIS_PORT={self.port}",
            f"NUMPROCS={NUMPROCS}",
        )

    def run(self, *args: str) -> str:
        """Run a command with the stack's environment; its stdout, or fail with its output."""
        done = subprocess.run(
            args, env=self.env, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def pid(self, name: str) -> int:
        return int((self.var / "run" / f"{name}.pid").read_text())


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """A started stack, always taken down again."""
    running = Stack(tmp_path / "var")
    running.make("up")
    try:
        yield running
    finally:
        running.make("down")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def api_up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("via", ["redis", "api"])
def test_stack_drains_a_bursty_run_in_order_near_the_bound(stack: Stack, via: str) -> None:
    """1,000 bursty events for 100 accounts: no violation, nothing lost, efficiency above 0.8."""
    wait_for(lambda: api_up(stack.api), 20, "the API")
    stack.run(
        "gen",
        "--events",
        "1000",
        "--accounts",
        "100",
        "--seed",
        "7",
        "--via",
        via,
        "--api-url",
        stack.api,
    )
    stack.run("evq", "wait", "--timeout", "60")
    report = json.loads(stack.run("evq", "report", "--json"))
    assert report["events"] == 1000
    assert report["acked"] == 1000
    assert report["order_violations"] == 0
    assert report["lost"] == 0
    assert report["efficiency"] > 0.8, report
    lines = (stack.var / "log" / "event.log").read_text().splitlines()
    pids = {json.loads(line)["pid"] for line in lines}
    assert len(pids) >= NUMPROCS  # both consumers handled events (plus gen's own lines)


def test_up_is_idempotent_and_down_stops_everything(stack: Stack) -> None:
    """A second `make up` starts nothing new; `make down` ends supervisord, consumers and Redis."""
    supervisord, redis = stack.pid("supervisord"), stack.pid("redis")
    assert "already" in stack.make("up")
    assert (stack.pid("supervisord"), stack.pid("redis")) == (supervisord, redis)
    status = [line for line in stack.make("ps").splitlines() if "RUNNING" in line]
    assert len(status) == NUMPROCS + 1  # the consumers and the API
    pids = [int(line.split("pid ")[1].split(",")[0]) for line in status]
    stack.make("down")
    assert not any(alive(pid) for pid in [supervisord, redis, *pids])
