"""Settings: blocking calls stay below the socket timeout; a timeout the lease cannot absorb is
refused with a message, not a traceback."""

import base64
import os
import re
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from stack import REPO
from tests.support import settings

SECONDS = st.floats(0.01, 1000, allow_nan=False)
SECRET = "whsec_" + base64.b64encode(b"a secret of at least 16 bytes").decode()


@given(block=SECONDS, lease=st.floats(1, 1000), share=st.none() | st.floats(0.01, 0.5))
def test_claim_block_stays_below_the_socket_timeout(
    block: float, lease: float, share: float | None
) -> None:
    """Whatever CLAIM_BLOCK_SECONDS, LEASE_SECONDS and REDIS_TIMEOUT_SECONDS say, an idle claim
    blocks for less than one Redis call may take, which is at most half the lease."""
    timeout = None if share is None else lease * share
    found = settings(
        "redis://x", claim_block_seconds=block, lease_seconds=lease, redis_timeout_seconds=timeout
    )
    assert 0 < found.claim_block_s < found.socket_timeout_s <= lease / 2


def test_default_socket_timeout() -> None:
    """Without REDIS_TIMEOUT_SECONDS a call may take 5 s, or a third of a short lease."""
    assert settings("redis://x", lease_seconds=30).socket_timeout_s == 5
    assert settings("redis://x", lease_seconds=3).socket_timeout_s == 1


def test_timeout_beyond_half_the_lease_is_refused() -> None:
    """A socket timeout over half the lease would leave no time to retry within the lease."""
    with pytest.raises(ValidationError, match="at most half of LEASE_SECONDS"):
        settings("redis://x", lease_seconds=4, redis_timeout_seconds=3)


def test_cli_says_what_is_wrong_with_the_timeout() -> None:
    """The CLI turns the refusal into a usage error (exit 2) naming both settings."""
    env = {**os.environ, "LEASE_SECONDS": "4", "REDIS_TIMEOUT_SECONDS": "3"}
    done = subprocess.run(
        [sys.executable, "-m", "app", "stats"], env=env, cwd=REPO, capture_output=True, check=False
    )
    assert done.returncode == 2
    assert b"REDIS_TIMEOUT_SECONDS (3) must be at most half of LEASE_SECONDS (4)" in done.stderr
    assert b"Traceback" not in done.stderr


def test_idle_expiry_shorter_than_the_dedupe_window_is_refused() -> None:
    """An account may not be forgotten before the event ids it accepted."""
    with pytest.raises(ValidationError, match=r"ACCOUNT_IDLE_SECONDS \(60\) must be at least"):
        settings("redis://x", account_idle_seconds=60, dedupe_seconds=3600)


@pytest.mark.parametrize(("value", "cap"), [("", None), ("  ", None), ("250", 250)])
def test_blank_backlog_cap_is_none(value: str, cap: int | None) -> None:
    """docker-compose passes MAX_BACKLOG_PER_ACCOUNT="" when unset: no cap, as when absent."""
    assert settings("redis://x", max_backlog_per_account=value).max_backlog_per_account == cap


def test_backlog_cap_below_one_is_refused() -> None:
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        settings("redis://x", max_backlog_per_account=0)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("delivery_url", "ftp://host/x", "http:// or https:// URL with a host"),
        ("delivery_url", "http:///x", "http:// or https:// URL with a host"),
        ("delivery_url", "http://h/{account}/x", "{account_id} is the only placeholder"),
        ("delivery_secret", "c2VjcmV0IG9mIDI0IGJ5dGVzIGF0IGxlYXN0", "the form whsec_<base64>"),
        ("delivery_secret", "whsec_not base64!", "not base64"),
        ("delivery_secret", "whsec_bm90IGJhc2U2NCE?", "not base64"),
        ("delivery_secret", "whsec_c2hvcnQ=", "at least 16 bytes"),
        ("delivery_timeout_seconds", 30, "must be shorter than LEASE_SECONDS"),
    ],
)
def test_delivery_settings_are_checked(field: str, value: object, problem: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(problem)):
        settings("redis://x", lease_seconds=30, **{field: value})


def test_delivery_defaults() -> None:
    """A timeout of 10 s or half a short lease; a secret list; `{account_id}` kept."""
    found = settings(
        "redis://x",
        lease_seconds=8,
        delivery_url="https://h/{account_id}",
        delivery_secret=f"{SECRET} {SECRET}",
    )
    assert found.delivery_timeout_s == 4
    assert settings("redis://x", lease_seconds=60).delivery_timeout_s == 10
    assert found.delivery_keys == [b"a secret of at least 16 bytes"] * 2
    assert found.delivery_url == "https://h/{account_id}"


def test_cli_refuses_http_delivery_without_a_url_and_never_echoes_a_secret() -> None:
    env = {**os.environ, "HANDLER": "app.handlers:http", "DELIVERY_URL": ""}
    args = [sys.executable, "-m", "app", "consume"]
    done = subprocess.run(args, env=env, cwd=REPO, capture_output=True, check=False)
    assert done.returncode == 2
    assert b"HANDLER=app.handlers:http needs DELIVERY_URL" in done.stderr
    env.update(DELIVERY_URL="http://127.0.0.1:9/x", DELIVERY_SECRET="whsec_c2VjcmV0")
    done = subprocess.run(args, env=env, cwd=REPO, capture_output=True, check=False)
    assert done.returncode == 2
    assert b"DELIVERY_SECRET: a secret must hold at least 16 bytes" in done.stderr
    assert b"c2VjcmV0" not in done.stderr and b"Traceback" not in done.stderr
