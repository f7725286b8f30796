"""Settings: blocking calls stay below the socket timeout; a timeout the lease cannot absorb is
refused with a message, not a traceback."""

import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from stack import REPO
from tests.support import settings

SECONDS = st.floats(0.01, 1000, allow_nan=False)


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
