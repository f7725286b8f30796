"""Structured logging: JSON lines, each one write() on an O_APPEND file shared by processes."""

import asyncio
import errno
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, cast

import orjson
import structlog
from structlog.typing import FilteringBoundLogger

from app.connection import backoff


class AppendFile:
    """The log file opened O_APPEND: a line is one write(), so lines of many processes never
    interleave. A failed or short write raises OSError."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, line: bytes) -> None:
        written = os.write(self._fd, line)
        if written != len(line):
            raise OSError(errno.EIO, f"short write: {written} of {len(line)} bytes")

    def flush(self) -> None:
        """Nothing is buffered."""


class OrStderr(AppendFile):
    """The log file for diagnostics: a line that cannot be written there goes to stderr, which
    supervisord keeps, instead of raising."""

    def write(self, line: bytes) -> None:
        try:
            super().write(line)
        except OSError:
            sys.stderr.buffer.write(line)
            sys.stderr.flush()


def configure(path: Path, fallback: bool = False) -> FilteringBoundLogger:
    """A logger that appends JSON lines with an ISO timestamp (microseconds), the host and the
    pid (consumers on many hosts each write their own log; the report merges them).

    Its writes raise OSError when the file cannot take them, unless `fallback` sends those
    lines to stderr instead.
    """
    sink = OrStderr(path) if fallback else AppendFile(path)
    logger: FilteringBoundLogger = structlog.wrap_logger(
        structlog.BytesLogger(cast(BinaryIO, sink)),  # it only calls write() and flush()
        processors=[
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=True,
    )
    return logger.bind(host=socket.gethostname(), pid=os.getpid())


class EventLog:
    """The event log of a consumer: one JSON line per handled attempt.

    A line the file refuses (disk full, EIO) is written again with backoff for `patience_s`;
    meanwhile `diagnostics` say so. After that the whole line goes to `diagnostics` (stderr,
    when the file takes nothing) and the OSError is raised.
    """

    def __init__(self, path: Path, diagnostics: FilteringBoundLogger, patience_s: float) -> None:
        self._lines = configure(path)
        self._diagnostics = diagnostics
        self._patience_s = patience_s

    async def write(self, name: str, **fields: Any) -> None:
        """Append the line `name` with `fields`."""
        try:
            self._lines.info(name, **fields)
        except OSError as exc:
            await self._write_again(name, fields, exc)

    async def _write_again(self, name: str, fields: dict[str, Any], exc: OSError) -> None:
        deadline = time.monotonic() + self._patience_s
        for pause in backoff():
            self._diagnostics.error(
                "event_log_write_failed",
                account=fields.get("account"),
                seq=fields.get("seq"),
                error=str(exc),
            )
            await asyncio.sleep(pause)
            try:
                self._lines.info(name, **fields)
                return
            except OSError as again:
                if time.monotonic() > deadline:
                    self._diagnostics.error("event_log_line_lost", logged_as=name, **fields)
                    raise
                exc = again
