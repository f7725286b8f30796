"""What evq requires of Redis and how it talks to one that asks for credentials: an evicting
Redis is refused, passwords and ACL users work, and no message shows a password."""

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as sync_redis

from app.consumer import process
from app.engine import NewEvent, UnsafeRedis, guard, open_queue
from stack import REPO
from stack.servers import RedisServer, free_port, running
from tests.support import assert_all_acked_once_in_order, settings, sleeping

PASSWORD = "s3cret-pw"


def evq(url: str, *args: str, timeout: float = 30, **env: str) -> subprocess.CompletedProcess[str]:
    """`evq <args>` against `url`, to completion."""
    values = {**os.environ, "PYTHONPATH": str(REPO), "REDIS_URL": url, **env}
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        env=values,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def test_a_redis_turning_evicting_later_stops_consumers_and_pushes(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Switched to allkeys-lru while evq runs: a running consumer stops with a
    `redis_evicting` line, and pushes are refused until the policy is noeviction again."""
    monkeypatch.setattr(process, "GUARD_EVERY_S", 0.2)
    config = settings(redis_server.url, event_log=tmp_path / "event.log")
    admin = sync_redis.Redis(port=redis_server.port)
    async with open_queue(config) as queue:
        await queue.push_many([NewEvent(1, "before")])
        running_consumer = asyncio.ensure_future(process.consume(queue, sleeping(config), config))
        await asyncio.sleep(0.5)
        admin.config_set("maxmemory-policy", "allkeys-lru")
        try:
            consumer = await asyncio.wait_for(running_consumer, 10)
            await asyncio.sleep(guard.ROOM_CHECK_S)
            with pytest.raises(UnsafeRedis, match="allkeys-lru"):
                await queue.push_many([NewEvent(1, "during")])
        finally:
            admin.config_set("maxmemory-policy", "noeviction")
            admin.close()
        await asyncio.sleep(guard.ROOM_CHECK_S)
        assert (await queue.push_many([NewEvent(1, "after")]))[0].queued
    assert consumer.failing
    assert "redis_evicting" in config.event_log.read_text()


@pytest.fixture
def evicting(tmp_path: Path) -> Iterator[RedisServer]:
    with running(RedisServer(tmp_path, options=("--maxmemory-policy", "allkeys-lru"))) as server:
        yield server


def test_an_evicting_redis_is_refused(evicting: RedisServer, tmp_path: Path) -> None:
    """maxmemory-policy allkeys-lru: the consumer and the API refuse to start (exit 2), saying
    why and how to fix it; EVQ_ALLOW_EVICTION=1 runs anyway, with a warning."""
    log = str(tmp_path / "event.log")
    consumer = evq(evicting.url, "consume", EVENT_LOG=log)
    assert consumer.returncode == 2
    assert "maxmemory-policy allkeys-lru" in consumer.stderr
    assert "noeviction" in consumer.stderr and "EVQ_ALLOW_EVICTION=1" in consumer.stderr
    assert "Traceback" not in consumer.stderr
    api = evq(evicting.url, "api", API_PORT=str(free_port()), EVENT_LOG=log)
    assert api.returncode == 2
    assert "maxmemory-policy allkeys-lru" in api.stderr and "Traceback" not in api.stderr
    allowed = evq(evicting.url, "stats", EVQ_ALLOW_EVICTION="1")
    assert allowed.returncode == 0, allowed.stderr
    assert "WARNING" in allowed.stderr and '"accepted":0' in allowed.stdout


@pytest.fixture
def protected(tmp_path: Path) -> Iterator[RedisServer]:
    with running(RedisServer(tmp_path, password=PASSWORD)) as server:
        yield server


def test_password_and_acl_user_work_and_are_never_shown(protected: RedisServer) -> None:
    """AUTH with the default user's password and with an ACL user works; a wrong password
    is a clear error whose URL shows `***` in place of the password."""
    url = f"redis://:{PASSWORD}@127.0.0.1:{protected.port}/0"
    assert evq(url, "stats").returncode == 0
    admin = sync_redis.Redis(port=protected.port, password=PASSWORD)
    admin.acl_setuser(
        "evq", enabled=True, passwords=["+acl-pw"], keys="*", channels="*", commands=["+@all"]
    )
    admin.close()
    assert evq(f"redis://evq:acl-pw@127.0.0.1:{protected.port}/0", "stats").returncode == 0
    wrong = evq(f"redis://evq:not-the-pw@127.0.0.1:{protected.port}/0", "stats")
    assert wrong.returncode == 1
    assert f"redis://evq:***@127.0.0.1:{protected.port}/0" in wrong.stderr
    assert "not-the-pw" not in wrong.stderr + wrong.stdout
    assert "Traceback" not in wrong.stderr


def test_a_password_file_logs_in_and_a_missing_one_is_a_usage_error(
    protected: RedisServer, tmp_path: Path
) -> None:
    """REDIS_PASSWORD_FILE supplies the password a URL leaves out (the Docker stack's Redis);
    a file that cannot be read is a one-line error with exit 2."""
    url = f"redis://127.0.0.1:{protected.port}/0"
    secret = tmp_path / "redis_password"
    secret.write_text(PASSWORD + "\n")
    assert evq(url, "stats").returncode == 1
    assert evq(url, "stats", REDIS_PASSWORD_FILE=str(secret)).returncode == 0
    missing = evq(url, "stats", REDIS_PASSWORD_FILE=str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert "REDIS_PASSWORD_FILE" in missing.stderr and "Traceback" not in missing.stderr


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[tuple[RedisServer, str]]:
    """A redis-server that also listens with TLS (a certificate of a throwaway CA), and the
    rediss:// URL that trusts that CA."""
    ca_key, ca, key, csr, cert, ext = (
        tmp_path / name
        for name in ("ca.key", "ca.crt", "redis.key", "redis.csr", "redis.crt", "san.ext")
    )

    def openssl(*args: object) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=evq-ca",
        "-keyout",
        ca_key,
        "-out",
        ca,
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        key,
        "-out",
        csr,
    )
    ext.write_text("subjectAltName = IP:127.0.0.1\n")
    openssl(
        "x509",
        "-extfile",
        ext,
        "-req",
        "-in",
        csr,
        "-CA",
        ca,
        "-CAkey",
        ca_key,
        "-CAcreateserial",
        "-days",
        "1",
        "-out",
        cert,
    )
    port = free_port()
    options = (
        "--tls-port",
        str(port),
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(ca),
        "--tls-auth-clients",
        "no",
    )
    with running(RedisServer(tmp_path / "data", options=options)) as server:
        yield server, f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required"


def test_tls_connection_drains_in_order(tls: tuple[RedisServer, str], tmp_path: Path) -> None:
    """REDIS_URL=rediss://...: gen, a burst consumer and stats talk TLS to Redis and every event
    is acked once, in order. The server's certificate is checked: without the CA, no call."""
    _, url = tls
    log = tmp_path / "event.log"
    gen = evq(url, "gen", "--events=200", "--accounts=20", EVENT_LOG=str(log))
    assert gen.returncode == 0, gen.stderr
    consumer = evq(url, "consume", "--burst", EVENT_LOG=str(log), PROCESS_SECONDS="0")
    assert consumer.returncode == 0, consumer.stderr
    assert_all_acked_once_in_order(log, 200)
    untrusted = url.split("?")[0] + "?ssl_cert_reqs=required"
    refused = evq(untrusted, "stats", REDIS_TIMEOUT_SECONDS="2")
    assert refused.returncode == 1
    assert "certificate verify failed" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"REDIS_URL": "garbage"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://127.0.0.1:1/abc"}, "REDIS_URL"),
        ({"REDIS_URL": "redis+cluster://a,b:1"}, "REDIS_URL"),
        ({"PROCESS_SECONDS": "inf"}, "PROCESS_SECONDS"),
        ({"LEASE_SECONDS": "0.001"}, "LEASE_SECONDS"),
        ({"REAPER_SECONDS": "nan"}, "REAPER_SECONDS"),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_2(env: dict[str, str], named: str) -> None:
    """A setting that cannot work is a one-line error naming it, exit 2, never a traceback."""
    done = evq(env.pop("REDIS_URL", "redis://127.0.0.1:1/0"), "stats", **env)
    assert done.returncode == 2
    assert named in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_what_redis_refuses_or_never_answers_is_a_clear_error(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A database out of range, a Redis that hangs and an event log that cannot be written
    each end in one line and an exit status, never a traceback."""
    out_of_range = evq(f"redis://127.0.0.1:{redis_server.port}/99", "stats")
    assert out_of_range.returncode == 1 and "refused" in out_of_range.stderr
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        hung = evq(redis_server.url, "stats", REDIS_TIMEOUT_SECONDS="0.5")
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert hung.returncode == 1 and "did not answer" in hung.stderr
    blocked = tmp_path / "a-file"  # a directory that is a file: even root cannot write there
    blocked.write_text("")
    unwritable = evq(redis_server.url, "consume", "--burst", EVENT_LOG=str(blocked / "event.log"))
    assert unwritable.returncode == 2 and "cannot write" in unwritable.stderr
    for done in (out_of_range, hung, unwritable):
        assert "Traceback" not in done.stderr, done.stderr
