"""The dashboard and the API docs in a real browser (Debian's Chromium, driven headless by
Playwright) against the real local stack, with no network beyond the machine."""

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stack import REPO
from stack.servers import wait_for
from tests.e2e.test_stack import Stack, api_up
from tests.support import api_process

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed ('apt-get install chromium'; make test does it"
    " when run as root)",
)
TOKEN = "dashboard-token"
# No network beyond this machine: every host but localhost fails to resolve.
OFFLINE = [
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LONG_ACCOUNT = 5000  # 40 events: held by a consumer for seconds while the test looks


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """The local stack with API_TOKEN, 2 x 10 slots of 0.2 s, and a handler that fails
    poison events until the file FIXED_MARKER names exists."""
    running = Stack(tmp_path / "var")
    running.env.update(
        API_TOKEN=TOKEN,
        CONCURRENCY="10",
        PROCESS_SECONDS="0.2",
        MAX_ATTEMPTS="1",
        HANDLER="tests.support:poisoned_until_fixed",
        FIXED_MARKER=str(tmp_path / "fixed"),
        PYTHONPATH=str(REPO),
    )
    running.make("up")
    try:
        yield running
    finally:
        running.make("down")


@pytest.fixture
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=OFFLINE)
        yield launched
        launched.close()


def number(page: Any, selector: str) -> int:
    text = page.locator(selector).text_content() or ""
    return int(text.replace(",", "")) if text.replace(",", "").isdigit() else -1


def test_dashboard_moves_while_a_run_drains(stack: Stack, browser: Any, tmp_path: Path) -> None:
    """The page asks for the token once, then shows the backlog falling and a chart with
    points, an account's owner, and a dead letter that its Replay button brings back to
    acked (after the fix is deployed)."""
    wait_for(lambda: api_up(stack.api), 30, "the API")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    events = [
        {"account_id": 7, "event_id": "poison-1", "payload": {"poison": True}},
        *({"account_id": LONG_ACCOUNT, "event_id": f"long-{i}"} for i in range(40)),
    ]
    httpx.post(
        f"{stack.api}/events/batch", json={"events": events}, headers=auth
    ).raise_for_status()
    stack.run(
        "gen", "--events", "2000", "--accounts", "100", "--via", "api", "--api-url", stack.api
    )

    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(f"{stack.api}/")
    page.locator("#token").fill(TOKEN)
    page.locator("#token-form button").click()
    # Polled from Python: the page's CSP (no eval) forbids Playwright's string predicates.
    points = page.locator("#chart")
    until(page, lambda: int(points.get_attribute("data-points") or 0) >= 2)
    first = number(page, "#backlog")
    assert first > 0

    page.locator("#account-input").fill(str(LONG_ACCOUNT))
    page.locator("#account-go").click()
    owner = page.locator("#account-owner")
    until(page, lambda: owner.count() > 0 and owner.inner_text().startswith("token "))
    until(page, lambda: number(page, "#backlog") < first)
    assert int(page.locator("#chart").get_attribute("data-points")) >= 3
    shot = Path(os.environ.get("DASHBOARD_SCREENSHOT", tmp_path / "dashboard.png"))
    page.screenshot(path=str(shot), full_page=True)

    row = page.locator('tr[data-event-id="poison-1"]')
    row.wait_for(timeout=30_000)
    Path(stack.env["FIXED_MARKER"]).touch()
    row.locator("button.replay").click()

    def acked() -> bool:
        found = httpx.get(f"{stack.api}/accounts/7/events/poison-1", headers=auth).json()
        return bool(found.get("state") == "acked")

    wait_for(acked, 30, "the replayed dead letter acked")
    assert all(url.startswith(stack.api) for url in requests), requests


def until(page: Any, condition: Callable[[], bool], timeout_s: float = 30) -> None:
    """Poll `condition` while the page runs, failing after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the dashboard did not get there"
        page.wait_for_timeout(100)


@pytest.mark.parametrize(
    ("path", "rendered"), [("/docs", ".opblock"), ("/redoc", "[data-section-id]")]
)
def test_api_docs_render_offline(
    redis_url: str, browser: Any, path: str, rendered: str, tmp_path: Path
) -> None:
    """Swagger UI and ReDoc load from the package: the operations render with no network
    beyond the machine, and no script, style sheet or data comes from another host (ReDoc's
    footer badge, an image from its CDN, is the one thing missing offline)."""
    with api_process(redis_url, API_TOKEN=TOKEN) as (api, _):
        page = browser.new_page()
        requests: list[str] = []
        page.on(
            "request",
            lambda request: request.resource_type != "image" and requests.append(request.url),
        )
        page.goto(f"{api}{path}")
        page.locator(rendered).first.wait_for(timeout=20_000)
        page.screenshot(path=str(tmp_path / "docs.png"))
        assert "/events/batch" in page.content()
        assert all(url.startswith((api, f"blob:{api}")) for url in requests), requests
