"""Loads `lua/` on each master as one library of Redis Functions and runs them by FCALL,
loading the library again when a master answers that a function is missing.

Functions are replicated and persisted with the data, so a promoted replica has them; a master
restarted without persistence, or one that joined the cluster since, answers "Function not
found", and the call runs again after a load on that node. The library's name carries a hash
of its source (and of ACCOUNT_IDLE_MS, which it embeds), so consumers of two versions can share
a master while one replaces the other."""

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.engine.connection import Nodes, timed
from app.engine.events import UnsafeRedis


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


def _text(name: str) -> str:
    return (resources.files("app.engine") / "lua" / f"{name}.lua").read_text()


LIB = _text("_lib")
BODIES = {name: _text(name) for name in NAMES}


def missing(reply: object) -> bool:
    """Whether a reply says the master lacks the function (restarted empty, newly joined)."""
    return isinstance(reply, ResponseError) and str(reply).startswith("Function not found")


class Scripts:
    """FCALL runner; a call whose function is missing loads the library and runs once more.

    `call` auto-pipelines: the calls made in one turn of the event loop go out together, one
    pipeline per master. A consumer's slots settle many events at once, and one round trip for
    all of them costs the client far less CPU than one round trip each.
    """

    def __init__(
        self, nodes: Nodes, timeout_s: float, account_idle_ms: int, replicas: int = 0
    ) -> None:
        code = f"local ACCOUNT_IDLE_MS = {account_idle_ms}\n{LIB}"
        version = hashlib.sha1((code + "".join(BODIES.values())).encode()).hexdigest()[:12]
        self.name = f"evq_{version}"
        self.functions = {name: f"{self.name}_{name}" for name in NAMES}
        self.library = "".join(
            [f"#!lua name={self.name}\n", code]
            + [
                f"\nredis.register_function('{self.functions[name]}', function(KEYS, ARGV)\n"
                f"{body}end)\n"
                for name, body in BODIES.items()
            ]
        )
        self._nodes = nodes
        self._timeout_s = timeout_s
        self._replicas = replicas
        self._wait_ms = max(1, round(timeout_s * 500))
        self._queued: list[Queued] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def ensure(self, client: Redis) -> None:
        """Load the library on one master unless it is there already (FUNCTION LIST only
        reads: a process that opens the queue writes nothing when the library is loaded).
        UnsafeRedis on a Redis older than 7.0."""
        try:
            listed = await timed(self._timeout_s, client.function_list(library=self.name))
        except ResponseError as exc:
            if "unknown command" not in str(exc).lower():
                raise
            where = client.connection_pool.connection_kwargs
            raise UnsafeRedis(
                f"Redis at {where.get('host', '?')}:{where.get('port', '?')} has no Redis"
                " Functions (FUNCTION LIST): evq needs Redis 7.0 or newer"
            ) from exc
        if not listed:
            await self.load(client)

    async def load(self, client: Redis) -> None:
        """Load the library on one master (replacing it: a load sent twice is harmless)."""
        await timed(self._timeout_s, client.function_load(self.library, replace=True))

    def queue(self, pipe: Pipeline, name: str, keys: Sequence[str | bytes], args: Args) -> None:
        """Add the call of one function to `pipe` (as a MULTI's command, say)."""
        pipe.fcall(self.functions[name], len(keys), *keys, *args)

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
        """Results in call order, errors as exception objects; calls of a missing function run
        again after a load."""
        results = await self._pipeline(client, calls)
        again = [i for i, r in enumerate(results) if missing(r)]
        if again:
            await self.load(client)
            retried = await self._pipeline(client, [calls[i] for i in again])
            for i, result in zip(again, retried, strict=True):
                results[i] = result
        return results

    async def _pipeline(self, client: Redis, calls: Sequence[Call]) -> list[Any]:
        def queue(pipe: Pipeline) -> None:
            for name, keys, args in calls:
                self.queue(pipe, name, keys, args)

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
