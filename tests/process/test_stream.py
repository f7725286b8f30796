"""The WebSocket stream against a real `evq api` process and a real redis-server: per-account
order over one and several streams, answers only once stored (Redis killed mid-stream), bad
frames, back-pressure with Redis stopped, the backlog cap, API_TOKEN, record and replay."""

import asyncio
import collections
import os
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from typer.testing import CliRunner
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from app.api.stream import MAX_BAD_FRAMES, MAX_FRAME_BYTES
from app.cli.commands import app
from app.engine import NewEvent, open_queue
from app.workload.client import StreamClient
from app.workload.report import read_log
from stack.servers import RedisServer
from tests.process.helpers import wait_burst
from tests.support import (
    ApiProcess,
    Consumers,
    api_process,
    assert_all_acked_once_in_order,
    settings,
)

TOKEN = "stream-token"


@pytest.fixture
def api(redis_url: str) -> Iterator[ApiProcess]:
    with api_process(redis_url) as served:
        yield served


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/ws/events"


def event(account: int, event_id: str, **payload: object) -> dict[str, Any]:
    return {"account_id": account, "event_id": event_id, "payload": payload or None}


async def answers(ws: ClientConnection, n: int) -> list[dict[str, Any]]:
    return [orjson.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(n)]


async def stored_ids(url: str) -> dict[int, list[str]]:
    """account -> the event ids of its pending list, in queue order."""
    found: dict[int, list[str]] = {}
    async with open_queue(settings(url)) as queue:
        for master in queue.nodes.masters():
            async for key in master.scan_iter(match="{evq:*}:user:*"):
                bodies = await master.lrange(key, 0, -1)
                found[int(key.rsplit(b":", 1)[1])] = [orjson.loads(b)["id"] for b in bodies]
    return found


def per_account(events: Sequence[NewEvent]) -> dict[int, list[str]]:
    order: dict[int, list[str]] = collections.defaultdict(list)
    for e in events:
        order[e.account].append(e.event_id)
    return dict(order)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


async def test_one_stream_answers_each_event_in_order_once_stored(
    api: ApiProcess, redis_url: str
) -> None:
    """Single events and arrays mixed: one answer per event, in the order sent, each with the
    seq Redis gave it; a resent id is a duplicate with its first seq."""
    async with connect(ws_url(api.url)) as ws:
        await ws.send(orjson.dumps(event(7, "a")))
        await ws.send(orjson.dumps([event(7, "b"), event(8, "c"), event(7, "d")]))
        await ws.send(orjson.dumps(event(7, "a")))
        got = await answers(ws, 5)
    assert [(a["event_id"], a["account_id"], a["duplicate"]) for a in got] == [
        ("a", 7, False),
        ("b", 7, False),
        ("c", 8, False),
        ("d", 7, False),
        ("a", 7, True),
    ]
    seqs = [a["seq"] for a in got]
    assert seqs[0] < seqs[1] < seqs[3] and seqs[4] == seqs[0]
    assert await stored_ids(redis_url) == {7: ["a", "b", "d"], 8: ["c"]}


async def test_parallel_streams_keep_each_streams_order_and_drain_in_order(
    api: ApiProcess, redis_url: str, consumers: Consumers
) -> None:
    """Four streams send events of the same 20 accounts at once, single events and arrays:
    in Redis each stream's events of an account are in the order it sent them, nothing is
    missing or doubled, and consumers then handle every account in that order."""

    async def stream(n: int) -> list[dict[str, Any]]:
        mine = [event(i % 20 + 1, f"s{n}-{i}") for i in range(600)]
        async with connect(ws_url(api.url)) as ws:
            for at in range(0, len(mine), 1 + n * 7):
                chunk = mine[at : at + 1 + n * 7]
                await ws.send(orjson.dumps(chunk[0] if len(chunk) == 1 else chunk))
            return await answers(ws, len(mine))

    replies = await asyncio.gather(*(stream(n) for n in range(4)))
    assert all("seq" in a for reply in replies for a in reply)
    stored = await stored_ids(redis_url)
    assert sum(map(len, stored.values())) == 2400
    for account, ids in stored.items():
        assert len(set(ids)) == len(ids)
        for n in range(4):
            sent = [f"s{n}-{i}" for i in range(600) if i % 20 + 1 == account]
            assert [i for i in ids if i.startswith(f"s{n}-")] == sent
    consumers.start(burst=True)
    wait_burst(consumers.procs)
    acked = assert_all_acked_once_in_order(consumers.event_log, 2400)
    by_account = collections.defaultdict(list)
    for a in sorted(acked, key=lambda a: a.started_ns):
        by_account[a.account].append(a.event_id)
    assert by_account == stored


async def test_bad_frames_get_error_frames_and_the_stream_goes_on(
    api: ApiProcess, redis_url: str
) -> None:
    """Not JSON, too large, not an event, and a bad event inside an array: an error frame
    each, in place; the good events around them are queued."""
    async with connect(ws_url(api.url), max_size=None) as ws:
        await ws.send("{not json")
        await ws.send(b"[" + b" " * MAX_FRAME_BYTES + b"]")
        await ws.send(orjson.dumps(42))
        await ws.send(orjson.dumps([event(1, "ok1"), {"account_id": "x", "event_id": "bad"}]))
        await ws.send(orjson.dumps([]))
        await ws.send(orjson.dumps(event(1, "ok2")))
        got = await answers(ws, 7)
    assert [a.get("error") for a in got] == [
        "not_json",
        "too_large",
        "invalid",
        None,
        "invalid",
        "invalid",
        None,
    ]
    assert got[4]["event_id"] == "bad" and "account_id" in got[4]["detail"]
    assert all(a["event_id"] is None and a["detail"] for a in (got[0], got[1], got[2], got[5]))
    assert await stored_ids(redis_url) == {1: ["ok1", "ok2"]}


@pytest.mark.parametrize(
    ("garbage", "code"),
    [
        (b"nope", 1003),
        (orjson.dumps({"account_id": 0, "event_id": "x"}), 1008),
        (b" " * (MAX_FRAME_BYTES + 1), 1009),
    ],
)
async def test_a_stream_of_garbage_is_closed(api: ApiProcess, garbage: bytes, code: int) -> None:
    """MAX_BAD_FRAMES frames in a row with nothing to queue: each answered, then the stream is
    closed with the code that says why."""
    async with connect(ws_url(api.url), max_size=None) as ws:
        for _ in range(MAX_BAD_FRAMES):
            await ws.send(garbage, text=True)
        got = await answers(ws, MAX_BAD_FRAMES)
        assert all(a["error"] for a in got)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code == code


async def test_backlog_cap_refuses_over_the_stream_and_counts(redis_url: str) -> None:
    """MAX_BACKLOG_PER_ACCOUNT=3: the fourth and fifth event of an account get a
    `backlog_full` error frame, other accounts go on, and /stats counts the refusals."""
    with api_process(redis_url, MAX_BACKLOG_PER_ACCOUNT="3") as (url, _):
        async with connect(ws_url(url)) as ws:
            await ws.send(orjson.dumps([event(1, f"a{i}") for i in range(5)] + [event(2, "b")]))
            got = await answers(ws, 6)
        stats = httpx.get(f"{url}/stats").json()
    assert [a.get("error") for a in got] == [None, None, None, "backlog_full", "backlog_full", None]
    assert [a["event_id"] for a in got[3:5]] == ["a3", "a4"]
    assert await stored_ids(redis_url) == {1: ["a0", "a1", "a2"], 2: ["b"]}
    assert (stats["accepted"], stats["refused"]) == (4, 2)


async def test_handshake_needs_the_token(redis_url: str) -> None:
    """With API_TOKEN the handshake is refused 401 without it or with a wrong one, and
    accepted with the Authorization header or the token query parameter."""
    with api_process(redis_url, API_TOKEN=TOKEN) as (url, _):
        for bad in (ws_url(url), ws_url(url) + "?token=wrong"):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(bad):
                    pass
            assert refused.value.response.status_code == 401
            assert b"API token" in refused.value.response.body
        header = {"authorization": f"Bearer {TOKEN}"}
        async with connect(ws_url(url), additional_headers=header) as ws:
            await ws.send(orjson.dumps(event(1, "by-header")))
            assert "seq" in (await answers(ws, 1))[0]
        async with connect(ws_url(url) + f"?token={TOKEN}") as ws:
            await ws.send(orjson.dumps(event(1, "by-query")))
            assert "seq" in (await answers(ws, 1))[0]


async def test_redis_killed_mid_stream_answers_only_what_is_stored(tmp_path: Path) -> None:
    """kill -9 of redis-server (AOF, fsync always) while a client streams 3,000 events: the
    stream answers `unavailable` and closes; the client keeps reconnecting and, once Redis is
    back, sends its unanswered tail again. Every event is stored exactly once, in order: none
    that was answered was lost, none that was sent twice is queued twice."""
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    try:
        with api_process(server.url) as (url, _):
            plan = [NewEvent(i % 50 + 1, f"k{i}", {"i": i}) for i in range(3000)]
            client = StreamClient(url, settings(server.url), connections=2, retry_s=30)
            answered: list[int] = []
            sending = asyncio.create_task(client.send(plan, 10, 1500, answered.append))
            while len(answered) < 800:
                await asyncio.sleep(0.01)
            assert server.process is not None
            server.process.kill()
            server.process.wait()
            await asyncio.sleep(1.0)
            server.start()
            got = await asyncio.wait_for(sending, 60)
        assert got.resends > 0 and "unavailable" in got.first_error
        assert (got.accepted + got.duplicates, got.invalid, got.refused) == (3000, 0, 0)
        assert await stored_ids(server.url) == per_account(plan)
    finally:
        server.stop()


async def test_back_pressure_holds_memory_flat_while_redis_is_stopped(
    redis_server: RedisServer, redis_url: str
) -> None:
    """A client sends single events as fast as it can while redis-server is SIGSTOPped for
    3 s: the API stops reading once WS_MAX_UNACKED wait, so the client's sends block and the
    API's memory stays flat; after SIGCONT every event is answered and stored once."""
    with api_process(redis_url, WS_MAX_UNACKED="1000") as (url, pid):
        sent = answered = 0
        redis_back = asyncio.Event()
        async with connect(ws_url(url), compression=None) as ws:

            async def flood() -> None:
                nonlocal sent
                while not redis_back.is_set():
                    await ws.send(orjson.dumps(event(sent % 100 + 1, f"f{sent}")), text=True)
                    sent += 1

            async def read() -> None:
                nonlocal answered
                async for _ in ws:
                    answered += 1

            reader = asyncio.create_task(read())
            flooding = asyncio.create_task(flood())
            await asyncio.sleep(0.5)  # flowing
            before = rss_kib(pid)
            assert redis_server.process is not None
            os.kill(redis_server.process.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(1.5)
                stalled_at = sent
                await asyncio.sleep(1.5)
                during = rss_kib(pid)
                blocked = sent - stalled_at
            finally:
                os.kill(redis_server.process.pid, signal.SIGCONT)
            redis_back.set()
            await asyncio.wait_for(flooding, 30)
            deadline = time.monotonic() + 30
            while answered < sent and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            reader.cancel()
    assert blocked == 0, f"the client could still send {blocked} events with Redis stopped"
    assert during - before < 40 * 1024, f"API RSS grew {(during - before) / 1024:.0f} MiB"
    assert answered == sent
    stored = await stored_ids(redis_url)
    ids = [i for account in stored.values() for i in account]
    assert len(ids) == len(set(ids)) == sent


def test_recorded_workload_replays_the_same_order_per_account(
    api: ApiProcess, redis_url: str, consumers: Consumers, tmp_path: Path
) -> None:
    """gen --out records a workload; gen --from replays it over 3 streams: consumers handle
    each account's events in the recorded order, and evq report finds the run."""
    recorded = tmp_path / "workload.jsonl"
    env = {"REDIS_URL": redis_url, "EVENT_LOG": str(consumers.event_log)}
    wrote = CliRunner().invoke(
        app, ["gen", "--out", str(recorded), "--events", "600", "--accounts", "40"], env=env
    )
    assert wrote.exit_code == 0, wrote.output
    lines = [orjson.loads(line) for line in recorded.read_bytes().splitlines()]
    expected: dict[int, list[str]] = collections.defaultdict(list)
    for line in lines:
        expected[line["account_id"]].append(line["event_id"])
    replay = CliRunner().invoke(
        app,
        [
            *("gen", "--from", str(recorded), "--via", "ws", "--connections", "3"),
            *("--batch", "7", "--api-url", api.url, "--slots", "4"),
        ],
        env=env,
    )
    assert replay.exit_code == 0, replay.output
    assert "600 accepted, 0 duplicates" in replay.output
    consumers.start(burst=True)
    wait_burst(consumers.procs)
    acked = assert_all_acked_once_in_order(consumers.event_log, 600)
    handled: dict[int, list[str]] = collections.defaultdict(list)
    for a in sorted(acked, key=lambda a: a.started_ns):
        handled[a.account].append(a.event_id)
    assert handled == expected
    run = read_log([consumers.event_log], latest_run=True)
    assert run.accepted == 600 and len(run.attempts) == 600
    assert run.id_prefix == lines[0]["event_id"].split("-")[0] + "-"


MEMORY_BOUND_MIB = 256  # what docs/security.md promises for one API process


async def test_adversarial_streams_cannot_exhaust_the_api(redis_url: str) -> None:
    """Three streams flood frames of 1,000 events with 7 KiB payloads each (resending the
    same ids, so Redis stays small) and never read an answer; a fourth, polite stream still
    gets each of its events answered within a second, and the API stays under
    MEMORY_BOUND_MIB of RSS."""
    payload = "x" * 7000
    with api_process(redis_url) as (url, pid):
        stop = asyncio.Event()
        peak = rss_kib(pid)

        async def flood(n: int) -> int:
            sent = 0
            frame = orjson.dumps([event(n * 1000 + i, f"a{n}-{i}", p=payload) for i in range(1000)])
            async with connect(ws_url(url), compression=None, max_size=None) as ws:
                while not stop.is_set():
                    try:
                        await asyncio.wait_for(ws.send(frame, text=True), 0.5)
                    except TimeoutError:
                        continue  # held back: the API stopped reading this stream
                    sent += 1
            return sent

        async def polite() -> list[float]:
            waits = []
            async with connect(ws_url(url), compression=None) as ws:
                for i in range(20):
                    started = time.monotonic()
                    await ws.send(orjson.dumps(event(99_999, f"polite-{i}")), text=True)
                    answer = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                    assert answer["event_id"] == f"polite-{i}" and "error" not in answer
                    waits.append(time.monotonic() - started)
                    await asyncio.sleep(0.1)
            return waits

        floods = [asyncio.create_task(flood(n)) for n in range(3)]
        await asyncio.sleep(1)
        polite_waits = asyncio.create_task(polite())
        while not polite_waits.done():
            peak = max(peak, rss_kib(pid))
            await asyncio.sleep(0.1)
        stop.set()
        frames = await asyncio.gather(*floods)
        peak = max(peak, rss_kib(pid))
    assert min(frames) >= 2, f"the floods sent only {frames} frames"
    assert peak < MEMORY_BOUND_MIB * 1024, f"API RSS reached {peak / 1024:.0f} MiB"
    assert max(polite_waits.result()) < 1.0, polite_waits.result()
