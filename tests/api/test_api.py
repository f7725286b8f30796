"""The HTTP API against a real Redis: accepted, duplicate, batch, validation, Redis down."""

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.api.app import create_app
from app.api.schema import MAX_PAYLOAD_BYTES
from app.engine import NewEvent, Queue, inspect
from stack.servers import RedisServer
from tests.support import Consumers, Routed, settings


@pytest.fixture
async def api(redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app, its lifespan running, on the test Redis."""
    async with Lifespan(create_app(settings(redis_url))) as client:
        yield client


class Lifespan:
    """Runs the app's lifespan around an httpx client on its ASGI transport."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.context = app.router.lifespan_context(app)

    async def __aenter__(self) -> httpx.AsyncClient:
        await self.context.__aenter__()
        transport = httpx.ASGITransport(app=self.app)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://localhost")
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()
        await self.context.__aexit__(None, None, None)


async def accepted(queue: Queue) -> int:
    return (await inspect.stats(queue))["accepted"]


async def test_event_is_queued_with_its_seq(api: httpx.AsyncClient, queue: Queue) -> None:
    """POST /events answers 202 with the seq; the event is in the account's list."""
    first = await api.post("/events", json={"account_id": 7, "event_id": "a", "payload": [1]})
    second = await api.post("/events", json={"account_id": 7, "event_id": "b"})
    assert first.status_code == second.status_code == 202
    seq = first.json()["seq"]
    assert first.json() == {"account_id": 7, "event_id": "a", "seq": seq, "duplicate": False}
    assert second.json()["seq"] > seq
    assert await Routed(queue).llen(queue.keys.pending(7)) == 2


async def test_duplicate_is_200_and_not_queued_again(api: httpx.AsyncClient, queue: Queue) -> None:
    """I6: the same event_id again answers 200, duplicate, with the first seq."""
    first = await api.post("/events", json={"account_id": 7, "event_id": "a"})
    again = await api.post("/events", json={"account_id": 7, "event_id": "a", "payload": 2})
    assert again.status_code == 200
    assert again.json()["duplicate"] is True
    assert again.json()["seq"] == first.json()["seq"]
    assert await Routed(queue).llen(queue.keys.pending(7)) == 1


async def test_batch_results_in_request_order(api: httpx.AsyncClient, queue: Queue) -> None:
    """A batch answers per event, in order, with seqs and duplicates."""
    events = [
        {"account_id": 1, "event_id": "x"},
        {"account_id": 2, "event_id": "y"},
        {"account_id": 1, "event_id": "z"},
        {"account_id": 1, "event_id": "x"},
    ]
    reply = await api.post("/events/batch", json={"events": events})
    assert reply.status_code == 202
    body = reply.json()
    assert (body["accepted"], body["duplicates"]) == (3, 1)
    x, _, z, x_again = body["results"]
    assert [(r["event_id"], r["duplicate"]) for r in body["results"]] == [
        ("x", False),
        ("y", False),
        ("z", False),
        ("x", True),
    ]
    assert z["seq"] == x["seq"] + 1
    assert x_again["seq"] == x["seq"]
    assert await accepted(queue) == 3


BAD_EVENTS: list[tuple[Any, str]] = [
    ({"account_id": 0, "event_id": "a"}, "account_id"),
    ({"account_id": -3, "event_id": "a"}, "account_id"),
    ({"account_id": "seven", "event_id": "a"}, "account_id"),
    ({"account_id": 2**53, "event_id": "a"}, "account_id"),
    ({"account_id": 1}, "event_id"),
    ({"account_id": 1, "event_id": ""}, "event_id"),
    ({"account_id": 1, "event_id": "e" * 129}, "event_id"),
    ({"account_id": 1, "event_id": 5}, "event_id"),
    ({"account_id": 1, "event_id": "a", "colour": "red"}, "colour"),
    ({"account_id": 1, "event_id": "a", "payload": "p" * MAX_PAYLOAD_BYTES}, "payload"),
    ({"account_id": 1, "event_id": "a", "payload": {"n": 2**64}}, "payload"),
    ({"account_id": True, "event_id": "a"}, "account_id"),
    ({"account_id": "42", "event_id": "a"}, "account_id"),
    ({"account_id": 42.0, "event_id": "a"}, "account_id"),
    ({"account_id": 1, "event_id": "é" * 65}, "event_id"),  # 65 characters, 130 bytes
    ([1, 2], "body"),
]


async def test_backlog_cap_refuses_with_429_or_per_event(redis_url: str, queue: Queue) -> None:
    """MAX_BACKLOG_PER_ACCOUNT: a single event beyond it is 429 with Retry-After; in a batch
    the refused events get an error each while the rest are queued; /stats counts them."""
    capped = settings(redis_url, max_backlog_per_account=2, process_seconds=2.5)
    async with Lifespan(create_app(capped)) as api:
        batch = [{"account_id": 1, "event_id": f"a{i}"} for i in range(3)]
        batch.append({"account_id": 2, "event_id": "b0"})
        reply = await api.post("/events/batch", json={"events": batch})
        assert reply.status_code == 202
        assert reply.headers["retry-after"] == "3"
        body = reply.json()
        assert (body["accepted"], body["duplicates"], body["refused"]) == (3, 0, 1)
        refused = body["results"][2]
        assert refused["event_id"] == "a2" and refused["error"] == "backlog_full"
        assert "MAX_BACKLOG_PER_ACCOUNT" in refused["detail"] and "seq" not in refused
        single = await api.post("/events", json={"account_id": 1, "event_id": "a3"})
        assert single.status_code == 429
        assert single.headers["retry-after"] == "3"
        assert "not queued" in single.json()["error"]
        again = await api.post("/events", json={"account_id": 1, "event_id": "a0"})
        assert again.status_code == 200 and again.json()["duplicate"] is True
        stats = (await api.get("/stats")).json()
    assert (stats["accepted"], stats["refused"]) == (3, 2)
    assert await Routed(queue).llen(queue.keys.pending(1)) == 2


@pytest.mark.parametrize(("event", "field"), BAD_EVENTS)
async def test_invalid_event_is_422_naming_the_field(
    api: httpx.AsyncClient, queue: Queue, event: Any, field: str
) -> None:
    """Every validation error is a 422 whose message names the field; nothing is queued."""
    reply = await api.post("/events", json=event)
    assert reply.status_code == 422
    assert field in reply.json()["error"]
    assert await accepted(queue) == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"account_id": 1, "event_id": "a", "payload": {"x": 1e400}}', "payload"),
        ('{"account_id": 1, "event_id": "a", "payload": [-Infinity]}', "payload"),
        ('{"account_id": 1, "event_id": "a", "payload": {"deep": [1, NaN]}}', "payload"),
        ('{"account_id": 1, "event_id": "\\ud800"}', "event_id"),
        ('{"account_id": 1e400, "event_id": "a"}', "account_id"),
    ],
)
async def test_numbers_json_cannot_carry_and_broken_text_are_422(
    api: httpx.AsyncClient, queue: Queue, body: str, field: str
) -> None:
    """Numbers without a finite value and ids that are not UTF-8 are refused, not stored
    changed (orjson would have written null)."""
    reply = await api.post("/events", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 422
    assert field in reply.json()["error"]
    assert await accepted(queue) == 0


async def test_a_batch_of_bad_items_gets_a_small_answer(
    api: httpx.AsyncClient, queue: Queue
) -> None:
    """1,000 bad items: the answer names the first 20 and counts the rest, in a few KiB."""
    events = [{"account_id": True, "event_id": "e" * 200} for _ in range(1000)]
    reply = await api.post("/events/batch", json={"events": events})
    assert reply.status_code == 422
    assert len(reply.content) < 8 * 1024
    assert reply.json()["detail"][-1]["msg"] == "and 1980 more errors"
    assert await accepted(queue) == 0


async def test_invalid_json_is_422(api: httpx.AsyncClient, queue: Queue) -> None:
    """A body that is not JSON is a 422, not a 500."""
    reply = await api.post(
        "/events", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert reply.status_code == 422
    assert reply.json()["error"]
    assert await accepted(queue) == 0


async def test_bad_item_rejects_the_whole_batch(api: httpx.AsyncClient, queue: Queue) -> None:
    """One bad event rejects the batch with its index, and none of it is queued."""
    events = [{"account_id": 1, "event_id": f"e{i}"} for i in range(5)]
    events[3]["account_id"] = 0
    reply = await api.post("/events/batch", json={"events": events})
    assert reply.status_code == 422
    assert "events[3].account_id" in reply.json()["error"]
    assert await accepted(queue) == 0


@pytest.mark.parametrize("size", [0, 1001])
async def test_batch_size_is_bounded(api: httpx.AsyncClient, size: int) -> None:
    """A batch holds 1 to 1,000 events."""
    events = [{"account_id": 1, "event_id": f"e{i}"} for i in range(size)]
    reply = await api.post("/events/batch", json={"events": events})
    assert reply.status_code == 422
    assert "events" in reply.json()["error"]


async def test_oversized_body_is_413(api: httpx.AsyncClient, queue: Queue) -> None:
    """A body past the route's limit is refused with 413 before it is parsed."""
    big = {"account_id": 1, "event_id": "a", "payload": "p" * (2 * MAX_PAYLOAD_BYTES)}
    reply = await api.post("/events", json=big)
    assert reply.status_code == 413
    assert "larger than" in reply.json()["error"]
    assert await accepted(queue) == 0


async def test_account_view_follows_the_event(api: httpx.AsyncClient, queue: Queue) -> None:
    """GET /accounts/{id}: backlog, in flight, owner, then last acked seq and counts."""
    await queue.push_many([NewEvent(5, "a"), NewEvent(5, "b")])
    (event,) = await queue.claim(1, 0)
    view = (await api.get("/accounts/5")).json()
    assert view["backlog"] == 1
    assert view["in_flight"]["seq"] == event.seq
    assert view["owner"]["token"] == event.token
    assert view["last_acked_seq"] is None
    await queue.ack(event, want_next=False)
    view = (await api.get("/accounts/5")).json()
    assert (view["owner"], view["in_flight"], view["last_acked_seq"], view["acked"]) == (
        None,
        None,
        event.seq,
        1,
    )


async def test_dead_letters_are_paged_with_errors(api: httpx.AsyncClient, queue: Queue) -> None:
    """GET /dead lists dead letters with their error text, a page at a time."""
    await queue.push_many([NewEvent(a, f"p{a}") for a in (1, 2, 3)])
    for event in await queue.claim(3, 0):
        await queue.nack(event, f"boom {event.account}", dead=True)
    page = (await api.get("/dead", params={"offset": 1, "limit": 1})).json()
    assert page["total"] == 3
    assert len(page["items"]) == 1
    assert page["items"][0]["error"].startswith("boom")
    assert (await api.get("/dead", params={"limit": 0})).status_code == 422


async def test_stats_health_and_unknown_route(api: httpx.AsyncClient) -> None:
    """GET /stats has the totals; /healthz and /readyz answer; an unknown route is a JSON 404."""
    await api.post("/events", json={"account_id": 1, "event_id": "a"})
    stats = (await api.get("/stats")).json()
    assert (stats["accepted"], stats["ready"]) == (1, 1)
    assert (await api.get("/healthz")).status_code == 200
    assert (await api.get("/readyz")).json() == {"status": "ready"}
    missing = await api.get("/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]


async def test_redis_down_is_503_and_queues_nothing(tmp_path: Path) -> None:
    """With Redis stopped, writes and readyz answer 503; after a restart nothing half-written."""
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    try:
        async with Lifespan(create_app(settings(server.url))) as api:
            ok = await api.post("/events", json={"account_id": 1, "event_id": "kept"})
            assert ok.status_code == 202
            server.stop()
            batch = [{"account_id": a, "event_id": f"lost{a}"} for a in range(1, 50)]
            down = await api.post("/events/batch", json={"events": batch})
            assert down.status_code == 503
            assert "Redis unavailable" in down.json()["error"]
            assert (await api.get("/readyz")).status_code == 503
            assert (await api.get("/healthz")).status_code == 200
            server.start()
            stats = (await api.get("/stats")).json()
            assert stats["accepted"] == 1
    finally:
        server.stop()


async def test_redis_full_is_507_and_pushes_resume_after_a_drain(tmp_path: Path) -> None:
    """A Redis with a small maxmemory filled through the API: past 90% of it a batch is a 507
    with Retry-After and queues nothing (claims and acks keep the rest to drain with); gen
    stops with a clear message. Consumers drain, and the same batch is then accepted whole:
    nothing lost, nothing queued twice."""
    server = RedisServer(tmp_path / "redis", options=("--maxmemory", "8mb"))
    server.start()
    try:
        async with Lifespan(create_app(settings(server.url))) as api:
            sent = 0
            for b in range(100):
                batch = [
                    {"account_id": i % 40 + 1, "event_id": f"b{b}-{i}", "payload": "x" * 2000}
                    for i in range(50)
                ]
                reply = await api.post("/events/batch", json={"events": batch})
                if reply.status_code != 202:
                    break
                sent += 50
                await asyncio.sleep(0.02)
            assert reply.status_code == 507, reply.text
            assert int(reply.headers["retry-after"]) > 0
            assert "full" in reply.json()["error"]
            assert (await api.get("/stats")).json()["accepted"] == sent
            gen = subprocess.run(
                [sys.executable, "-m", "app", "gen", "--events=3000", "--batch=3000"],
                env={**os.environ, "REDIS_URL": server.url, "EVENT_LOG": str(tmp_path / "g")},
                capture_output=True,
                text=True,
                check=False,
            )
            assert gen.returncode == 1 and "is full" in gen.stderr, gen.stderr
            consumers = Consumers(server.url, tmp_path / "event.log")
            consumers.start(burst=True)
            assert consumers.procs[0].wait(timeout=60) == 0
            consumers.stop_all()
            await asyncio.sleep(1.1)  # the push's memory reading is a second old at most
            again = await api.post("/events/batch", json={"events": batch})
            assert again.status_code == 202, again.text
            assert again.json()["accepted"] == 50
            assert (await api.get("/stats")).json()["accepted"] == sent + 50
    finally:
        server.stop()
