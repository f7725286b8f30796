"""What every `evq` command shares: settings or a usage error, and an event loop whose Redis
and API faults end in a clear message and an exit status, never a traceback."""

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import typer
import uvloop
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.engine import LayoutMismatch, UnsafeRedis
from app.engine.connection import masked
from app.settings import Settings
from app.workload.client import ApiError

T = TypeVar("T")


def settings_or_exit() -> Settings:
    """The settings; exit 2 saying what is wrong with them."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            ": ".join(
                filter(
                    None,
                    (".".join(map(str, e["loc"])).upper(), e["msg"].removeprefix("Value error, ")),
                )
            )
            for e in exc.errors()
        )
        typer.echo(f"evq: bad configuration: {problems}", err=True)
        raise typer.Exit(2) from exc


def run(coro: Coroutine[Any, Any, T], settings: Settings) -> T:
    """Run `coro` on uvloop; a Redis or API fault exits 1 (2 for a wrong setup) with a message."""
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    except (RedisConnectionError, RedisClusterException) as exc:
        typer.echo(f"evq: cannot reach Redis at {masked(settings.redis_url)}: {exc}", err=True)
        raise typer.Exit(1) from exc
    except OutOfMemoryError as exc:
        typer.echo(
            f"evq: Redis at {masked(settings.redis_url)} is full (maxmemory): {exc}. Let the"
            " consumers drain, then run it again: events already queued are duplicates then",
            err=True,
        )
        raise typer.Exit(1) from exc
    except RedisTimeoutError as exc:
        typer.echo(f"evq: Redis at {masked(settings.redis_url)} did not answer: {exc}", err=True)
        raise typer.Exit(1) from exc
    except ResponseError as exc:  # a database out of range, a command the server refuses
        typer.echo(f"evq: Redis at {masked(settings.redis_url)} refused: {exc}", err=True)
        raise typer.Exit(1) from exc
    except (LayoutMismatch, UnsafeRedis) as exc:
        typer.echo(f"evq: {exc}", err=True)
        raise typer.Exit(2) from exc
    except OSError as exc:
        if exc.filename is None:
            raise
        typer.echo(f"evq: cannot write {exc.filename}: {exc.strerror}", err=True)
        raise typer.Exit(2) from exc
    except ApiError as exc:
        typer.echo(f"evq: {exc}", err=True)
        raise typer.Exit(1) from exc
