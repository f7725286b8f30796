"""The API's client: what `gen --via api` pushes through."""

from collections.abc import Sequence
from typing import Any

import httpx
import orjson

from app.queue import NewEvent, PushResult
from app.settings import Settings

JSON = {"content-type": "application/json"}


def api_http(base_url: str, settings: Settings, timeout_s: float) -> httpx.AsyncClient:
    """An HTTP client for the API at `base_url`, sending API_TOKEN when one is set."""
    token = settings.api_token
    headers = {"authorization": f"Bearer {token.get_secret_value()}"} if token else {}
    return httpx.AsyncClient(base_url=base_url, timeout=timeout_s, headers=headers)


class ApiError(Exception):
    """The API answered with an error, or could not be reached."""


class ApiClient:
    """Pushes batches through `POST /events/batch` and reads `GET /stats`."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    async def push_many(self, events: Sequence[NewEvent]) -> list[PushResult]:
        """Queue events in one request; results in the order given."""
        body = {
            "events": [
                {"account_id": e.account, "event_id": e.event_id, "payload": e.payload}
                for e in events
            ]
        }
        reply = await self._request("POST", "/events/batch", content=orjson.dumps(body))
        return [
            PushResult(False, 0, True) if "error" in r else PushResult(not r["duplicate"], r["seq"])
            for r in reply["results"]
        ]

    async def live_slots(self) -> int:
        """Total slots of the live consumers, as the API sees them."""
        return int((await self._request("GET", "/stats"))["slots"])

    async def _request(
        self, method: str, path: str, content: bytes | None = None
    ) -> dict[str, Any]:
        try:
            response = await self._http.request(method, path, content=content, headers=JSON)
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach the API at {self._http.base_url}: {exc}") from exc
        try:
            found: dict[str, Any] = orjson.loads(response.content) if response.content else {}
        except orjson.JSONDecodeError:  # not the API's answer (a proxy's error page)
            found = {}
        if response.is_error:
            raise ApiError(f"{method} {path}: {response.status_code} {found.get('error', '')}")
        return found
