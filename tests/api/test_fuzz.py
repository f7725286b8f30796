"""Schemathesis fuzzes every operation of the OpenAPI schema: no input gets a 5xx."""

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from app.api.app import create_app
from app.settings import Settings
from stack.servers import RedisServer
from tests.support import api_process

# Its items share one node id, which pytest-xdist cannot tell apart: make test runs it alone.
pytestmark = pytest.mark.fuzz

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def api_url(redis_server: RedisServer) -> Iterator[str]:
    """`evq api` as a real process on a free port, on the session's Redis, with a token."""
    with api_process(redis_server.url, API_TOKEN=TOKEN) as (url, _):
        yield url


# The schema the app publishes at /openapi.json, read without a server.
schema = schemathesis.openapi.from_dict(create_app(Settings(api_token=TOKEN)).openapi())


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_gets_a_server_error(case: schemathesis.Case, api_url: str) -> None:
    """Whatever the generator sends, the answer is 2xx or 4xx, never a 5xx; a request that
    carries the API token is not refused as unauthorized."""
    response = case.call(base_url=api_url, headers=AUTH)
    assert response.status_code < 500, response.text
    if response.request.headers.get("Authorization") == AUTH["Authorization"]:
        assert response.status_code != 401, response.text
