"""Building the Redis clients (`Nodes`), and what counts as a connection fault; nothing else
makes a client.

One Redis and a Redis Cluster look the same to the engine: `Nodes.for_hash_slot` names the
client of the master serving a hash slot. On a cluster, redis-py's asyncio `RedisCluster` keeps
the hash slot map (discovery, refresh after MOVED or a failover), and the engine talks to each
master through a plain client of its own: a per-shard MULTI and a pipeline of FCALLs
then go out on one connection of the owning node, in one round trip, with the same code as on
one Redis.
"""

import asyncio
import random
import re
import time
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.driver_info import DriverInfo
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ExecAbortError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.settings import Settings

T = TypeVar("T")

FIRST_PAUSE_S = 0.02  # before the first retry after a fault
LONGEST_PAUSE_S = 1.0
CLUSTER_SCHEME = "redis+cluster"
SECRET_PARAM = re.compile(r"((?:^|&)(?:ssl_)?password=)[^&]*", re.IGNORECASE)
REFRESH_EVERY_S = 0.1  # at most this often the hash slot map is read again after faults

# Faults of the connection or of the cluster's routing, not answers: the call may or may not
# have run (MOVED, ASK, TRYAGAIN, CLUSTERDOWN and READONLY during a failover or resharding:
# it did not). A full Redis (OOM) did not run it either: a script is refused at its first
# write that needs memory, and every script writes first something that frees it or needs
# it (ack's DEL of the in-flight event frees it, so acks go on and make room). Every
# transition is idempotent, so the caller sends the same call again.
TRANSIENT = (
    RedisConnectionError,
    RedisTimeoutError,
    TryAgainError,
    AskError,
    ClusterDownError,
    ReadOnlyError,
    ExecAbortError,
    OutOfMemoryError,
)
# TRANSIENT, and a cluster none of whose seeds answers: Redis cannot be reached now.
UNREACHABLE = (*TRANSIENT, RedisClusterException)


class _PackedInC:
    """Packs commands with hiredis, in C, as redis-py's sync client does; its asyncio client
    packs in Python, which cost the push two thirds of its client time (9 arguments per
    event) and a consumer a good share of its own."""

    def pack_command(self, *args: Any) -> list[bytes]:
        # As redis-py's: a first argument like "SCRIPT LOAD" is sent as separate words.
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]


_PACKED_IN_C: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _pool(pool: BlockingConnectionPool) -> BlockingConnectionPool:
    """`pool`, its connections (of whatever class the URL chose) packing in C."""
    plain = pool.connection_class
    if plain not in _PACKED_IN_C:
        _PACKED_IN_C[plain] = type(f"PackedInC{plain.__name__}", (_PackedInC, plain), {})
    pool.connection_class = _PACKED_IN_C[plain]
    return pool


class Nodes:
    """The masters of one Redis or of a Redis Cluster, and which one serves each hash slot.

    Each master's client has a pool that queues callers beyond `max_connections` instead of
    opening more. No call is sent again by a client itself: the caller knows whether that is
    safe (a push is, through its event ids; the consumer's slots resend within their leases).
    Connecting times out after `settings.socket_timeout_s`, and so does every reply, except on
    a `consumer`'s clients: there the engine puts one deadline on each round trip (`timed`).
    The pools share one DriverInfo: without it redis-py re-reads its package metadata for every
    new connection (about 3 ms each), which stalled a consumer opening hundreds at once.
    """

    def __init__(self, settings: Settings, max_connections: int = 64, consumer: bool = False):
        url = settings.redis_url
        self._options: dict[str, Any] = {
            "max_connections": max_connections,
            "driver_info": DriverInfo(),
            "retry": Retry(NoBackoff(), 0),
            "socket_connect_timeout": settings.socket_timeout_s,
            # None, not left out: redis-py's default is a 5 s timeout per reply.
            "socket_timeout": None if consumer else settings.socket_timeout_s,
        }
        if settings.redis_password is not None:  # the URL's own password, if any, wins
            self._options["password"] = settings.redis_password
        self._clients: dict[str, Redis] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._refreshed = 0.0
        self.cluster: RedisCluster | None = None
        if urlsplit(url).scheme != CLUSTER_SCHEME:
            self._single: Redis | None = Redis.from_pool(
                _pool(BlockingConnectionPool.from_url(url, **self._options))
            )
            return
        self._single = None
        seeds, auth = _cluster_seeds(url)
        if "password" in self._options:
            auth.setdefault("password", self._options["password"])
        self.cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in seeds],
            socket_connect_timeout=settings.socket_timeout_s,
            socket_timeout=settings.socket_timeout_s,
            **auth,
        )
        self._options.update(auth)  # the masters' own clients log in the same way

    @classmethod
    def wrap(cls, client: Redis, settings: Settings) -> "Nodes":
        """One Redis reached through a client built elsewhere (fakeredis in the tests)."""
        nodes = cls(settings)
        nodes._single = client
        return nodes

    async def start(self) -> None:
        """Learn the cluster's hash slot map (on one Redis: nothing to learn)."""
        if self.cluster is not None:
            await timed(self._options["socket_connect_timeout"] * 2, self.cluster.initialize())

    def for_hash_slot(self, hash_slot: int) -> Redis:
        """The client of the master serving `hash_slot`, as far as this process knows."""
        if self._single is not None:
            return self._single
        assert self.cluster is not None
        node = self.cluster.nodes_manager.get_node_from_slot(hash_slot)
        client = self._clients.get(node.name)
        if client is None:
            pool = BlockingConnectionPool(host=node.host, port=node.port, **self._options)
            client = self._clients[node.name] = Redis.from_pool(_pool(pool))
        return client

    def for_key(self, key: str) -> Redis:
        return self.for_hash_slot(key_slot(key.encode()))

    def masters(self) -> list[Redis]:
        """One client per master."""
        if self._single is not None:
            return [self._single]
        assert self.cluster is not None
        slots = self.cluster.nodes_manager.slots_cache
        firsts = {nodes[0].name: hash_slot for hash_slot, nodes in slots.items() if nodes}
        return [self.for_hash_slot(hash_slot) for hash_slot in firsts.values()]

    def noticed(self, fault: BaseException) -> None:
        """A call failed with `fault`: on a cluster, read the hash slot map again (in the
        background, at most every REFRESH_EVERY_S), as the hash slot may have moved or its
        master failed over."""
        if self.cluster is None or not isinstance(fault, TRANSIENT):
            return
        if self._refreshing is not None and not self._refreshing.done():
            return
        if time.monotonic() - self._refreshed < REFRESH_EVERY_S:
            return
        self._refreshed = time.monotonic()
        self._refreshing = asyncio.ensure_future(self._refresh())

    async def _refresh(self) -> None:
        assert self.cluster is not None
        try:
            await timed(
                self._options["socket_connect_timeout"] * 2, self.cluster.nodes_manager.initialize()
            )
        except Exception:  # the next fault asks again
            self._refreshed = time.monotonic()

    async def aclose(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        for client in [*self._clients.values(), *filter(None, [self._single])]:
            await client.aclose()
        if self.cluster is not None:
            await self.cluster.aclose()


def _cluster_seeds(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The seed nodes and credentials of `redis+cluster://[user:password@]host:port[,host:port]`."""
    parts = urlsplit(url)
    auth: dict[str, Any] = {}
    netloc = parts.netloc
    if "@" in netloc:
        credentials, netloc = netloc.rsplit("@", 1)
        user, _, password = credentials.partition(":")
        if user:
            auth["username"] = unquote(user)
        if password:
            auth["password"] = unquote(password)
    seeds = []
    for address in netloc.split(","):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{CLUSTER_SCHEME} URL needs host:port pairs, got {address!r}")
        seeds.append((host, int(port)))
    return seeds, auth


def masked(url: str) -> str:
    """`url` with every password replaced by `***` (`user:pass@`, and the query's `password`
    and `ssl_password`), for every message a person may read; a URL that does not parse is
    not shown at all."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a REDIS_URL that does not parse)"
    netloc = parts.netloc
    if "@" in netloc:
        credentials, hosts = netloc.rsplit("@", 1)
        user, has_password, _ = credentials.partition(":")
        netloc = f"{user}:***@{hosts}" if has_password else f"{user}@{hosts}"
    query = SECRET_PARAM.sub(r"\1***", parts.query)
    return parts._replace(netloc=netloc, query=query).geturl()


async def timed(seconds: float, round_trip: Awaitable[T]) -> T:
    """One round trip to Redis that must answer within `seconds`, else RedisTimeoutError.

    The engine's own deadline, one timer per round trip: redis-py's socket timeout arms one
    per reply read, about 5 us each, which a consumer would pay for every event.
    """
    try:
        async with asyncio.timeout(seconds):
            return await round_trip
    except TimeoutError as exc:
        raise RedisTimeoutError(f"Redis did not answer within {seconds:g} s") from exc


def backoff() -> Iterator[float]:
    """Pauses between tries after a fault: 20 ms doubling up to 1 s, each jittered by +-50% so
    that slots cut off together do not come back together."""
    pause = FIRST_PAUSE_S
    while True:
        yield pause * (0.5 + random.random())
        pause = min(pause * 2, LONGEST_PAUSE_S)
