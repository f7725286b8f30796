"""Structured logging: JSON lines, each one write() on an O_APPEND file shared by processes."""

import errno
import logging
import os
import sys
from pathlib import Path
from typing import BinaryIO, cast

import orjson
import structlog
from structlog.typing import FilteringBoundLogger


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
    """A logger that appends JSON lines with an ISO timestamp (microseconds) and the pid.

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
    return logger.bind(pid=os.getpid())
