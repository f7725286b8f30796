"""What every scenario needs: a throwaway redis-server, evq processes, gen, and the report."""

import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis as sync_redis

from stack import REPO
from stack.cluster import LocalCluster
from stack.servers import RedisServer, answers, free_port, wait_for

BIN = REPO / ".venv" / "bin"
SCRATCH = REPO / "bench" / "scratch"
RESULTS = REPO / "bench" / "results"


class Bench:
    """One redis-server (or a local cluster) and an event log in bench/scratch; starts evq
    processes against them."""

    def __init__(self, server: RedisServer | LocalCluster, name: str) -> None:
        self.server = server
        self.log = SCRATCH / f"{name}.log"
        self.procs: list[subprocess.Popen[bytes]] = []

    def env(self, **settings: object) -> dict[str, str]:
        """The process environment: production defaults plus `settings` (upper-cased)."""
        env = {**os.environ, "REDIS_URL": self.server.url, "EVENT_LOG": str(self.log)}
        env.update({k.upper(): str(v) for k, v in settings.items()})
        return env

    def masters(self) -> list[sync_redis.Redis]:
        """A client of each master (the one server, or each master of the cluster)."""
        if isinstance(self.server, LocalCluster):
            return self.server.masters()
        return [sync_redis.Redis.from_url(self.server.url)]

    def fresh(self) -> None:
        """Empty Redis and the event log before a cell."""
        for client in self.masters():
            client.flushall()
            client.close()
        self.log.unlink(missing_ok=True)

    def start(self, *args: str, **settings: object) -> subprocess.Popen[bytes]:
        """Start `evq <args>` in the background."""
        proc = subprocess.Popen(
            [str(BIN / "evq"), *args],
            env=self.env(**settings),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        return proc

    def consumers(self, slots: int, burst: bool = False, **settings: object) -> int:
        """Start consumers for `slots` in total: one process up to 100 slots, else two."""
        procs = 1 if slots <= 100 else 2
        for _ in range(procs):
            self.start(
                "consume", *(["--burst"] if burst else []), concurrency=slots // procs, **settings
            )
        return procs

    def drain(self, slots: int, **settings: object) -> float:
        """Drain what Redis holds with burst consumers for `slots`; returns when they exit,
        with the CPU seconds (user and system) they used."""
        self.consumers(slots, burst=True, **settings)
        cpu_s = 0.0
        for proc in self.procs:
            _, _, usage = os.wait4(proc.pid, 0)
            proc.returncode = 0
            cpu_s += usage.ru_utime + usage.ru_stime
        self.procs.clear()
        return cpu_s

    def evq(self, *args: str, **settings: object) -> str:
        """Run `evq <args>` to completion; its stdout."""
        done = subprocess.run(
            [str(BIN / "evq"), *args],
            env=self.env(**settings),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode not in (0, 1):
            raise RuntimeError(f"evq {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def gen(
        self, events: int, accounts: int, pattern: str, slots: int, **settings: object
    ) -> float:
        """Push a workload with `gen`; the push rate it reported, in events per second."""
        out = self.evq(
            "gen",
            f"--events={events}",
            f"--accounts={accounts}",
            f"--pattern={pattern}",
            "--seed=1",
            f"--slots={slots}",
            **settings,
        )
        found = re.search(r"([\d,]+) events/s", out)
        if found is None:
            raise RuntimeError(f"gen printed no rate: {out}")
        return float(found.group(1).replace(",", ""))

    def report(self) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self.evq("report", str(self.log), "--json"))
        return found

    def stop(self) -> None:
        """SIGTERM every process started here and wait for it."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def used_memory(self) -> int:
        """Redis' used_memory, less its slow log (up to 128 recent slow commands with their
        arguments, a fixed cost that would count as data)."""
        client = sync_redis.Redis.from_url(self.server.url)
        client.slowlog_reset()
        used = int(client.info("memory")["used_memory"])
        client.close()
        return used

    def work(self, items: int) -> "RedisWork":
        """What Redis does for `items` events or jobs between `start` and `stop`."""
        return RedisWork(self, items)

    def account_keys(self) -> int:
        """How many keys of accounts (`{<ns>:<shard>}:<kind>:<account>...`) the server holds."""
        client = sync_redis.Redis.from_url(self.server.url)
        count = sum(1 for _ in client.scan_iter(match="{*}:*:*", count=1000))
        client.close()
        return count


class RedisWork:
    """Redis commands (INFO commandstats, scripts' own calls included) and CPU microseconds
    (INFO cpu) of each master per item, from `start` to `stop`; a context manager too.
    Unlike rates, they hold still on a noisy machine."""

    def __init__(self, running: Bench, items: int) -> None:
        self._bench = running
        self._items = items
        self._masters: list[sync_redis.Redis] = []
        self._before: list[float] = []
        self.commands_per_item = 0.0
        self.cpu_us_per_item_per_master: list[float] = []

    def start(self) -> "RedisWork":
        self._masters = self._bench.masters()
        for client in self._masters:
            client.config_resetstat()
        self._before = [_cpu_s(client) for client in self._masters]
        return self

    def stop(self) -> None:
        used = [_cpu_s(c) - start for c, start in zip(self._masters, self._before, strict=True)]
        calls = sum(
            stat["calls"]
            for client in self._masters
            for stat in client.info("commandstats").values()
        )
        self.commands_per_item = round(calls / self._items, 2)
        self.cpu_us_per_item_per_master = [round(u / self._items * 1e6, 1) for u in used]
        for client in self._masters:
            client.close()

    def __enter__(self) -> "RedisWork":
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def _cpu_s(client: sync_redis.Redis) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


@contextlib.contextmanager
def bench(name: str, cluster: bool = False) -> Iterator[Bench]:
    """A Bench on its own redis-server (or local cluster); every process and the server stop
    at the end."""
    SCRATCH.mkdir(parents=True, exist_ok=True)
    server: RedisServer | LocalCluster
    server = (
        LocalCluster(SCRATCH / "cluster") if cluster else RedisServer(SCRATCH / f"redis-{name}")
    )
    server.start()
    running = Bench(server, name)
    try:
        yield running
    finally:
        running.stop()
        server.stop()


def api_url_when_up(running: Bench, **settings: object) -> str:
    """Start `evq api` on a free port and wait until it answers."""
    port = free_port()
    running.start("api", api_port=port, **settings)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: answers(f"{url}/readyz"), 30, "evq api")
    return url


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "redis": version.split("v=")[1].split()[0] if "v=" in version else version.strip(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write(name: str, cells: list[dict[str, Any]], **extra: Any) -> Path:
    """bench/results/<name>.json: the machine, the cells and any extra figures."""
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"scenario": name, "machine": machine(), **extra, "cells": cells}, indent=1)
        + "\n"
    )
    return path
