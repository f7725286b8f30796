"""Loads `lua/` once per client and runs the scripts by SHA, reloading after a Redis restart."""

from collections.abc import Sequence
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

Args = Sequence[str | int | float | bytes]
NAMES = ("push", "take", "ack", "nack", "renew", "release", "reap")


def _source(name: str) -> str:
    lua = resources.files("app") / "lua"
    return (lua / "_lib.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


SOURCES = {name: _source(name) for name in NAMES}


class Scripts:
    """EVALSHA runner: one call or a pipelined batch, each reloading once on NOSCRIPT."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._sha: dict[str, str] = {}

    async def load(self) -> None:
        """Register every script with the server (again after a restart flushed them)."""
        for name, source in SOURCES.items():
            self._sha[name] = await self._redis.script_load(source)

    async def call(self, name: str, keys: Sequence[str], args: Args) -> Any:
        """Run one script."""
        if not self._sha:
            await self.load()
        try:
            return await self._redis.evalsha(self._sha[name], len(keys), *keys, *args)
        except NoScriptError:
            await self.load()
            return await self._redis.evalsha(self._sha[name], len(keys), *keys, *args)

    async def batch(
        self, name: str, calls: Sequence[tuple[Sequence[str], Args]], atomic: bool = False
    ) -> list[Any]:
        """Run one script many times in one pipelined round trip; results in call order.

        `atomic`: inside MULTI/EXEC, so a connection lost mid-batch applies none of it.
        """
        if not self._sha:
            await self.load()
        results = await self._pipeline(name, calls, atomic)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            await self.load()
            retried = await self._pipeline(name, [calls[i] for i in missing], atomic)
            for i, result in zip(missing, retried, strict=True):
                results[i] = result
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    async def _pipeline(
        self, name: str, calls: Sequence[tuple[Sequence[str], Args]], atomic: bool
    ) -> list[Any]:
        sha = self._sha[name]
        async with self._redis.pipeline(transaction=atomic) as pipe:
            for keys, args in calls:
                pipe.evalsha(sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))
