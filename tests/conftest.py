"""Fixtures: real redis-server processes, engine objects on them, consumer processes."""

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis as sync_redis
from redis.cluster import RedisCluster

from app.engine import Queue, open_queue
from tests.support import Consumers, RedisServer, free_block, make, running, settings


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session (flushed before each test that uses it)."""
    try:
        with running(RedisServer(tmp_path_factory.mktemp("redis"))) as server:
            yield server
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def cluster_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A local Redis Cluster for the session (make cluster-up: 3 masters, 3 replicas); its
    first port."""
    var, base = tmp_path_factory.mktemp("cluster"), free_block()
    try:
        make("cluster-up", var, base)
        yield base
    finally:
        make("cluster-down", var, base)


@pytest.fixture
def cluster_url(cluster_server: int) -> str:
    """The session cluster's URL, every master emptied for this test."""
    client = RedisCluster(host="127.0.0.1", port=cluster_server)
    client.flushall(target_nodes=RedisCluster.PRIMARIES)
    client.close()
    return f"redis+cluster://127.0.0.1:{cluster_server}"


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
    async with open_queue(settings(redis_url)) as queue:
        yield queue


@pytest.fixture
def consumers(redis_url: str, tmp_path: Path) -> Iterator[Consumers]:
    """Consumer processes on the real server, all killed at the end of the test."""
    group = Consumers(redis_url, tmp_path / "event.log")
    yield group
    group.stop_all()
