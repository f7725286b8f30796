"""The API's clients: what `gen --via api` and `gen --via ws` push through."""

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from app.engine import NewEvent, PushResult
from app.engine.connection import backoff
from app.settings import Settings

STREAM_PATH = "/ws/events"
# Answers after which the stream closes and the unanswered events are sent again.
RESEND = frozenset({"unavailable", "redis_full", "failed"})

JSON = {"content-type": "application/json"}


def api_http(base_url: str, settings: Settings, timeout_s: float) -> httpx.AsyncClient:
    """An HTTP client for the API at `base_url`, sending API_TOKEN when one is set."""
    token = settings.api_token
    headers = {"authorization": f"Bearer {token.get_secret_value()}"} if token else {}
    return httpx.AsyncClient(base_url=base_url, timeout=timeout_s, headers=headers)


def as_sent(event: NewEvent) -> dict[str, Any]:
    """An event as `POST /events` takes it: the API's, the stream's and a workload file's form."""
    return {"account_id": event.account, "event_id": event.event_id, "payload": event.payload}


async def pace(started: float, sent: int, rate: float) -> None:
    """Sleep until `sent` events at `rate` per second since `started` are due (0: no limit)."""
    if rate:
        ahead_s = sent / rate - (time.perf_counter() - started)
        if ahead_s > 0:
            await asyncio.sleep(ahead_s)


class ApiError(Exception):
    """The API answered with an error (`status`), or could not be reached (status 0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class ApiClient:
    """Pushes batches through `POST /events/batch` and reads `GET /stats`."""

    def __init__(self, http: httpx.AsyncClient, retry_s: float = 60.0) -> None:
        self._http = http
        self._retry_s = retry_s

    async def push_many(self, events: Sequence[NewEvent]) -> list[PushResult]:
        """Queue events in one request; results in the order given. Events answered
        `unavailable` (their shard's Redis failed), or all of them after a 503, are sent again
        with backoff before this returns, so no later event of their accounts overtakes
        them; after `retry_s` without success, ApiError."""
        results: list[PushResult] = [PushResult(False, 0)] * len(events)
        pending, pauses = list(range(len(events))), backoff()
        deadline = time.monotonic() + self._retry_s
        while True:
            body = orjson.dumps({"events": [as_sent(events[i]) for i in pending]})
            try:
                reply = await self._request("POST", "/events/batch", content=body)
            except ApiError as exc:
                if exc.status != 503 or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(next(pauses))
                continue
            again = []
            for i, r in zip(pending, reply["results"], strict=True):
                if r.get("error") == "unavailable":
                    again.append(i)
                else:
                    found = PushResult(not r["duplicate"], r["seq"]) if "seq" in r else None
                    results[i] = found or PushResult(False, 0, True)
            if not again:
                return results
            if time.monotonic() > deadline:
                raise ApiError(f"{len(again)} events still unavailable after {self._retry_s:g} s")
            pending = again
            await asyncio.sleep(next(pauses))

    async def live_slots(self) -> int:
        """Total slots of the live consumers, as the API sees them."""
        return int((await self._request("GET", "/stats"))["slots"])

    async def _request(
        self, method: str, path: str, content: bytes | None = None
    ) -> dict[str, Any]:
        try:
            response = await self._http.request(method, path, content=content, headers=JSON)
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach the API at {self._http.base_url}: {exc}") from exc
        try:
            found: dict[str, Any] = orjson.loads(response.content) if response.content else {}
        except orjson.JSONDecodeError:  # not the API's answer (a proxy's error page)
            found = {}
        if response.is_error:
            raise ApiError(
                f"{method} {path}: {response.status_code} {found.get('error', '')}",
                response.status_code,
            )
        return found


@dataclass(slots=True)
class Answers:
    """What the streams answered: every event once, bar the resent ones answered again."""

    accepted: int = 0
    duplicates: int = 0
    refused: int = 0
    invalid: int = 0
    resends: int = 0  # connections opened again to send an unanswered tail
    first_error: str = ""


class StreamClient:
    """Streams events over `connections` WebSockets to `/ws/events`, each account on one of
    them (so its events keep their order), and reads the answers. A stream the server closes
    after a Redis failure, or that breaks, is opened again and its unanswered events are sent
    again (their ids make that safe), for up to `retry_s` seconds without progress."""

    def __init__(
        self, api_url: str, settings: Settings, connections: int = 1, retry_s: float = 60.0
    ) -> None:
        parts = urlsplit(api_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        self.url = urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + STREAM_PATH, "", ""))
        token = settings.api_token
        self._headers = {"authorization": f"Bearer {token.get_secret_value()}"} if token else {}
        self._connections = connections
        self._retry_s = retry_s

    async def send(
        self,
        events: Sequence[NewEvent],
        frame: int,
        rate: float,
        on_progress: Callable[[int], None],
    ) -> Answers:
        """Send `events` in frames of up to `frame`, at most `rate` per second in all."""
        streams: list[list[NewEvent]] = [[] for _ in range(self._connections)]
        for event in events:
            streams[event.account % self._connections].append(event)
        answers = Answers()
        share = rate / self._connections
        await asyncio.gather(
            *(self._stream(part, frame, share, answers, on_progress) for part in streams if part)
        )
        return answers

    async def _stream(
        self,
        events: list[NewEvent],
        frame: int,
        rate: float,
        answers: Answers,
        on_progress: Callable[[int], None],
    ) -> None:
        answered = 0  # events answered, in order; the rest go (again) on the next connection
        started = time.perf_counter()
        stuck_since = time.monotonic()
        backoff = 0.1
        while answered < len(events):
            before = answered
            try:
                async with connect(
                    self.url, additional_headers=self._headers, compression=None, max_size=None
                ) as ws:
                    sender = asyncio.create_task(
                        self._send(ws, events, answered, frame, rate, started)
                    )
                    try:
                        answered = await self._read(ws, answered, len(events), answers, on_progress)
                    finally:
                        sender.cancel()
            except (OSError, TimeoutError, WebSocketException) as exc:
                answers.first_error = answers.first_error or f"{type(exc).__name__}: {exc}"
            if answered == len(events):
                return
            if answered > before:
                stuck_since, backoff = time.monotonic(), 0.1
            elif time.monotonic() - stuck_since > self._retry_s:
                raise ApiError(
                    f"{self.url}: no event answered for {self._retry_s:g} s:"
                    f" {answers.first_error or 'the stream kept closing'}"
                )
            answers.resends += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    @staticmethod
    async def _send(
        ws: ClientConnection,
        events: list[NewEvent],
        first: int,
        frame: int,
        rate: float,
        started: float,
    ) -> None:
        """Events from `first` on, `frame` to a frame (one event: an object, more: an array)."""
        for at in range(first, len(events), frame):
            items = [as_sent(e) for e in events[at : at + frame]]
            await ws.send(orjson.dumps(items[0] if frame == 1 else items), text=True)
            await pace(started, at + len(items), rate)

    @staticmethod
    async def _read(
        ws: ClientConnection,
        answered: int,
        total: int,
        answers: Answers,
        on_progress: Callable[[int], None],
    ) -> int:
        """Read answers until every event has one or the stream closes; the new count of
        answered events."""
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                answer = orjson.loads(message)
                error = answer.get("error")
                if error in RESEND:
                    answers.first_error = answers.first_error or f"{error}: {answer['detail']}"
                    continue  # the server closes the stream after these
                if error == "backlog_full":
                    answers.refused += 1
                elif error:
                    answers.invalid += 1
                    answers.first_error = answers.first_error or f"{error}: {answer['detail']}"
                elif answer["duplicate"]:
                    answers.duplicates += 1
                else:
                    answers.accepted += 1
                answered += 1
                on_progress(1)
                if answered == total:
                    break
        return answered
