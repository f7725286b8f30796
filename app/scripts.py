"""Loads `lua/` once per client and runs the scripts by SHA, reloading after a Redis restart."""

import asyncio
import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from app.connection import timed

Args = Sequence[str | int | float | bytes]
Call = tuple[str, Sequence[str | bytes], Args]  # script name, KEYS, ARGV
NAMES = ("push", "take", "ack", "nack", "renew", "release", "reap")


def _source(name: str) -> str:
    lua = resources.files("app") / "lua"
    return (lua / "_lib.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


SOURCES = {name: _source(name) for name in NAMES}
# Redis names a script by the SHA1 of its source, so the names are known before any load.
SHAS = {name: hashlib.sha1(source.encode()).hexdigest() for name, source in SOURCES.items()}


class Scripts:
    """EVALSHA runner; every call reloads the scripts once on NOSCRIPT.

    `call` auto-pipelines: the calls made in one turn of the event loop go out together as one
    pipeline. A consumer's lanes settle many events at once, and one round trip for all of
    them costs the client far less CPU than one round trip each.
    """

    def __init__(self, redis: Redis, timeout_s: float) -> None:
        self._redis = redis
        self._timeout_s = timeout_s
        self._queued: list[tuple[Call, asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def load(self) -> None:
        """Register every script with the server (after a restart flushed them)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for source in SOURCES.values():
                pipe.script_load(source)
            await timed(self._timeout_s, pipe.execute())

    async def call(self, name: str, keys: Sequence[str | bytes], args: Args) -> Any:
        """Run one script (in the same round trip as the other calls of this loop turn)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queued.append(((name, keys, args), future))
        if len(self._queued) == 1:
            loop.call_soon(self._send_queued)
        return await future

    def _send_queued(self) -> None:
        queued, self._queued = self._queued, []
        task = asyncio.ensure_future(self._settle(queued))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _settle(self, queued: list[tuple[Call, asyncio.Future[Any]]]) -> None:
        try:
            results = await self._execute([call for call, _ in queued])
        except Exception as exc:  # the round trip failed: every caller gets the error
            results = [exc] * len(queued)
        for (_, future), result in zip(queued, results, strict=True):
            if future.done():  # the caller was cancelled meanwhile
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def batch(
        self, name: str, calls: Sequence[tuple[Sequence[str | bytes], Args]]
    ) -> list[Any]:
        """Run one script many times in one pipelined round trip; results in call order."""
        results = await self._execute([(name, keys, args) for keys, args in calls])
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    async def _execute(self, calls: Sequence[Call]) -> list[Any]:
        """Results in call order, errors as exception objects; NOSCRIPT ones run again."""
        results = await self._pipeline(calls)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            await self.load()
            retried = await self._pipeline([calls[i] for i in missing])
            for i, result in zip(missing, retried, strict=True):
                results[i] = result
        return results

    async def _pipeline(self, calls: Sequence[Call]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for name, keys, args in calls:
                pipe.evalsha(SHAS[name], len(keys), *keys, *args)
            return list(await timed(self._timeout_s, pipe.execute(raise_on_error=False)))
