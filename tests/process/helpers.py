"""Helpers of the process-level tests: push, inspect Redis, read and check the event log."""

import signal
from collections.abc import Awaitable, Callable, Sequence
from subprocess import Popen
from typing import Any, TypeVar, cast

from app.engine import NewEvent, PushResult, Queue, inspect, registry
from app.engine.dead import dead_letters as dead_letter_page
from app.workload.generator import workload
from stack import servers
from stack.servers import wait_for
from tests.support import in_flight as batch_in_flight
from tests.support import settings

T = TypeVar("T")


def engine(url: str, use: Callable[[Queue], Awaitable[T]]) -> T:
    """`use(queue)` on an engine of its own with test settings (`stack.servers.engine`)."""
    return servers.engine(settings(url), use)


def push(url: str, events: Sequence[NewEvent]) -> list[PushResult]:
    """Queue events through the engine, as the generator does."""
    return engine(url, lambda queue: queue.push_many(events))


def push_workload(url: str, events: int, accounts: int, seed: int = 1) -> list[NewEvent]:
    """Queue a bursty workload; returns what was pushed."""
    plan = [
        NewEvent(a, f"e{i}", {"i": i})
        for i, a in enumerate(workload("bursty", events, accounts, seed))
    ]
    push(url, plan)
    return plan


def counter(url: str, name: str) -> int:
    """A counter of `Queue.stats`, summed over the shards."""
    return engine(url, inspect.stats)[name]


async def _pending(queue: Queue) -> dict[int, list[bytes]]:
    """account -> the bodies of its pending list (the batch in flight at its head), on every
    master."""
    found: dict[int, list[bytes]] = {}
    for master in queue.nodes.masters():
        async for key in master.scan_iter(match="{evq:*}:user:*"):
            found[int(key.rsplit(b":", 1)[1])] = cast(list[bytes], await master.lrange(key, 0, -1))
    return found


def held(url: str) -> int:
    """How many events Redis holds pending or in flight."""

    async def count(queue: Queue) -> int:
        return sum(len(bodies) for bodies in (await _pending(queue)).values())

    return engine(url, count)


def dead_letters(url: str) -> list[dict[str, Any]]:
    """Every shard's dead letters."""
    return engine(url, dead_letter_page)[1]


def live_consumers(url: str) -> int:
    """How many consumer processes sent a heartbeat within a minute."""
    return len(engine(url, lambda queue: registry.live_consumers(queue, 60)))


def wait_started(url: str, procs: Sequence[Popen[bytes]], timeout: float = 30) -> None:
    """Wait until each running consumer has sent its first heartbeat (so it handles SIGTERM)."""

    def started() -> bool:
        pids = {
            member.split(":")[1] for member in engine(url, lambda q: registry.live_consumers(q, 60))
        }
        return all(str(p.pid) in pids for p in procs if p.poll() is None)

    wait_for(started, timeout, "every consumer's first heartbeat")


def seq_of(body: bytes) -> int:
    """The seq of a stored event body (the push script writes it first)."""
    return int(body.split(b'"seq":')[1].split(b",")[0])


def in_flight(url: str) -> dict[int, int]:
    """account -> seq of the first event of every batch in flight."""

    async def first(queue: Queue) -> dict[int, int]:
        found = {}
        for account in await _pending(queue):
            if flying := await batch_in_flight(queue, account):
                found[account] = seq_of(flying[0])
        return found

    return engine(url, first)


def graceful_stop(procs: Sequence[Popen[bytes]], timeout: float = 15) -> None:
    """SIGTERM every consumer and require a clean exit 0."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        assert proc.wait(timeout=timeout) == 0, proc.stderr.read() if proc.stderr else ""


def wait_burst(procs: Sequence[Popen[bytes]], timeout: float = 60) -> None:
    """Wait for burst-mode consumers to drain and exit 0."""
    for proc in procs:
        assert proc.wait(timeout=timeout) == 0, proc.stderr.read() if proc.stderr else ""


def wait_settled(url: str, total: int, timeout: float) -> None:
    wait_for(
        lambda: counter(url, "acked") + counter(url, "dead") >= total,
        timeout,
        f"{total} events acked or dead",
    )
