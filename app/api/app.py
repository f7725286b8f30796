"""The HTTP API: validates events and hands them to the engine; no Redis logic here."""

import contextlib
import math
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib import resources
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request, Response, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from fastapi_offline import FastAPIOffline
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as PROMETHEUS_TEXT
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    model_validator,
)
from redis.exceptions import OutOfMemoryError, RedisError
from starlette.exceptions import HTTPException

from app.api import stream
from app.api.middleware import BodyLimit, BrowserGuard, TokenAuth
from app.api.prometheus import exposition
from app.api.schema import (
    MAX_EVENT_ID_BYTES,
    Accepted,
    BatchAccepted,
    BatchIn,
    EventIn,
    Problem,
    Refused,
    result_of,
    strict_loads,
)
from app.api.stream import Ingest
from app.engine import (
    MAX_ACCOUNT_ID,
    UNREACHABLE,
    Nodes,
    Queue,
    UnsafeRedis,
    dead,
    inspect,
    registry,
)
from app.engine.dead import Selection
from app.engine.inspect import account_state, event_state, snapshot
from app.settings import Settings

RETRY_FULL_S = 5  # Retry-After of a 507: a drain frees memory within seconds
MAX_ERRORS_SHOWN = 20  # per answer: a batch of 1,000 bad items still gets a small body
MAX_SELECTED_IDS = 10_000
DASHBOARD = (resources.files("app.api") / "static" / "dashboard.html").read_text()


class DeadSelectionIn(BaseModel):
    """Which dead letters: of one account, with these event ids (of any account, or of
    `account_id`), or `all`."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"account_id": 42}, {"all": True}]}
    )

    all: StrictBool = Field(False, description="Every dead letter; then give nothing else.")
    account_id: StrictInt | None = Field(None, gt=0, le=MAX_ACCOUNT_ID)
    event_ids: list[str] | None = Field(None, min_length=1, max_length=MAX_SELECTED_IDS)

    @model_validator(mode="after")
    def _says_which(self) -> "DeadSelectionIn":
        narrowed = self.account_id is not None or self.event_ids is not None
        if self.all and narrowed:
            raise ValueError("all: true selects every dead letter; leave out account_id and"
                             " event_ids")  # fmt: skip
        if not self.all and not narrowed:
            raise ValueError("say which dead letters: account_id, event_ids, or all: true")
        return self

    def selection(self) -> Selection:
        ids = None if self.event_ids is None else frozenset(self.event_ids)
        return Selection(self.account_id, ids)


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "API_TOKEN is set and the request lacks it"},
    413: {"model": Problem, "description": "Body too large"},
    422: {"model": Problem, "description": "Invalid event"},
    503: {"model": Problem, "description": "Redis unreachable; nothing was queued"},
    507: {"model": Problem, "description": "Redis full (maxmemory); see Retry-After"},
}


class StrictJSONRequest(Request):
    """A request whose JSON body is read by `strict_loads` (no key twice in an object)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_loads(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """Routes whose bodies are parsed strictly; a refused body is a 422 like any bad JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict


def create_app(settings: Settings) -> FastAPI:
    """The ASGI app, with one Redis pool opened for its lifetime."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        queue = Queue(Nodes(settings), settings)
        app.state.queue = queue
        app.state.ingest = Ingest(queue)
        # Redis down now is a 503 per request until it answers; another SHARDS stops the API.
        with contextlib.suppress(*UNREACHABLE):
            await queue.open()
        yield
        await app.state.ingest.aclose()
        await queue.aclose()

    # FastAPIOffline: /docs and /redoc with Swagger UI and ReDoc from the package, no CDN.
    app = FastAPIOffline(
        title="evq",
        summary="Accepts events; each account's events are handled one at a time, in order.",
        lifespan=lifespan,
        responses=ERRORS,
        dependencies=[Depends(HTTPBearer(auto_error=False))] if settings.api_token else [],
    )
    app.router.route_class = StrictJSONRoute
    app.add_middleware(BodyLimit)
    if settings.api_token:
        app.add_middleware(TokenAuth, token=settings.api_token.get_secret_value())
    app.add_middleware(BrowserGuard, hosts=settings.api_hosts, origins=settings.api_origins)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)
    for fault in UNREACHABLE:
        app.add_exception_handler(fault, _redis_down)
    app.add_exception_handler(OutOfMemoryError, _redis_full)  # the more specific one wins
    app.add_exception_handler(UnsafeRedis, _redis_evicting)
    _routes(app, settings)
    return app


def queue(request: Request) -> Queue:
    """The app's engine."""
    q: Queue = request.app.state.queue
    return q


def _routes(app: FastAPI, settings: Settings) -> None:
    _ingest_routes(app, settings)
    _read_routes(app, settings)
    _ops_routes(app, settings)
    _admin_routes(app)


def _ingest_routes(app: FastAPI, settings: Settings) -> None:
    retry_after = {"Retry-After": str(max(1, math.ceil(settings.process_seconds)))}

    @app.post(
        "/events",
        status_code=202,
        response_model=Accepted,
        responses={429: {"model": Problem, "description": "Account backlog at its cap"}},
    )
    async def post_event(event: EventIn, request: Request, response: Response) -> Accepted:
        """Queue one event: 202 when queued, 200 with `duplicate: true` when seen before, 429
        with Retry-After when its account already has MAX_BACKLOG_PER_ACCOUNT events waiting."""
        result = result_of(event, (await queue(request).push_many([event.new_event()]))[0])
        if isinstance(result, Refused):
            raise HTTPException(429, result.detail, headers=retry_after)
        if result.duplicate:
            response.status_code = 200
        return result

    @app.post("/events/batch", status_code=202, response_model=BatchAccepted)
    async def post_batch(batch: BatchIn, request: Request, response: Response) -> BatchAccepted:
        """Queue up to 1,000 events in one round trip, shard by shard; results in request
        order. An event whose account is at MAX_BACKLOG_PER_ACCOUNT is refused on its own,
        and the events of a shard whose Redis master failed are answered `unavailable` while
        the others are queued (Retry-After is then set); 503 when nothing could be."""
        results = await queue(request).push_each([e.new_event() for e in batch.events])
        if all(r.fault is not None for r in results):
            raise next(r.fault for r in results if r.fault is not None)
        answers = [result_of(e, r) for e, r in zip(batch.events, results, strict=True)]
        unavailable = sum(r.fault is not None for r in results)
        refused = sum(isinstance(a, Refused) for a in answers) - unavailable
        dupes = sum(isinstance(a, Accepted) and a.duplicate for a in answers)
        if refused or unavailable:
            response.headers.update(retry_after)
        return BatchAccepted(
            accepted=len(answers) - dupes - refused - unavailable,
            duplicates=dupes,
            refused=refused,
            unavailable=unavailable,
            results=answers,
        )

    @app.websocket(stream.PATH)
    async def stream_events(websocket: WebSocket) -> None:
        """Events as JSON frames (one event, or an array of up to 1,000); one answer frame per
        event, in order, once it is stored (see app/api/stream.py)."""
        ingest: stream.Ingest = websocket.app.state.ingest
        await stream.Stream(
            websocket, ingest, settings.ws_max_unacked, settings.ws_max_unacked_bytes
        ).serve()


def _read_routes(app: FastAPI, settings: Settings) -> None:
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
        live = await registry.live_consumers(q, settings.lease_seconds)
        return {**await inspect.stats(q), "consumers": len(live), "slots": sum(live.values())}

    @app.get("/accounts/{account_id}/events/{event_id:path}")
    async def get_event(
        account_id: Annotated[int, Path(gt=0, le=MAX_ACCOUNT_ID)],
        event_id: Annotated[str, Path(min_length=1, max_length=MAX_EVENT_ID_BYTES)],
        request: Request,
    ) -> dict[str, Any]:
        """Where one event is: pending at a position, in flight (owner, attempt), dead (its
        error) or acked; 404 when evq does not know it."""
        found = await event_state(queue(request), account_id, event_id)
        if found is None:
            raise HTTPException(
                404,
                f"event {event_id!r} of account {account_id} is not known: never accepted, or"
                " settled and forgotten (its id outlived DEDUPE_SECONDS, or its dead letter was"
                " purged)",
            )
        return found

    @app.get("/dead")
    async def get_dead(
        request: Request,
        offset: Annotated[int, Query(ge=0, le=MAX_ACCOUNT_ID)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        account_id: Annotated[int | None, Query(gt=0, le=MAX_ACCOUNT_ID)] = None,
        event_id: Annotated[str | None, Query(min_length=1, max_length=MAX_EVENT_ID_BYTES)] = None,
    ) -> dict[str, Any]:
        """Dead letters with their errors, oldest first, a page at a time; optionally of one
        account or one event id."""
        ids = None if event_id is None else {event_id}
        total, items = await dead.dead_letters(
            queue(request), offset, limit, Selection(account_id, ids)
        )
        return {"total": total, "offset": offset, "limit": limit, "items": items}

    @app.get("/overview")
    async def overview(request: Request) -> dict[str, Any]:
        """What the dashboard shows: counters, consumers with their busy slots and heartbeat
        age, the oldest unsettled event's age and the longest backlogs."""
        return (await snapshot(queue(request), settings.lease_seconds)).as_json()


def _ops_routes(app: FastAPI, settings: Settings) -> None:
    @app.get(
        "/metrics", response_class=Response, responses={200: {"content": {PROMETHEUS_TEXT: {}}}}
    )
    async def metrics(request: Request) -> Response:
        """Prometheus text format; counts come from Redis, so restarts reset nothing."""
        found = await snapshot(queue(request), settings.lease_seconds)
        return Response(exposition(found), media_type=PROMETHEUS_TEXT)

    @app.get("/", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(DASHBOARD)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "Redis does not answer"}})
    async def readyz(request: Request) -> JSONResponse:
        """Redis answers: 200 ready, else 503 not ready; nothing more, as anyone may ask."""
        try:
            await queue(request).ping()
        except RedisError:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return JSONResponse({"status": "ready"})


def _admin_routes(app: FastAPI) -> None:
    @app.post("/accounts/{account_id}/pause")
    async def pause(
        account_id: Annotated[int, Path(gt=0, le=MAX_ACCOUNT_ID)], request: Request
    ) -> dict[str, Any]:
        """Hold an account: it keeps accepting events but is not claimed; a consumer holding
        it lets go after its current event."""
        before, held = await queue(request).pause(account_id)
        return {"account_id": account_id, "paused": before or "operator", "held": held}

    @app.post("/accounts/{account_id}/resume")
    async def resume(
        account_id: Annotated[int, Path(gt=0, le=MAX_ACCOUNT_ID)], request: Request
    ) -> dict[str, Any]:
        """Make a paused or parked account claimable at once (a parked one goes on past its
        dead letter, which stays); `was_paused` is null when it was not paused."""
        before = await queue(request).resume(account_id)
        return {"account_id": account_id, "was_paused": before or None}

    @app.post("/dead/replay")
    async def replay_dead(selection: DeadSelectionIn, request: Request) -> dict[str, int]:
        """Queue dead letters again, ids and payloads intact, each at the head of its account
        in seq order; a parked account goes on."""
        return {"replayed": await dead.replay(queue(request), selection.selection())}

    @app.post("/dead/purge")
    async def purge_dead(selection: DeadSelectionIn, request: Request) -> dict[str, int]:
        """Delete dead letters."""
        return {"purged": await dead.purge(queue(request), selection.selection())}


def _where(loc: tuple[int | str, ...]) -> str:
    """`("body", "events", 3, "account_id")` -> `events[3].account_id`."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".") or "body"


def _detail(error: Any) -> dict[str, str]:
    """Where and what is wrong, in at most 200 characters; a body that is not JSON is the
    whole body's fault (its loc holds a character offset, not a field) and says why."""
    if error.get("type") == "json_invalid":
        why = error.get("ctx", {}).get("error", "")
        return {"loc": "body", "msg": f"the body is not JSON: {why}"[:200]}
    return {"loc": _where(tuple(error["loc"])), "msg": str(error["msg"])[:200]}


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    detail = [_detail(e) for e in errors[:MAX_ERRORS_SHOWN]]
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


async def _redis_evicting(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=503)


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": f"Redis unavailable: {exc}"}, status_code=503)
