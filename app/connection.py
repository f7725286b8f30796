"""Building the Redis client, and what counts as a connection fault; nothing else makes one."""

import asyncio
import random
from collections.abc import Awaitable, Iterator
from typing import TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import TryAgainError

from app.settings import Settings

T = TypeVar("T")

FIRST_PAUSE_S = 0.02  # before the first retry after a fault
LONGEST_PAUSE_S = 1.0

# Faults of the connection, not answers: the call may or may not have run. Every transition
# is idempotent, so the caller sends the same call again.
TRANSIENT = (RedisConnectionError, RedisTimeoutError, TryAgainError)


def connect(settings: Settings, max_connections: int = 64, consumer: bool = False) -> Redis:
    """A client whose pool queues callers beyond `max_connections` instead of opening more.

    No call is sent again by the client itself: the caller knows whether that is safe (a push
    is, through its event ids; the consumer's slots resend within their leases). Connecting
    times out after `settings.socket_timeout_s`, and so does every reply, except on the
    `consumer`'s client: there the engine puts one deadline on each round trip instead (`timed`).
    The pool shares one DriverInfo: without it redis-py re-reads its package metadata for every
    new connection (about 3 ms each), which stalled a consumer opening hundreds at once.
    """
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=max_connections,
        driver_info=DriverInfo(),
        retry=Retry(NoBackoff(), 0),
        socket_connect_timeout=settings.socket_timeout_s,
        # None, not left out: redis-py's default is a 5 s timeout per reply.
        socket_timeout=None if consumer else settings.socket_timeout_s,
    )
    return Redis.from_pool(pool)


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
