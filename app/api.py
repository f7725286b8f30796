"""The HTTP API: validates events and hands them to the engine; no Redis logic here."""

import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, JsonValue, StrictInt, field_validator
from redis.exceptions import OutOfMemoryError
from starlette.exceptions import HTTPException

from app.admin import dead_letters
from app.connection import UNREACHABLE, Nodes
from app.queue import NewEvent, PushResult, Queue
from app.settings import Settings
from app.views import account_state

MAX_PAYLOAD_BYTES = 64 * 1024
MAX_BATCH = 1000
MAX_EVENT_ID_BYTES = 128
RETRY_FULL_S = 5  # Retry-After of a 507: a drain frees memory within seconds
MAX_ERRORS_SHOWN = 20  # per answer: a batch of 1,000 bad items still gets a small body
MAX_ACCOUNT_ID = 2**53 - 1  # exact in every JSON client; also the largest page offset
BODY_LIMITS = {"/events": MAX_PAYLOAD_BYTES + 1024, "/events/batch": 8 * 1024 * 1024}
DEFAULT_BODY_LIMIT = 64 * 1024

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class EventIn(BaseModel):
    """One event to queue for an account."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"account_id": 42, "event_id": "order-7-paid", "payload": {"cents": 1999}}]
        },
    )

    account_id: StrictInt = Field(
        gt=0,
        le=MAX_ACCOUNT_ID,
        description="The account, a JSON integer; its events are handled in order.",
    )
    event_id: str = Field(
        min_length=1,
        max_length=MAX_EVENT_ID_BYTES,
        description=f"Idempotency key, 1 to {MAX_EVENT_ID_BYTES} bytes of UTF-8: re-sent within"
        " the dedupe window, the event is queued once.",
    )
    payload: JsonValue = Field(
        default=None, description="Any JSON with finite numbers, at most 64 KiB serialized."
    )

    @field_validator("event_id")
    @classmethod
    def _fits(cls, event_id: str) -> str:
        try:
            size = len(event_id.encode())
        except UnicodeEncodeError as exc:  # a lone surrogate escape, "\ud800"
            raise ValueError("event_id is not valid UTF-8 text") from exc
        if size > MAX_EVENT_ID_BYTES:
            raise ValueError(f"event_id is longer than {MAX_EVENT_ID_BYTES} bytes in UTF-8")
        return event_id

    @field_validator("payload")
    @classmethod
    def _storable(cls, payload: JsonValue) -> JsonValue:
        if not _finite(payload):
            raise ValueError(
                "payload has a number that is not finite (NaN, Infinity, or too large for a"
                " double, like 1e400): JSON cannot carry it"
            )
        try:
            size = len(orjson.dumps(payload))
        except orjson.JSONEncodeError as exc:  # integers beyond 64 bits
            raise ValueError(f"payload cannot be stored: {exc}") from exc
        if size > MAX_PAYLOAD_BYTES:
            raise ValueError(f"payload is larger than {MAX_PAYLOAD_BYTES} bytes serialized")
        return payload

    def new_event(self) -> NewEvent:
        return NewEvent(self.account_id, self.event_id, self.payload)


def _finite(value: JsonValue) -> bool:
    """Whether every number in `value` is finite (walked without recursion: a 64 KiB payload
    can nest thousands deep)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


class BatchIn(BaseModel):
    """Up to 1,000 events, validated as a whole before any is queued."""

    model_config = ConfigDict(extra="forbid")

    events: list[EventIn] = Field(min_length=1, max_length=MAX_BATCH)


class Accepted(BaseModel):
    """The result for one event: its seq, and whether it was a duplicate."""

    account_id: int
    event_id: str
    seq: int
    duplicate: bool = False


class BatchAccepted(BaseModel):
    """Per-event results in request order."""

    accepted: int
    duplicates: int
    results: list[Accepted]


class Problem(BaseModel):
    """Every error: a message a person can act on."""

    error: str
    detail: list[dict[str, Any]] | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": Problem, "description": "Body too large"},
    422: {"model": Problem, "description": "Invalid event"},
    503: {"model": Problem, "description": "Redis unreachable; nothing was queued"},
    507: {"model": Problem, "description": "Redis full (maxmemory); see Retry-After"},
}


def create_app(settings: Settings) -> FastAPI:
    """The ASGI app, with one Redis pool opened for its lifetime."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        queue = Queue(Nodes(settings), settings)
        app.state.queue = queue
        # Redis down now is a 503 per request until it answers; another SHARDS stops the API.
        with contextlib.suppress(*UNREACHABLE):
            await queue.open()
        yield
        await queue.aclose()

    app = FastAPI(
        title="evq",
        summary="Accepts events; each account's events are handled one at a time, in order.",
        lifespan=lifespan,
        responses=ERRORS,
    )
    app.add_middleware(BodyLimit)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)
    for fault in UNREACHABLE:
        app.add_exception_handler(fault, _redis_down)
    app.add_exception_handler(OutOfMemoryError, _redis_full)  # the more specific one wins
    _routes(app, settings)
    return app


def _routes(app: FastAPI, settings: Settings) -> None:
    def queue(request: Request) -> Queue:
        q: Queue = request.app.state.queue
        return q

    @app.post("/events", status_code=202, response_model=Accepted)
    async def post_event(event: EventIn, request: Request, response: Response) -> Accepted:
        """Queue one event: 202 when queued, 200 with `duplicate: true` when seen before."""
        result = _accepted(event, (await queue(request).push_many([event.new_event()]))[0])
        if result.duplicate:
            response.status_code = 200
        return result

    @app.post("/events/batch", status_code=202, response_model=BatchAccepted)
    async def post_batch(batch: BatchIn, request: Request) -> BatchAccepted:
        """Queue up to 1,000 events in one atomic round trip; results in request order."""
        results = await queue(request).push_many([e.new_event() for e in batch.events])
        accepted = [_accepted(e, r) for e, r in zip(batch.events, results, strict=True)]
        dupes = sum(a.duplicate for a in accepted)
        return BatchAccepted(accepted=len(accepted) - dupes, duplicates=dupes, results=accepted)

    @app.get("/accounts/{account_id}")
    async def get_account(
        account_id: Annotated[int, Path(gt=0, le=MAX_ACCOUNT_ID)], request: Request
    ) -> dict[str, Any]:
        """Backlog, the event in flight, the owner's token and lease, last acked seq, counts."""
        return asdict(await account_state(queue(request), account_id))

    @app.get("/stats")
    async def get_stats(request: Request) -> dict[str, int]:
        """Totals, the ready-index size and the live consumers' slots."""
        q = queue(request)
        live = await q.live_consumers(settings.lease_seconds)
        return {**await q.stats(), "consumers": len(live), "slots": sum(live.values())}

    @app.get("/dead")
    async def get_dead(
        request: Request,
        offset: Annotated[int, Query(ge=0, le=MAX_ACCOUNT_ID)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    ) -> dict[str, Any]:
        """Dead letters with their errors, oldest first, a page at a time."""
        total, items = await dead_letters(queue(request), offset, limit)
        return {"total": total, "offset": offset, "limit": limit, "items": items}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> dict[str, str]:
        """Redis answers (503 otherwise)."""
        await queue(request).ping()
        return {"status": "ready"}


def _accepted(event: EventIn, result: PushResult) -> Accepted:
    return Accepted(
        account_id=event.account_id,
        event_id=event.event_id,
        seq=result.seq,
        duplicate=not result.queued,
    )


def _where(loc: tuple[int | str, ...]) -> str:
    """`("body", "events", 3, "account_id")` -> `events[3].account_id`."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".") or "body"


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    detail = [
        {"loc": _where(tuple(e["loc"])), "msg": str(e["msg"])[:200]}
        for e in errors[:MAX_ERRORS_SHOWN]
    ]
    if len(errors) > MAX_ERRORS_SHOWN:
        detail.append({"loc": "", "msg": f"and {len(errors) - MAX_ERRORS_SHOWN} more errors"})
    message = "; ".join(f"{d['loc']}: {d['msg']}" for d in detail[:5])
    return JSONResponse({"error": message, "detail": detail}, status_code=422)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)


async def _redis_full(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(
        {
            "error": "Redis is full (maxmemory): nothing of this event was queued, or of a batch"
            " nothing in the shards it refused. Send it again once consumers have drained some:"
            " events already queued come back as duplicates."
        },
        status_code=507,
        headers={"Retry-After": str(RETRY_FULL_S)},
    )


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": f"Redis unavailable: {exc}"}, status_code=503)


class _TooLarge(Exception):
    pass


class BodyLimit:
    """413 for a body over its route's limit, by Content-Length or while it streams in."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = BODY_LIMITS.get(scope["path"], DEFAULT_BODY_LIMIT)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit():
            await _send_problem(send, 400, "Content-Length is not a number")
            return
        if int(declared) > limit:
            await _send_problem(send, 413, f"body is larger than {limit} bytes")
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await _send_problem(send, 413, f"body is larger than {limit} bytes")


async def _send_problem(send: Send, status: int, error: str) -> None:
    body = orjson.dumps({"error": error})
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
