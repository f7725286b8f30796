"""Secure by default: no open API on the network, nothing a foreign page can do, no secret
in a log, no connection that holds the server without sending its headers."""

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from app.api.app import create_app
from stack import REPO
from stack.servers import wait_for
from tests.api.test_api import Lifespan
from tests.support import api_process, settings

TOKEN = "s3cret-token-for-the-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def evq_api(**env: str) -> subprocess.CompletedProcess[str]:
    """`evq api` run to its end with `env` (it refuses before listening, or is killed)."""
    values = {**os.environ, "PYTHONPATH": str(REPO), "API_PORT": "1", **env}
    values.pop("API_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-m", "app", "api"],
        env=values,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_api_refuses_to_listen_beyond_loopback_without_a_token() -> None:
    """On 0.0.0.0 without API_TOKEN, `evq api` exits 2 before listening, naming the setting."""
    done = evq_api(API_HOST="0.0.0.0")
    assert done.returncode == 2
    assert "API_TOKEN" in done.stderr and "Traceback" not in done.stderr


async def test_bearer_is_case_insensitive_and_a_wrong_token_is_not(redis_url: str) -> None:
    """`bearer` and `BEARER` carry the token as well as `Bearer`; a wrong token gets 401."""
    async with Lifespan(create_app(settings(redis_url, api_token=TOKEN))) as api:
        for scheme in ("Bearer", "bearer", "BEARER"):
            answer = await api.get("/stats", headers={"Authorization": f"{scheme} {TOKEN}"})
            assert answer.status_code == 200, scheme
        assert (
            await api.get("/stats", headers={"Authorization": "Bearer nope"})
        ).status_code == 401
        assert (
            await api.get("/stats", headers={"Authorization": f"Basic {TOKEN}"})
        ).status_code == 401


async def test_a_foreign_page_cannot_change_state(redis_url: str) -> None:
    """Without a token too: a cross-site form post (pause) and a request from another origin
    get 403; the API's own origin and ALLOWED_ORIGINS are served."""
    app = create_app(settings(redis_url, allowed_origins="https://ops.example"))
    async with Lifespan(app) as api:
        evil = {"Origin": "http://evil.example"}
        form = {**evil, "Content-Type": "application/x-www-form-urlencoded"}
        assert (await api.post("/accounts/7/pause", headers=form)).status_code == 403
        answer = await api.post("/events", json={"account_id": 1, "event_id": "e"}, headers=evil)
        assert answer.status_code == 403 and "ALLOWED_ORIGINS" in answer.json()["error"]
        site = {"Sec-Fetch-Site": "cross-site"}
        assert (await api.post("/accounts/7/resume", headers=site)).status_code == 403
        own = {"Origin": "http://localhost"}
        assert (await api.post("/accounts/7/pause", headers=own)).status_code == 200
        listed = {"Origin": "https://ops.example"}
        assert (await api.post("/accounts/7/resume", headers=listed)).status_code == 200
        assert (await api.get("/stats", headers=evil)).status_code == 200  # reads: CORS guards them
        state = (await api.get("/accounts/7")).json()
        assert state["paused"] is None


async def test_an_unknown_host_is_refused(redis_url: str) -> None:
    """A Host header the API does not serve (a DNS-rebound name) gets 400 and no data;
    ALLOWED_HOSTS adds names."""
    async with Lifespan(create_app(settings(redis_url))) as api:
        answer = await api.get("/stats", headers={"Host": "rebound.example:8000"})
        assert answer.status_code == 400 and "ALLOWED_HOSTS" in answer.json()["error"]
        assert (await api.get("/stats", headers={"Host": "127.0.0.1:8000"})).status_code == 200
    app = create_app(settings(redis_url, allowed_hosts="evq.internal"))
    async with Lifespan(app) as api:
        assert (await api.get("/stats", headers={"Host": "evq.internal"})).status_code == 200


async def test_pages_carry_security_headers(redis_url: str) -> None:
    """The dashboard, the docs and every answer forbid framing and sniffing and restrict
    what a page may load."""
    async with Lifespan(create_app(settings(redis_url))) as api:
        for path in ("/", "/docs", "/redoc", "/stats"):
            headers = (await api.get(path)).headers
            assert "frame-ancestors 'none'" in headers["content-security-policy"], path
            assert headers["x-frame-options"] == "DENY"
            assert headers["x-content-type-options"] == "nosniff"


async def test_readyz_says_ready_or_not_and_nothing_more(tmp_path: Path) -> None:
    """Without a token, /readyz tells no host, port or Redis error."""
    url = "redis://:wrong-password@127.0.0.1:1/0"
    async with Lifespan(create_app(settings(url, api_token=TOKEN))) as api:
        answer = await api.get("/readyz")
    assert answer.status_code == 503
    assert answer.json() == {"status": "not ready"}


def test_websocket_from_another_origin_is_refused(redis_url: str) -> None:
    """A page of another site cannot open the stream (no token needed on loopback), and the
    API's own origin can."""
    with api_process(redis_url) as (url, _):
        ws_url = url.replace("http", "ws") + "/ws/events"

        async def handshake(origin: str) -> int:
            try:
                async with connect(ws_url, origin=origin):  # type: ignore[arg-type]
                    return 101
            except InvalidStatus as exc:
                return exc.response.status_code

        assert asyncio.run(handshake("http://evil.example")) == 403
        assert asyncio.run(handshake(url)) == 101


def test_no_secret_reaches_the_logs(redis_url: str, tmp_path: Path) -> None:
    """The token sent as ?token= and as a header, and a Redis password in the URL, appear in
    no log line of the API nor in a CLI error."""
    log = tmp_path / "api.log"
    with api_process(redis_url, log=log, API_TOKEN=TOKEN) as (url, _):
        httpx.get(f"{url}/stats", headers=AUTH)
        httpx.get(f"{url}/stats?token={TOKEN}&x=1")
        ws_url = url.replace("http", "ws") + f"/ws/events?token={TOKEN}"

        async def stream() -> None:
            async with connect(ws_url) as ws:
                await ws.send('{"account_id": 1, "event_id": "e1"}')
                await ws.recv()

        asyncio.run(stream())
        wait_for(lambda: "WebSocket" in log.read_text(), 5, "the access log line")
    text = log.read_text()
    assert "/ws/events?token=***" in text
    assert TOKEN not in text
    done = subprocess.run(
        [sys.executable, "-m", "app", "stats"],
        env={**os.environ, "REDIS_URL": "redis://127.0.0.1:1/0?password=hunter2"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1 and "hunter2" not in done.stderr


def test_connections_that_never_finish_their_headers_are_closed(redis_url: str) -> None:
    """Twenty connections that send half a request line are closed after
    API_HEADER_TIMEOUT_SECONDS, and the API answers others meanwhile."""
    with api_process(redis_url, API_HEADER_TIMEOUT_SECONDS="1") as (url, _):
        port = int(url.rsplit(":", 1)[1])
        slow = []
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            sock.settimeout(5)
            slow.append(sock)
        assert httpx.get(f"{url}/healthz").status_code == 200
        started = time.monotonic()
        closed = [sock.recv(1) == b"" for sock in slow]
        waited = time.monotonic() - started
        for sock in slow:
            sock.close()
    assert all(closed)
    assert waited < 3


async def test_a_chunked_body_over_the_limit_is_413(redis_url: str) -> None:
    """A body sent without Content-Length is cut at the route's limit with 413, as a
    declared one is; nothing is queued."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"account_id": 1, "event_id": "big", "payload": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}'

    async with Lifespan(create_app(settings(redis_url))) as api:
        answer = await api.post("/events", content=chunks())
        assert answer.status_code == 413
        assert (await api.get("/stats")).json()["accepted"] == 0


async def test_replay_takes_the_documented_10000_ids(redis_url: str) -> None:
    """A replay or purge naming 10,000 event ids of 128 bytes is within the body limit."""
    ids = [f"{i:0128d}" for i in range(10_000)]
    async with Lifespan(create_app(settings(redis_url))) as api:
        answer = await api.post("/dead/purge", json={"event_ids": ids})
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"purged": 0}


async def test_any_valid_event_id_can_be_looked_up(redis_url: str) -> None:
    """An event id with slashes and spaces is found by its lookup route."""
    async with Lifespan(create_app(settings(redis_url))) as api:
        event_id = "orders/2026/11 a?b"
        await api.post("/events", json={"account_id": 3, "event_id": event_id})
        answer = await api.get(f"/accounts/3/events/{quote(event_id, safe='')}")
        assert answer.status_code == 200, answer.text
        assert answer.json()["state"] == "pending"


async def test_a_key_named_twice_is_refused(redis_url: str) -> None:
    """`{"account_id": 1, "account_id": 2}` is a 422, not an event on account 2, in a single
    event and in a batch; nothing is queued."""
    async with Lifespan(create_app(settings(redis_url))) as api:
        single = b'{"account_id": 1, "event_id": "e", "account_id": 2}'
        batch = b'{"events": [{"account_id": 1, "event_id": "e", "account_id": 2}]}'
        for path, body in (("/events", single), ("/events/batch", batch)):
            answer = await api.post(
                path, content=body, headers={"content-type": "application/json"}
            )
            assert answer.status_code == 422, path
            assert "'account_id' appears twice" in answer.text
        assert (await api.get("/stats")).json()["accepted"] == 0
