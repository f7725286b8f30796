"""Fixtures: real redis-server processes, engine objects on them, consumer processes."""

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis as sync_redis
from redis.asyncio import Redis

from app.queue import Queue
from tests.support import Consumers, RedisServer, running, settings


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session (flushed before each test that uses it)."""
    try:
        with running(RedisServer(tmp_path_factory.mktemp("redis"))) as server:
            yield server
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, emptied for this test."""
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
async def queue(redis_url: str) -> AsyncIterator[Queue]:
    """An engine on the real server with test settings."""
    client = Redis.from_url(redis_url)
    yield Queue(client, settings(redis_url))
    await client.aclose()


@pytest.fixture
def consumers(redis_url: str, tmp_path: Path) -> Iterator[Consumers]:
    """Consumer processes on the real server, all killed at the end of the test."""
    group = Consumers(redis_url, tmp_path / "event.log")
    yield group
    group.stop_all()
