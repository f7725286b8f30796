"""Structured logging: JSON lines, each one write() on an O_APPEND file shared by processes."""

import logging
import os
from pathlib import Path

import orjson
import structlog
from structlog.typing import FilteringBoundLogger


def configure(path: Path) -> FilteringBoundLogger:
    """A logger that appends JSON lines with an ISO timestamp (microseconds) and the pid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sink = path.open("ab", buffering=0)
    logger: FilteringBoundLogger = structlog.wrap_logger(
        structlog.BytesLogger(sink),
        processors=[
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=True,
    )
    return logger.bind(pid=os.getpid())
