"""The engine suite runs once on fakeredis (with Lua) and once on the real redis-server."""

from collections.abc import AsyncIterator, Callable

import fakeredis
import pytest
from redis.asyncio import Redis

from app.queue import Queue
from app.settings import Settings
from tests.support import settings

MakeQueue = Callable[..., Queue]


@pytest.fixture(params=["fakeredis", "redis-server"])
async def make_queue(request: pytest.FixtureRequest) -> AsyncIterator[MakeQueue]:
    """Builds engines (with setting overrides) sharing one empty Redis of either kind."""
    if request.param == "fakeredis":
        client: Redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        url = "redis://fake"
    else:
        url = request.getfixturevalue("redis_url")
        client = Redis.from_url(url)

    def build(**overrides: object) -> Queue:
        config: Settings = settings(url, **overrides)
        return Queue(client, config)

    yield build
    await client.aclose()
