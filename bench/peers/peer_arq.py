"""arq: `python peer_arq.py enqueue W.json`; workers: `arq peer_arq.WorkerSettings`."""

import asyncio
import os
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings
from record import REDIS_URL, SLEEP_S, finish, jobs, started


async def handle(ctx: dict[str, Any], account: int, seq: int) -> None:
    began = started()
    if SLEEP_S:
        await asyncio.sleep(SLEEP_S)
    finish(account, seq, began)


class WorkerSettings:
    functions = [handle]  # noqa: RUF012 (arq reads class attributes)
    redis_settings = RedisSettings.from_dsn(REDIS_URL)
    max_jobs = int(os.environ.get("PEER_MAX_JOBS", "10"))
    keep_result = 0


async def enqueue() -> None:
    pool = await create_pool(RedisSettings.from_dsn(REDIS_URL))
    for account, seq in jobs():
        await pool.enqueue_job("handle", account, seq)
    await pool.aclose()


if __name__ == "__main__":
    asyncio.run(enqueue())
