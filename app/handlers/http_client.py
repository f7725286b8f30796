"""The HTTP/1.1 client of the delivery handler: POSTs over pooled keep-alive connections, each
request one write, each answer read by httptools' C parser (llhttp, the parser of Node.js and
uvicorn). It does what a webhook sender needs and nothing more: no redirects, no cookies, no
proxies, no compression. With 200 requests in flight it costs about a third of aiohttp's CPU
per request (docs/performance-notes.md, "A lean HTTP client").

What a request can end in:
- an `Answer`: the status, the first `keep_bytes` of the body and `Retry-After`;
- `Unreachable`: no connection could be made (refused, no route, a name that does not
  resolve); nothing was sent;
- `Broken`: the connection broke, or the answer was not HTTP, after the request may have
  been sent;
- `TimeoutError`: no whole answer within the timeout, the wait for a connection included.

A connection that gives any of the last three is closed, never reused. One that was idle in
the pool and is found closed by the server as the request goes out (before a byte of the
answer came) is replaced by a new one once: servers close idle keep-alive connections at will.
The client closes those idle for longer than `keep_idle_s` itself.
"""

import asyncio
import base64
import collections
import functools
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import httptools

DEFAULT_PORTS = {"http": 80, "https": 443}
KEEP_IDLE_S = 15.0  # how long an idle connection is kept for reuse (aiohttp's default too)


class Unreachable(Exception):
    """No connection to `host`:`port` could be made; nothing was sent."""

    def __init__(self, host: str, port: int, error: OSError) -> None:
        super().__init__(f"cannot connect to {host}:{port}: {error.strerror or error}")
        self.host, self.port = host, port


class Broken(Exception):
    """The connection broke, or the answer was not HTTP, after the request may have been sent."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    head: bytes  # the first bytes of the body, at most the client's `keep_bytes`
    retry_after: str | None


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a URL's requests go, and what its request line and Host header say."""

    scheme: str
    host: str
    port: int
    target: bytes  # path and query
    preamble: bytes  # the Host header, and Authorization when the URL carries credentials


@functools.lru_cache(maxsize=4096)
def origin_of(url: str) -> Origin:
    """The parts of an http(s) URL a request needs; ValueError for any other."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an http(s) URL with a host: {url!r}")
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.netloc.rpartition("@")[2]
    preamble = f"host: {host}\r\n"
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        preamble += f"authorization: Basic {base64.b64encode(credentials.encode()).decode()}\r\n"
    return Origin(parts.scheme, parts.hostname, port, target.encode(), preamble.encode())


class _Connection(asyncio.Protocol):
    """One keep-alive connection: at most one request in flight, its answer parsed as it
    arrives (httptools calls the `on_*` methods from `feed_data`)."""

    def __init__(self, keep_bytes: int) -> None:
        self._keep_bytes = keep_bytes
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._answer: asyncio.Future[tuple[Answer, bool]] | None = None
        self._head = bytearray()
        self._retry_after: str | None = None
        self._got_bytes = False
        self._status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes) -> "asyncio.Future[tuple[Answer, bool]]":
        """Write `request`; the future of its answer and whether the connection stays open."""
        assert self.transport is not None
        self._answer = asyncio.get_running_loop().create_future()
        self._head.clear()
        self._retry_after, self._got_bytes, self._status = None, False, 0
        self.transport.write(request)
        return self._answer

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(Broken(f"not an HTTP answer: {exc}"))

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"retry-after":
            self._retry_after = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        room = self._keep_bytes - len(self._head)
        if room > 0:
            self._head += body[:room]

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:  # an interim answer (100 Continue, 103): the real one follows
            return
        self._answered(self._parser.should_keep_alive())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._answer is None or self._answer.done():
            return
        if self._status >= 200:  # a body that runs until the connection closes
            self._answered(keep_alive=False)
        else:
            self._fail(Broken(f"the connection closed before an answer: {exc or 'by the server'}"))

    def _answered(self, keep_alive: bool) -> None:
        if self._answer is not None and not self._answer.done():
            answer = Answer(self._status, bytes(self._head), self._retry_after)
            self._answer.set_result((answer, keep_alive))
        self._answer = None

    def _fail(self, error: Exception) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(error)
        self.abort()

    @property
    def silent(self) -> bool:
        """Whether no byte of an answer has come since the request went out."""
        return not self._got_bytes

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class _Pool:
    """The connections to one origin: at most `limit` at once, the idle ones kept for reuse
    (the most recently used first: it is the least likely to have been closed by the server)
    for `keep_idle_s` at most."""

    def __init__(self, limit: int, keep_idle_s: float) -> None:
        self.slots = asyncio.Semaphore(limit)
        self.idle: collections.deque[tuple[float, _Connection]] = collections.deque()
        self._keep_idle_s = keep_idle_s

    def reusable(self) -> _Connection | None:
        self._expire()
        while self.idle:
            _, connection = self.idle.pop()
            if not connection.closed:
                return connection
        return None

    def put(self, connection: _Connection) -> None:
        self.idle.append((time.monotonic(), connection))
        self._expire()

    def _expire(self) -> None:
        """Close the connections idle for longer than `keep_idle_s` (the oldest are first)."""
        oldest = time.monotonic() - self._keep_idle_s
        while self.idle and self.idle[0][0] < oldest:
            self.idle.popleft()[1].abort()

    def close(self) -> None:
        while self.idle:
            self.idle.pop()[1].abort()


class Client:
    """POSTs to any number of origins, `connections` at most to each, each request (the wait
    for a connection included) timed out after `timeout_s`; the first `keep_bytes` of each
    answer's body are kept."""

    def __init__(
        self, connections: int, timeout_s: float, keep_bytes: int, keep_idle_s: float = KEEP_IDLE_S
    ) -> None:
        self._connections = connections
        self._keep_idle_s = keep_idle_s
        self._timeout_s = timeout_s
        self._keep_bytes = keep_bytes
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self._tls: ssl.SSLContext | None = None

    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> Answer:
        """POST `body` with `headers` (no CR or LF in a value: `ValueError`) to `url`."""
        origin = origin_of(url)
        lines = [b"POST ", origin.target, b" HTTP/1.1\r\n", origin.preamble]
        for name, value in headers.items():
            if "\r" in value or "\n" in value:
                raise ValueError(f"a line break in the value of the header {name}: {value!r}")
            lines.append(f"{name}: {value}\r\n".encode())
        lines.append(b"content-length: %d\r\n\r\n" % len(body))
        lines.append(body)
        request = b"".join(lines)
        key = (origin.scheme, origin.host, origin.port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(self._connections, self._keep_idle_s)
        async with asyncio.timeout(self._timeout_s), pool.slots:
            connection = pool.reusable()
            if connection is not None:
                try:
                    return await self._exchange(pool, connection, request)
                except Broken:
                    if not connection.silent:
                        raise
                # closed by the server while idle, before it read the request: once more, anew
            connection = await self._connect(origin)
            return await self._exchange(pool, connection, request)

    async def _exchange(self, pool: _Pool, connection: _Connection, request: bytes) -> Answer:
        """Send `request` on `connection` and wait for its answer; the connection goes back
        to the pool only after an answer that leaves it open."""
        try:
            answer, keep_alive = await connection.send(request)
        except BaseException:
            connection.abort()
            raise
        if keep_alive and not connection.closed:
            pool.put(connection)
        else:
            connection.abort()
        return answer

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = self._context() if origin.scheme == "https" else None
        try:
            _, connection = await loop.create_connection(
                lambda: _Connection(self._keep_bytes),
                origin.host,
                origin.port,
                ssl=tls,
                server_hostname=origin.host if tls else None,
            )
        except OSError as exc:
            raise Unreachable(origin.host, origin.port, exc) from None
        return connection

    def _context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def close(self) -> None:
        """Close every idle connection (one in use is closed as its request ends)."""
        for pool in self._pools.values():
            pool.close()
