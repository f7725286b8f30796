"""Loads `lua/` on each master and runs the scripts by SHA, reloading after NOSCRIPT.

A master's script cache is its own: a restarted Redis or a promoted replica answers NOSCRIPT,
and the call runs again after a load on that node."""

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.engine.connection import Nodes, timed


class NotReplicated(RedisTimeoutError):
    """Fewer replicas than REPLICA_ACKS acknowledged a round trip's writes in time."""


Args = Sequence[str | int | float | bytes]
Call = tuple[str, Sequence[str | bytes], Args]  # script name, KEYS, ARGV
Queued = tuple[Redis, Call, "asyncio.Future[Any]"]
NAMES = (
    "push",
    "take",
    "settle",
    "renew",
    "release",
    "reap",
    "pause",
    "resume",
    "dead",
    "dead_move",
    "attempt_move",
    "forget_pause",
)


def _source(name: str) -> str:
    lua = resources.files("app.engine") / "lua"
    return (lua / "_lib.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


LIBRARY = {name: _source(name) for name in NAMES}


class Scripts:
    """EVALSHA runner; every call reloads the scripts once on NOSCRIPT.

    `call` auto-pipelines: the calls made in one turn of the event loop go out together, one
    pipeline per master. A consumer's slots settle many events at once, and one round trip for
    all of them costs the client far less CPU than one round trip each.
    """

    def __init__(
        self, nodes: Nodes, timeout_s: float, account_idle_ms: int, replicas: int = 0
    ) -> None:
        settings = f"local ACCOUNT_IDLE_MS = {account_idle_ms}\n"
        self._sources = {name: settings + source for name, source in LIBRARY.items()}
        # Redis names a script by the SHA1 of its source, so the names are known before a load.
        self.shas = {n: hashlib.sha1(s.encode()).hexdigest() for n, s in self._sources.items()}
        self._nodes = nodes
        self._timeout_s = timeout_s
        self._replicas = replicas
        self._wait_ms = max(1, round(timeout_s * 500))
        self._queued: list[Queued] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def load(self, client: Redis) -> None:
        """Register every script with one master (after a restart or failover flushed them)."""
        async with client.pipeline(transaction=False) as pipe:
            for source in self._sources.values():
                pipe.script_load(source)
            await timed(self._timeout_s, pipe.execute())

    async def call(self, client: Redis, name: str, keys: Sequence[str | bytes], args: Args) -> Any:
        """Run one script on `client`'s master (in the same round trip as the other calls to
        that master of this loop turn)."""
        return await self.submit(client, name, keys, args)

    def submit(
        self, client: Redis, name: str, keys: Sequence[str | bytes], args: Args
    ) -> "asyncio.Future[Any]":
        """`call` without the coroutine: the call is queued now, the future gets its reply
        (or the fault)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queued.append((client, (name, keys, args), future))
        if len(self._queued) == 1:
            loop.call_soon(self._send_queued)
        return future

    def _send_queued(self) -> None:
        queued, self._queued = self._queued, []
        by_node: dict[Redis, list[Queued]] = {}
        for item in queued:
            by_node.setdefault(item[0], []).append(item)
        for client, items in by_node.items():
            task = asyncio.ensure_future(self._answer(client, items))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _answer(self, client: Redis, queued: list[Queued]) -> None:
        """Send one master's queued calls and hand each caller its reply (or the fault)."""
        try:
            results = await self._execute(client, [call for _, call, _ in queued])
        except Exception as exc:  # the round trip failed: every caller gets the error
            results = [exc] * len(queued)
        for (_, _, future), result in zip(queued, results, strict=True):
            if future.done():  # the caller was cancelled meanwhile
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def batch(
        self, client: Redis, name: str, calls: Sequence[tuple[Sequence[str | bytes], Args]]
    ) -> list[Any]:
        """Run one script many times on one master in one pipelined round trip; results in
        call order."""
        results = await self._execute(client, [(name, keys, args) for keys, args in calls])
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    async def _execute(self, client: Redis, calls: Sequence[Call]) -> list[Any]:
        """Results in call order, errors as exception objects; NOSCRIPT ones run again."""
        results = await self._pipeline(client, calls)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            await self.load(client)
            retried = await self._pipeline(client, [calls[i] for i in missing])
            for i, result in zip(missing, retried, strict=True):
                results[i] = result
        return results

    async def _pipeline(self, client: Redis, calls: Sequence[Call]) -> list[Any]:
        def queue(pipe: Pipeline) -> None:
            for name, keys, args in calls:
                pipe.evalsha(self.shas[name], len(keys), *keys, *args)

        return await self.send(client, queue)

    async def send(self, client: Redis, queue: Callable[[Pipeline], object]) -> list[Any]:
        """One pipelined round trip of the commands `queue(pipe)` adds, on one connection;
        replies in order, errors as exception objects. With REPLICA_ACKS=N a WAIT follows on the
        same connection, and unless N replicas have the writes within half the Redis timeout
        the whole round trip fails with `NotReplicated` (a fault: callers send it again). Faults,
        raised or replied, are told to `Nodes.noticed` (a cluster's slot may have moved)."""
        try:
            async with client.pipeline(transaction=False) as pipe:
                queue(pipe)
                if self._replicas:
                    pipe.execute_command("WAIT", self._replicas, self._wait_ms)
                replies = list(await timed(self._timeout_s, pipe.execute(raise_on_error=False)))
            if self._replicas:
                copies = replies.pop()
                if isinstance(copies, Exception) or int(copies) < self._replicas:
                    raise NotReplicated(
                        f"the writes reached {copies} of {self._replicas} replicas"
                        f" within {self._wait_ms} ms"
                    )
        except Exception as exc:
            self._nodes.noticed(exc)
            raise
        for reply in replies:
            if isinstance(reply, Exception):
                self._nodes.noticed(reply)
        return replies
