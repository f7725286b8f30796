"""The API's ASGI middleware, answered before a route runs: which hosts and origins may reach
it, the token check, and the body limits."""

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import orjson

from app.api.schema import MAX_PAYLOAD_BYTES

BATCH_BODY_LIMIT = 8 * 1024 * 1024  # 1,000 events, or 10,000 event ids of up to 128 bytes
BODY_LIMITS = {
    "/events": MAX_PAYLOAD_BYTES + 1024,
    "/events/batch": BATCH_BODY_LIMIT,
    "/dead/replay": BATCH_BODY_LIMIT,
    "/dead/purge": BATCH_BODY_LIMIT,
}
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

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Pages are the API's own: scripts and styles inline or from itself, nothing framed, no
# connection but to itself (ReDoc runs a worker from a blob).
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self'"
        b" 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; worker-src 'self' blob:;"
        b" frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BrowserGuard:
    """What a browser could be tricked into, refused. The Host header must name this API
    (`hosts`; `*` in ALLOWED_HOSTS: any), so a DNS-rebound name reads nothing. A WebSocket
    handshake and every request that can change state must come from the API's own origin or
    one of `origins`: another site's page or form gets 403 (a client that is no browser sends
    no Origin). Every HTTP answer carries SECURITY_HEADERS."""

    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        hosts: frozenset[str],
        origins: frozenset[str],
    ) -> None:
        self.app = app
        self._hosts = hosts
        self._origins = origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        refusal = None
        if "*" not in self._hosts and _hostname(host) not in self._hosts:
            refusal = (400, f"Host {host!r} is not served here: add it to ALLOWED_HOSTS")
        elif kind == "websocket" or scope["method"] not in SAFE_METHODS:
            refusal = self._cross_site(scope, headers, host)
        if refusal is not None:
            await _refuse(scope, receive, send, *refusal)
            return
        if kind == "websocket":
            await self.app(scope, receive, send)
            return

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, secured)

    def _cross_site(
        self, scope: Scope, headers: dict[bytes, bytes], host: str
    ) -> tuple[int, str] | None:
        origin = headers.get(b"origin")
        if origin is None:
            if headers.get(b"sec-fetch-site") == b"cross-site":
                return 403, "cross-site requests cannot change state"
            return None
        own = f"{'https' if scope.get('scheme') in ('https', 'wss') else 'http'}://{host}"
        found = origin.decode("latin-1").rstrip("/")
        if found == own or found in self._origins:
            return None
        return 403, f"origin {found!r} may not change state here: add it to ALLOWED_ORIGINS"


def _hostname(host: str) -> str:
    """`127.0.0.1:8000` -> `127.0.0.1`, `[::1]:8000` -> `::1`, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, error: str) -> None:
    """Answer `status` with `error`; a WebSocket handshake is refused the same way where the
    server can send a denial response, else closed with 1008."""
    if scope["type"] == "http":
        await _send_problem(send, status, error)
    elif "websocket.http.response" in scope.get("extensions", {}):
        await receive()  # websocket.connect
        await _send_problem(send, status, error, prefix="websocket.")
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": error[:120]})


class TokenAuth:
    """401 for a request without `Authorization: Bearer <API_TOKEN>` (compared in constant
    time), but for OPEN_PATHS. A WebSocket handshake may carry the token as `?token=` instead
    (browsers cannot set its headers); refused, it is answered 401 before any frame."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], token: str) -> None:
        self.app = app
        self._expected = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        kind = scope["type"]
        if kind not in ("http", "websocket") or path in OPEN_PATHS or path.startswith(OPEN_PREFIX):
            await self.app(scope, receive, send)
            return
        scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer":  # the scheme is case-insensitive (RFC 9110)
            given = b""
        if kind == "websocket" and not scheme:
            tokens = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
            given = tokens[0].encode() if tokens else b""
        if hmac.compare_digest(given.strip(), self._expected):
            await self.app(scope, receive, send)
            return
        error = "missing or wrong API token: send 'Authorization: Bearer <API_TOKEN>'"
        if kind == "http":
            await _send_problem(send, 401, error, [(b"www-authenticate", b"Bearer")])
        else:
            await _refuse(scope, receive, send, 401, f"{error}, or ?token=<API_TOKEN>")


class BodyLimit:
    """413 for a body over its route's limit, by Content-Length or, for a chunked body, as
    soon as it streams past it (the route then reads a disconnect and its answer is dropped)."""

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
        refused = False

        async def counted() -> Message:
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit and not refused:
                refused = True
                await _send_problem(send, 413, f"body is larger than {limit} bytes")
            return {"type": "http.disconnect"} if refused else message

        async def unless_refused(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counted, unless_refused)


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
