"""The engine suite runs on fakeredis (with Lua), on a real redis-server and on a real
3-master Redis Cluster."""

from collections.abc import AsyncIterator, Callable

import fakeredis
import pytest

from app.engine import Nodes, Queue
from tests.support import settings

MakeQueue = Callable[..., Queue]


@pytest.fixture(params=["fakeredis", "redis-server", "cluster"])
async def make_queue(request: pytest.FixtureRequest) -> AsyncIterator[MakeQueue]:
    """Builds engines (with setting overrides) sharing one empty Redis of that kind."""
    if request.param == "fakeredis":
        url = "redis://fake"
        nodes = Nodes.wrap(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()), settings(url))
    else:
        url = request.getfixturevalue(
            "redis_url" if request.param == "redis-server" else "cluster_url"
        )
        nodes = Nodes(settings(url))
        await nodes.start()

    built: list[Queue] = []

    def build(**overrides: object) -> Queue:
        built.append(Queue(nodes, settings(url, **overrides)))
        return built[-1]

    yield build
    for queue in built:  # they share `nodes`: closing it twice is harmless
        await queue.aclose()
