"""The API's ASGI middleware: the token check and the body limits, answered before a route runs."""

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import orjson

from app.api.schema import MAX_PAYLOAD_BYTES

BODY_LIMITS = {"/events": MAX_PAYLOAD_BYTES + 1024, "/events/batch": 8 * 1024 * 1024}
DEFAULT_BODY_LIMIT = 64 * 1024
# Served without API_TOKEN: the probes, and pages and assets that carry no queue data (the
# dashboard asks for the token and sends it with every call it makes).
OPEN_PATHS = {
    "/healthz",
    "/readyz",
    "/",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
    "/openapi.json",
}
OPEN_PREFIX = "/static-offline-docs/"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class TokenAuth:
    """401 for a request without `Authorization: Bearer <API_TOKEN>` (compared in constant
    time), but for OPEN_PATHS. A WebSocket handshake may carry the token as `?token=` instead
    (browsers cannot set its headers); refused, it is answered 401 before any frame."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        kind = scope["type"]
        if kind not in ("http", "websocket") or path in OPEN_PATHS or path.startswith(OPEN_PREFIX):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if kind == "websocket" and not given:
            tokens = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
            given = f"Bearer {tokens[0]}".encode() if tokens else b""
        if hmac.compare_digest(given, self._expected):
            await self.app(scope, receive, send)
            return
        error = "missing or wrong API token: send 'Authorization: Bearer <API_TOKEN>'"
        if kind == "http":
            await _send_problem(send, 401, error, [(b"www-authenticate", b"Bearer")])
        elif "websocket.http.response" in scope.get("extensions", {}):
            await receive()  # websocket.connect
            await _send_problem(send, 401, f"{error}, or ?token=<API_TOKEN>", prefix="websocket.")
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": "API token"})


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


async def _send_problem(
    send: Send,
    status: int,
    error: str,
    more: list[tuple[bytes, bytes]] | None = None,
    prefix: str = "",
) -> None:
    """An error answer; `prefix` "websocket." refuses a WebSocket handshake with it."""
    body = orjson.dumps({"error": error})
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    headers += more or []
    await send({"type": f"{prefix}http.response.start", "status": status, "headers": headers})
    await send({"type": f"{prefix}http.response.body", "body": body})
