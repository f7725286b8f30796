"""The receivers of docs/delivery.md take what evq's HTTP handler sends, and refuse a changed
body, an old timestamp, a wrong secret and a stale owner's token."""

import base64
import importlib.util
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from types import ModuleType

import httpx
import orjson
import pytest
import uvicorn

from app.engine import Event
from app.handlers.delivery import HttpDelivery
from stack import REPO
from stack.servers import free_port, wait_for
from tests.support import settings

RECEIVERS = REPO / "docs" / "receivers"
SECRET = "whsec_" + base64.b64encode(b"a receiver's secret of 32 bytes.").decode()
Post = Callable[[bytes, dict[str, str]], int]


def example(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """An example receiver, loaded as its README runs it: beside evq_signature.py."""
    monkeypatch.setenv("DELIVERY_SECRET", SECRET)
    monkeypatch.syspath_prepend(str(RECEIVERS))
    monkeypatch.delitem(sys.modules, "evq_signature", raising=False)
    spec = importlib.util.spec_from_file_location(name, RECEIVERS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["fastapi_receiver", "plain_receiver"])
def post(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Post]:
    """POST a body with headers to one of the example receivers; its status."""
    module = example(request.param, monkeypatch)
    if request.param == "fastapi_receiver":
        port = free_port()
        served = uvicorn.Server(uvicorn.Config(module.app, port=port, log_level="warning"))
        thread = threading.Thread(target=served.run, daemon=True)
        thread.start()
        wait_for(lambda: served.started, 10, "the FastAPI receiver")
        yield lambda body, headers: _post(f"http://127.0.0.1:{port}/hooks/4", body, headers)
        served.should_exit = True
        thread.join(10)
        return
    server = ThreadingHTTPServer(("127.0.0.1", 0), module.Hooks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hooks/4"
    yield lambda body, headers: _post(url, body, headers)
    server.shutdown()
    server.server_close()


def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    return httpx.post(url, content=body, headers=headers).status_code


def sent(token: int, secret: str = SECRET) -> tuple[bytes, dict[str, str]]:
    """What evq's HTTP handler sends for an event of account 4."""
    delivery = HttpDelivery(
        settings("redis://x", delivery_url="http://receiver/hooks/4", delivery_secret=secret)
    )
    event = Event(account=4, seq=17, event_id="evt-1", payload={"n": 1}, attempt=1, token=token)
    body = orjson.dumps({"account_id": 4, "event_id": "evt-1", "seq": 17, "payload": {"n": 1}})
    return body, delivery.headers(event, body)


def test_a_delivery_from_evq_is_taken(post: Post) -> None:
    assert post(*sent(token=100)) == 200


def test_a_changed_body_or_timestamp_or_another_secret_is_refused(post: Post) -> None:
    body, headers = sent(token=100)
    assert post(body.replace(b'"n":1', b'"n":2'), headers) == 401
    sent_at = int(headers["webhook-timestamp"])
    assert post(body, {**headers, "webhook-timestamp": str(sent_at - 1)}) == 401
    old = {**headers, "webhook-timestamp": str(sent_at - 3600)}
    assert post(body, old) == 401
    other = "whsec_" + base64.b64encode(b"somebody else's secret, 32 bytes").decode()
    assert post(*sent(token=100, secret=other)) == 401


def test_a_stale_owner_is_refused_once_a_newer_one_delivered(post: Post) -> None:
    assert post(*sent(token=100)) == 200
    assert post(*sent(token=200)) == 200
    assert post(*sent(token=100)) == 409, "the owner that lost the account"
    assert post(*sent(token=200)) == 200, "the owner of now, retrying"
