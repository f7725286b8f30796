"""Serving the API: refuse to listen beyond loopback without a token, close connections that
do not send their headers in time, keep tokens out of the access log, and no WebSocket
compression (a small compressed frame could inflate to megabytes)."""

import ipaddress
import logging
import re
import sys
from asyncio import TimerHandle
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.api.app import create_app
from app.api.stream import MAX_FRAME_BYTES
from app.settings import Settings

SECRET_IN_QUERY = re.compile(r"((?:^|[?&])(?:token|password)=)[^&\s\"]*", re.IGNORECASE)
WS_FRAME_LIMIT = MAX_FRAME_BYTES + 64 * 1024  # a frame past this is closed with 1009 unread


class OpenToTheNetwork(Exception):
    """API_HOST reaches beyond loopback and no API_TOKEN is set."""


def loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> None:
    """Raise OpenToTheNetwork when the API would listen beyond loopback without a token;
    with API_ALLOW_NO_TOKEN=1 (an auth proxy in front checks every request), warn instead."""
    if settings.api_token is not None or loopback(settings.api_host):
        return
    message = (
        f"API_HOST={settings.api_host} listens beyond this machine and API_TOKEN is not set:"
        " anyone who reaches the port could read, add and purge events."
    )
    if not settings.api_allow_no_token:
        raise OpenToTheNetwork(
            f"{message} Set API_TOKEN (or API_TOKEN_FILE), or API_ALLOW_NO_TOKEN=1 when a proxy"
            " in front authenticates every request (docs/security.md)"
        )
    print(f"evq api: WARNING: {message} (API_ALLOW_NO_TOKEN=1)", file=sys.stderr)


class RedactSecrets(logging.Filter):
    """Masks `token=` and `password=` values in the request lines uvicorn logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                SECRET_IN_QUERY.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args
            )
        return True


class HeaderTimeout(HttpToolsProtocol):
    """uvicorn's HTTP protocol, closing a connection whose request line and headers have not
    all arrived within `header_timeout_s` of the connection or of the request's first byte."""

    header_timeout_s = 5.0
    _header_timer: TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def serve(settings: Settings) -> None:
    """Run the API under uvicorn until it is stopped."""
    check_exposure(settings)
    for name in ("uvicorn.access", "uvicorn.error"):  # the second logs WebSocket handshakes
        logging.getLogger(name).addFilter(RedactSecrets())
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        http=type(
            "HeaderTimeout",
            (HeaderTimeout,),
            {"header_timeout_s": settings.api_header_timeout_seconds},
        ),
        ws_per_message_deflate=False,
        ws_max_size=WS_FRAME_LIMIT,
    )
