"""Structured logging: JSON lines, each one write() on an O_APPEND file shared by processes."""

import asyncio
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, cast

import orjson
import structlog
from structlog.typing import FilteringBoundLogger

from app.engine.connection import backoff
from app.settings import Settings


class AppendFile:
    """The log file opened O_APPEND: a line is never split over two write()s, so lines of many
    processes never interleave. A failed or short write raises OSError.

    With `max_bytes`, the file is rotated when it has grown past it: `<log>` becomes
    `<log>.1`, `<log>.1` becomes `<log>.2` and so on, and `<log>.<keep>` is dropped. Every
    process writing the log checks each time it has written CHECK_BYTES more (a sixteenth of
    `max_bytes` for small limits); one rotates (under a lock file), the others find the new
    file and reopen it. Lines written meanwhile land whole in the renamed file, which
    `evq report` reads too (`rotated`).
    """

    CHECK_BYTES = 65536

    def __init__(self, path: Path, max_bytes: int | None = None, keep: int = 8) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path, self._max_bytes, self._keep = path, max_bytes, keep
        self._fd = self._open()
        self._check_bytes = min(self.CHECK_BYTES, max(1, (max_bytes or 0) // 16))
        self._unchecked = 0

    def _open(self) -> int:
        # Owner and group only: the lines carry event ids, accounts and errors.
        return os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def write(self, data: bytes) -> None:
        """Append whole lines. Beyond the rotation check's size they go in several writes, each
        of whole lines, with a check between: a loop turn's lines of many batches cannot grow
        one file far past `max_bytes`."""
        if self._max_bytes is None or len(data) <= self._check_bytes:
            self._write(data)
            return
        done = 0
        while done < len(data):
            end = data.rfind(b"\n", done, done + self._check_bytes) + 1
            if end <= done:  # one line longer than a check: on its own
                end = data.find(b"\n", done) + 1 or len(data)
            try:
                self._write(data[done:end])
            except OSError as exc:
                exc.written = done + getattr(exc, "written", 0)  # type: ignore[attr-defined]
                raise
            done = end

    def _write(self, line: bytes) -> None:
        try:
            written = os.write(self._fd, line)
        except OSError as exc:
            exc.written = 0  # type: ignore[attr-defined]
            raise
        if written != len(line):
            short = OSError(errno.EIO, f"short write: {written} of {len(line)} bytes")
            short.written = written  # type: ignore[attr-defined]
            raise short
        if self._max_bytes is not None:
            self._unchecked += written
            if self._unchecked >= self._check_bytes:
                self._unchecked = 0
                try:
                    self._follow_rotation()
                except OSError as exc:  # the line is written: only the rotation failed
                    exc.written = written  # type: ignore[attr-defined]
                    raise

    def _follow_rotation(self) -> None:
        """Reopen the log if another process rotated it; rotate it if it is too large."""
        mine = os.fstat(self._fd)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self._path).st_ino == mine.st_ino and mine.st_size < (self._max_bytes or 0):
                return
        with open(f"{self._path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = os.stat(self._path)
            except FileNotFoundError:
                current = None
            if current is not None and current.st_ino == mine.st_ino:
                for n in range(self._keep - 1, 0, -1):
                    with contextlib.suppress(FileNotFoundError):
                        os.replace(f"{self._path}.{n}", f"{self._path}.{n + 1}")
                os.replace(self._path, f"{self._path}.1")
            os.close(self._fd)
            self._fd = self._open()

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


def rotated(path: Path) -> list[Path]:
    """`path` and its rotated files, oldest first."""
    older = sorted(
        (p for p in path.parent.glob(f"{path.name}.*") if p.suffix[1:].isdigit()),
        key=lambda p: -int(p.suffix[1:]),
    )
    return [*older, *([path] if path.is_file() else [])]


def configure(settings: Settings, fallback: bool = False) -> FilteringBoundLogger:
    """A logger that appends JSON lines with an ISO timestamp (microseconds), the host and the
    pid (consumers on many hosts each write their own log; the report merges them).

    It appends to EVENT_LOG, rotated past EVENT_LOG_MAX_BYTES (`AppendFile`). Its writes
    raise OSError when the file cannot take them, unless `fallback` sends those lines to
    stderr instead.
    """
    sink = (OrStderr if fallback else AppendFile)(
        settings.event_log, settings.event_log_max_bytes, settings.event_log_keep
    )
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
    """The event log of a consumer: one JSON line per handled attempt, in the form `configure`
    gives every line (`host`, `pid`, the fields, `event`, an ISO `timestamp`), formatted by
    orjson and written together: the lines of every slot that settles in one turn of the event
    loop go out in one write() (structlog cost a consumer about 12 us a line here).

    A write the file refuses (disk full, EIO) is retried line by line: each line not yet
    written is written again with backoff for `patience_s`, and meanwhile `diagnostics` say so.
    After that the whole line goes to `diagnostics` (stderr, when the file takes nothing) and
    the OSError is raised to the slot that logged it.
    """

    def __init__(
        self, settings: Settings, diagnostics: FilteringBoundLogger, patience_s: float
    ) -> None:
        self._file = AppendFile(
            settings.event_log, settings.event_log_max_bytes, settings.event_log_keep
        )
        self._head = {"host": socket.gethostname(), "pid": os.getpid()}
        self._diagnostics = diagnostics
        self._patience_s = patience_s
        self._turn: list[bytes] = []
        # How many of this turn's lines the write took, and what stopped it short.
        self._written: asyncio.Future[tuple[int, OSError | None]] | None = None
        self._second, self._day = 0, ""

    def line(self, name: str, fields: dict[str, Any]) -> bytes:
        """One line as `configure`'s loggers write it (their ISO timestamp, in microseconds)."""
        now = time.time()
        second = int(now)
        if second != self._second:  # the date and time of day, formatted once a second
            self._second, self._day = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        stamp = f"{self._day}.{int((now - second) * 1_000_000):06d}Z"
        return orjson.dumps({**self._head, **fields, "event": name, "timestamp": stamp}) + b"\n"

    async def write(self, lines: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Append the lines (name, fields), in order, with the other lines of this loop turn."""
        made = [self.line(name, fields) for name, fields in lines]
        if self._written is None:
            self._written = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(self._flush)
        at, written = len(self._turn), self._written
        self._turn += made
        # Not shielded: every slot awaits the one future, and only a forced stop cancels them.
        landed, error = await written
        for n, (line, (_, fields)) in enumerate(zip(made, lines, strict=True)):
            if landed <= at + n:  # the write stopped short of this line
                await self._write_again(line, fields, error or OSError("the write stopped short"))

    def _flush(self) -> None:
        """Write this turn's lines in one write(); tell each waiter how many lines landed."""
        lines, written = self._turn, self._written
        self._turn, self._written = [], None
        assert written is not None
        try:
            self._file.write(b"".join(lines))
            result: tuple[int, OSError | None] = (len(lines), None)
        except OSError as exc:
            landed = getattr(exc, "written", 0)
            result = (sum(1 for end in itertools.accumulate(map(len, lines)) if end <= landed), exc)
        except Exception as exc:  # no slot may wait forever on a write that broke
            if not written.done():
                written.set_exception(exc)
            return
        if not written.done():  # a forced stop cancels the slots waiting on it
            written.set_result(result)

    async def _write_again(self, line: bytes, fields: dict[str, Any], exc: OSError) -> None:
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
                self._file.write(line)
                return
            except OSError as again:
                if time.monotonic() > deadline:
                    self._diagnostics.error("event_log_line_lost", **fields)
                    raise
                exc = again
