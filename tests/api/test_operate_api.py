"""Operator routes against a real Redis: event lookup, pause/resume, dead-letter replay and
purge, /metrics and /overview, and API_TOKEN on every route but the probes."""

import re
import shutil
import subprocess
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi.routing import APIRoute
from prometheus_client.parser import text_string_to_metric_families

from app.api.app import create_app
from app.api.middleware import OPEN_PATHS
from app.engine import Event, NewEvent, Queue, inspect
from tests.api.test_api import Lifespan
from tests.support import settings

TOKEN = "s3cret-token"


@pytest.fixture
async def api(redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with Lifespan(create_app(settings(redis_url))) as client:
        yield client


async def dead_lettered(queue: Queue, account: int, *ids: str) -> None:
    """Queue `ids` for `account` and dead-letter the first one."""
    await queue.push_many([NewEvent(account, i, {"i": i}) for i in ids])
    [event] = await queue.claim(1, 0.01)
    assert isinstance(event, Event)
    await queue.nack(event, "ValueError: poison", dead=True, want_next=False)


async def test_event_lookup_answers_where_it_is(api: httpx.AsyncClient, queue: Queue) -> None:
    await queue.push_many([NewEvent(3, "a"), NewEvent(3, "b")])
    found = (await api.get("/accounts/3/events/b")).json()
    assert (found["state"], found["position"]) == ("pending", 2)
    missing = await api.get("/accounts/3/events/zzz")
    assert missing.status_code == 404
    assert "not known" in missing.json()["error"]


async def test_pause_and_resume(api: httpx.AsyncClient, queue: Queue) -> None:
    await queue.push_many([NewEvent(4, "a")])
    paused = await api.post("/accounts/4/pause")
    assert paused.json() == {"account_id": 4, "paused": "operator", "held": False}
    assert await queue.claim(1, 0.01) == []
    assert (await api.get("/accounts/4")).json()["paused"] == "operator"
    resumed = await api.post("/accounts/4/resume")
    assert resumed.json() == {"account_id": 4, "was_paused": "operator"}
    assert len(await queue.claim(1, 0.01)) == 1
    assert (await api.post("/accounts/4/resume")).json()["was_paused"] is None


async def test_dead_letters_replay_and_purge(api: httpx.AsyncClient, queue: Queue) -> None:
    await dead_lettered(queue, 5, "a", "b")
    await dead_lettered(queue, 6, "c")
    page = (await api.get("/dead", params={"account_id": 5})).json()
    assert [(i["event_id"], i["error"]) for i in page["items"]] == [("a", "ValueError: poison")]
    for body in ({}, {"all": True, "account_id": 5}, {"event_ids": []}, {"all": "yes"}):
        refused = await api.post("/dead/replay", json=body)
        assert refused.status_code == 422, body
        assert refused.json()["error"]
    assert (await api.post("/dead/replay", json={"event_ids": ["a"]})).json() == {"replayed": 1}
    assert (await api.post("/dead/purge", json={"all": True})).json() == {"purged": 1}
    assert (await api.get("/dead")).json()["total"] == 0
    found = (await api.get("/accounts/5/events/a")).json()
    assert (found["state"], found["position"], found["replays"]) == ("pending", 1, 1)


async def test_metrics_parse_and_match_the_counters(api: httpx.AsyncClient, queue: Queue) -> None:
    """The exposition parses with prometheus-client's parser; its numbers are the queue's."""
    await dead_lettered(queue, 7, "a", "b", "c")
    await api.post("/accounts/8/pause")
    response = await api.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    stats = await inspect.stats(queue)
    assert samples[("evq_events_enqueued_total", ())] == stats["accepted"] == 3
    assert samples[("evq_events_dead_lettered_total", ())] == 1
    assert samples[("evq_backlog_events", ())] == stats["backlog"] == 2
    assert samples[("evq_accounts_paused", (("reason", "operator"),))] == 1
    assert samples[("evq_event_processing_seconds_count", ())] == 0
    assert 0 <= samples[("evq_oldest_event_age_seconds", ())] < 60
    assert not any(re.search(r"account", key) for _, labels in samples for key, _ in labels)
    promtool = shutil.which("promtool")  # Debian's prometheus package
    if promtool:
        checked = subprocess.run(
            [promtool, "check", "metrics"], input=response.content, capture_output=True, check=False
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
    overview = (await api.get("/overview")).json()
    assert overview["stats"]["backlog"] == 2
    assert overview["longest"] == [{"account_id": 7, "backlog": 2}]


async def test_every_route_but_the_probes_needs_the_token(redis_url: str) -> None:
    """With API_TOKEN set, each route of the schema answers 401 without it (and with a wrong
    one) and something else with it; /healthz and /readyz stay open."""
    app = create_app(settings(redis_url, api_token=TOKEN))
    routes = [r for r in app.routes if isinstance(r, APIRoute) and r.path not in OPEN_PATHS]
    assert len(routes) >= 12
    async with Lifespan(app) as client:
        for route in routes:
            path = route.path.replace("{account_id}", "1").replace("{event_id}", "e")
            method = next(iter(route.methods))
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                refused = await client.request(method, path, headers=headers, json={})
                assert refused.status_code == 401, (method, path, headers)
                assert "API token" in refused.json()["error"]
            allowed = await client.request(
                method, path, headers={"Authorization": f"Bearer {TOKEN}"}, json={"all": True}
            )
            assert allowed.status_code != 401, (method, path)
        for probe in ("/healthz", "/readyz"):
            assert (await client.get(probe)).status_code == 200
