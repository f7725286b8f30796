"""Fixtures: real redis-server processes, engine objects on them, consumer processes."""

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis as sync_redis
from redis.cluster import RedisCluster

from app.engine import Queue, open_queue
from stack.cluster import LocalCluster
from stack.servers import RedisServer, running
from tests.support import Consumers, settings


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The engine suite's runs on a real server are marked `server` (make check leaves them
    out); every test on the session's cluster is in one xdist group, so one worker starts it."""
    for item in items:
        backend = getattr(item, "callspec", None) and item.callspec.params.get("make_queue")
        if backend in ("redis-server", "cluster"):
            item.add_marker(pytest.mark.server)
        if backend == "cluster" or "cluster_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("session-cluster"))


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
    """A local Redis Cluster for the session (3 masters, 3 replicas); its first port."""
    local = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        local.start()
        yield local.base
    finally:
        local.stop()


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
