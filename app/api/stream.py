"""Streaming ingest: events in over a WebSocket, one answer per event, in order, once stored.

Every stream hands its events to one `Ingest` per process, which pushes them one push at a
time: what arrives while a push is in flight goes out together in the next one, so a stream of
single events is queued in batches of every shard, and each stream's events reach Redis in the
order they were sent. A stream holds at most WS_MAX_UNACKED events, and WS_MAX_UNACKED_BYTES
of frames, that are not answered yet, and all streams of the process together at most
PROCESS_MAX_BYTES; beyond that a stream stops reading its socket (uvicorn then stops reading
the TCP connection), so a sender faster than Redis is held back instead of buffered. Frames
arrive uncompressed (no permessage-deflate), so bytes on the wire are the bytes held.
"""

import asyncio
import contextlib
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect
from uvicorn.protocols.utils import ClientDisconnected

from app.api.schema import MAX_BATCH, MAX_EVENT_ID_BYTES, EventIn, result_of, strict_loads
from app.engine import UNREACHABLE, NewEvent, PushResult, Queue, RedisFull

PATH = "/ws/events"
MAX_FRAME_BYTES = 8 * 1024 * 1024  # as a batch request; uvicorn closes 1009 past --ws-max-size
MAX_BAD_FRAMES = 10  # frames in a row with nothing to queue, then the stream is closed
FLUSH_MAX = 5000  # events per push
FLUSH_MAX_BYTES = 4 * 1024 * 1024  # frame bytes per push: one push never hogs Redis or memory
PROCESS_MAX_BYTES = 16 * 1024 * 1024  # frame bytes all streams of the process hold unanswered
# Close codes (RFC 6455): why a stream was closed.
CLOSE_NOT_JSON = 1003  # unsupported data
CLOSE_INVALID = 1008  # policy violation
CLOSE_TOO_LARGE = 1009
CLOSE_TRY_LATER = 1013  # Redis failed a push: reconnect and send the unanswered events again
GONE = (WebSocketDisconnect, ClientDisconnected, RuntimeError)  # sending to a closed socket


class StreamState:
    """One stream as the Ingest sees it: once one of its pushes failed, none of its later
    events is pushed, so a stream's events never land out of order."""

    __slots__ = ("failed",)

    def __init__(self) -> None:
        self.failed: Exception | None = None


@dataclass(slots=True)
class _Part:
    stream: StreamState
    events: list[NewEvent]
    size: int  # bytes of the frame the events came in
    future: "asyncio.Future[list[PushResult]]" = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Ingest:
    """Pushes the events of every stream of this process, one push at a time."""

    def __init__(self, queue: Queue) -> None:
        self._queue = queue
        self._waiting: deque[_Part] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.held = 0  # frame bytes every stream of the process holds unanswered
        self.room = asyncio.Event()  # set whenever `held` went down
        self.room.set()

    def hold(self, size: int) -> None:
        self.held += size

    def release(self, size: int) -> None:
        self.held -= size
        self.room.set()

    def submit(
        self, stream: StreamState, events: list[NewEvent], size: int
    ) -> "asyncio.Future[list[PushResult]]":
        """Queue `events` (from a frame of `size` bytes) after everything submitted before;
        the future has their results."""
        part = _Part(stream, events, size)
        if stream.failed:
            part.future.set_exception(stream.failed)
            return part.future
        self._waiting.append(part)
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        return part.future

    async def aclose(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for part in self._waiting:
            part.future.cancel()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)  # what other streams read in this turn joins the push
            while self._waiting:
                taken = [self._waiting.popleft()]
                count, size = len(taken[0].events), taken[0].size
                while self._waiting and (
                    count + len(self._waiting[0].events) <= FLUSH_MAX
                    and size + self._waiting[0].size <= FLUSH_MAX_BYTES
                ):
                    taken.append(self._waiting.popleft())
                    count, size = count + len(taken[-1].events), size + taken[-1].size
                try:
                    results = await self._queue.push_many([e for p in taken for e in p.events])
                except Exception as exc:  # nothing of these is known to be stored
                    self._fail(taken, exc)
                    continue
                at = 0
                for part in taken:
                    if not part.future.done():
                        part.future.set_result(results[at : at + len(part.events)])
                    at += len(part.events)

    def _fail(self, taken: list[_Part], exc: Exception) -> None:
        """Fail the taken parts, and everything waiting of their streams."""
        for part in taken:
            part.stream.failed = exc
        kept: deque[_Part] = deque()
        for part in (*taken, *self._waiting):
            if part.stream.failed:
                if not part.future.done():
                    part.future.set_exception(exc)
            else:
                kept.append(part)
        self._waiting = kept


@dataclass(slots=True)
class _Frame:
    """What one frame asks for: its answers in order, each an error already made or an event
    whose answer comes from the push."""

    items: list[bytes | EventIn]
    size: int = 0  # bytes of the frame, held until its answers are sent
    pushed: "asyncio.Future[list[PushResult]] | None" = None
    close: tuple[int, str] | None = None  # close the stream after these answers

    @property
    def count(self) -> int:
        return len(self.items)


def error_frame(event_id: Any, error: str, detail: str) -> bytes:
    """`{event_id, error, detail}`: `error` is a code, `detail` says it for a person."""
    return orjson.dumps({"event_id": event_id, "error": error, "detail": detail})


class Stream:
    """One WebSocket connection: reads frames while fewer than `max_unacked` events and
    `max_bytes` of frames wait for their answer (and the process holds less than
    PROCESS_MAX_BYTES), and answers each event in the order received."""

    def __init__(
        self, websocket: WebSocket, ingest: Ingest, max_unacked: int, max_bytes: int
    ) -> None:
        self._ws = websocket
        self._ingest = ingest
        self._max_unacked = max_unacked
        self._max_bytes = max_bytes
        self._bytes = 0
        self._state = StreamState()
        self._frames: deque[_Frame] = deque()
        self._unacked = 0
        self._room = asyncio.Event()
        self._more = asyncio.Event()
        self._reading = True
        self._bad_in_a_row = 0
        self._reader: asyncio.Task[None] | None = None

    async def serve(self) -> None:
        """Until the client leaves, or the stream is closed for garbage or a Redis failure."""
        await self._ws.accept()
        self._reader = asyncio.create_task(self._read())
        try:
            await self._write()
        except GONE:
            pass
        finally:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, *GONE):
                await self._reader
            self._ingest.release(self._bytes)

    async def _read(self) -> None:
        try:
            while True:
                await self._wait_for_room()
                message = await self._ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("text")
                frame = self._parse(message.get("bytes") if data is None else data)
                self._frames.append(frame)
                self._unacked += frame.count
                self._bytes += frame.size
                self._ingest.hold(frame.size)
                self._more.set()
                if frame.close:
                    return
        finally:
            self._reading = False
            self._more.set()

    async def _wait_for_room(self) -> None:
        """Until this stream may read another frame. A stream holding nothing may always read
        one (a frame is at most MAX_FRAME_BYTES), so no stream waits on itself forever."""
        while self._unacked and (
            self._unacked >= self._max_unacked
            or self._bytes >= self._max_bytes
            or self._ingest.held >= PROCESS_MAX_BYTES
        ):
            self._room.clear()
            self._ingest.room.clear()
            waits = [asyncio.ensure_future(e.wait()) for e in (self._room, self._ingest.room)]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()

    def _parse(self, data: str | bytes | None) -> _Frame:
        size = len(data or "")
        if isinstance(data, str) and not data.isascii():
            size = len(data.encode())
        if size > MAX_FRAME_BYTES:
            problem = f"frame of {size} bytes; at most {MAX_FRAME_BYTES}"
            return self._bad("too_large", problem, CLOSE_TOO_LARGE)
        try:
            found = strict_loads(data or b"")
        except json.JSONDecodeError as exc:
            return self._bad("not_json", f"frame is not JSON: {exc}", CLOSE_NOT_JSON)
        if isinstance(found, dict):
            found = [found]
        if not isinstance(found, list) or not 1 <= len(found) <= MAX_BATCH:
            problem = f"a frame is one event (an object) or an array of 1 to {MAX_BATCH} events"
            return self._bad("invalid", problem, CLOSE_INVALID)
        items: list[bytes | EventIn] = []
        for item in found:
            try:
                items.append(EventIn.model_validate(item))
            except ValidationError as exc:
                event_id = item.get("event_id") if isinstance(item, dict) else None
                if not isinstance(event_id, str) or len(event_id) > MAX_EVENT_ID_BYTES:
                    event_id = None  # echo back only what could be an event id
                problem = "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or 'event'}: {e['msg']}"
                    for e in exc.errors()[:5]
                )
                items.append(error_frame(event_id, "invalid", problem))
        events = [i.new_event() for i in items if isinstance(i, EventIn)]
        if not events:
            return self._bad_items(items)
        self._bad_in_a_row = 0
        return _Frame(items, size, self._ingest.submit(self._state, events, size))

    def _bad(self, error: str, detail: str, code: int) -> _Frame:
        return self._bad_items([error_frame(None, error, detail)], code)

    def _bad_items(self, items: list[bytes | EventIn], code: int = CLOSE_INVALID) -> _Frame:
        self._bad_in_a_row += 1
        if self._bad_in_a_row < MAX_BAD_FRAMES:
            return _Frame(items)
        return _Frame(items, close=(code, f"{MAX_BAD_FRAMES} frames in a row had no valid event"))

    async def _write(self) -> None:
        while self._frames or self._reading:
            if not self._frames:
                self._more.clear()
                await self._more.wait()
                continue
            frame = self._frames[0]
            try:
                results = await frame.pushed if frame.pushed else []
            except Exception as exc:  # the push failed: nothing after it is pushed either
                await self._fail(exc)
                return
            at = 0
            for item in frame.items:
                if isinstance(item, bytes):
                    await self._ws.send_text(item.decode())
                else:
                    await self._ws.send_text(result_of(item, results[at]).model_dump_json())
                    at += 1
            self._frames.popleft()
            self._unacked -= frame.count
            self._bytes -= frame.size
            self._ingest.release(frame.size)
            self._room.set()
            if frame.close:
                await self._ws.close(*frame.close)
                return

    async def _fail(self, exc: Exception) -> None:
        """Answer every unanswered event with the failure, then close: the client sends them
        again on a new connection (event ids make that safe)."""
        if isinstance(exc, RedisFull):
            error, reason = "redis_full", "Redis is full (maxmemory)"
        elif isinstance(exc, UNREACHABLE):
            error, reason = "unavailable", "Redis unavailable"
        else:
            error, reason = "failed", "the push failed"
        detail = f"{reason}: not queued, or not known to be; send it again ({exc})"[:300]
        if self._reader:
            self._reader.cancel()
        for frame in self._frames:
            for item in frame.items:
                if isinstance(item, EventIn):
                    await self._ws.send_text(error_frame(item.event_id, error, detail).decode())
                else:
                    await self._ws.send_text(item.decode())
        await self._ws.close(CLOSE_TRY_LATER, reason)
