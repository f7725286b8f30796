"""Reads that span shards: one pipelined round trip per master, all masters in parallel."""

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

if TYPE_CHECKING:
    from app.engine.queue import Queue

T = TypeVar("T")


async def each_shard(
    queue: "Queue", read: Callable[[Pipeline, int], object], shards: Iterable[int] | None = None
) -> list[list[Any]]:
    """Per shard (all of them by default), the replies of the commands `read(pipe, shard)`
    adds to its master's pipeline; one round trip per master, all in parallel."""
    wanted = list(range(queue.keys.shards) if shards is None else shards)
    by_node: dict[Redis, list[int]] = {}
    for shard in wanted:
        by_node.setdefault(queue.node(shard), []).append(shard)

    async def send(node: Redis, shards: list[int]) -> list[tuple[int, list[Any]]]:
        async with node.pipeline(transaction=False) as pipe:
            counts = []
            for shard in shards:
                before = len(pipe)
                read(pipe, shard)
                counts.append(len(pipe) - before)
            replies = await queue.timed(pipe.execute())
        out, at = [], 0
        for shard, count in zip(shards, counts, strict=True):
            out.append((shard, replies[at : at + count]))
            at += count
        return out

    answered = dict(
        pair
        for pairs in await every([send(node, shards) for node, shards in by_node.items()])
        for pair in pairs
    )
    return [answered[shard] for shard in wanted]


async def every(calls: Sequence[Awaitable[T]]) -> list[T]:
    """The results of all `calls`, run together; the first error once all have finished."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast(list[T], results)
