"""HTTP delivery (`HANDLER=app.handlers:http`): each event POSTed as JSON to DELIVERY_URL,
signed per the Standard Webhooks specification, with the fencing token in a header.

The consumer's slots are the concurrency: one delivery in flight per account, as many accounts
at once as there are slots, over one pooled keep-alive client (DELIVERY_MAX_CONNECTIONS per
host). What an answer means:

- 2xx: delivered, the event is acked.
- 408, 429, 5xx, 3xx, a timeout (DELIVERY_TIMEOUT_SECONDS) or a broken connection: nacked and
  retried with the usual backoff, or later when the answer carries `Retry-After`.
- a connection refused (the receiver is down): nacked, and retried after the backoff once a
  probe (every PROBE_S) connects again, so an outage of any length costs each waiting account
  one attempt, and deliveries resume within PROBE_S of the receiver's return.
- any other 4xx: permanent, dead-lettered at once (POISON_POLICY=park: the account waits).

The status, the first RESPONSE_BYTES of the answer and the latency go into the event log line
and a dead letter's error; /metrics counts each outcome and times each delivery.
"""

import asyncio
import base64
import contextlib
import hmac
import time
from email.utils import parsedate_to_datetime

import orjson

from app.engine import Event
from app.handlers import Delivery, Failed, HandlerUnusable
from app.handlers.http_client import Broken, Client, Unreachable
from app.settings import Settings

RESPONSE_BYTES = 256  # of an answer kept in the event log and a dead letter's error
RETRYABLE = frozenset({408, 429})  # the 4xx statuses a retry may cure
USER_AGENT = "evq-delivery/1"
PROBE_S = 0.25  # how often a receiver that refused connections is tried again


class HttpDelivery:
    """The handler: `await delivery(event)` POSTs it, returns the `Delivery` of a 2xx and
    raises `Failed` with it otherwise."""

    def __init__(self, settings: Settings) -> None:
        if settings.delivery_url is None:
            raise HandlerUnusable(
                "HANDLER=app.handlers:http needs DELIVERY_URL (where to POST each event)"
            )
        self._url = settings.delivery_url
        self._per_account = "{account_id}" in self._url
        self._keys = settings.delivery_keys
        self._timeout_s = settings.delivery_timeout_s
        connections = settings.delivery_max_connections or settings.concurrency
        self._client = Client(connections, self._timeout_s, RESPONSE_BYTES)
        self._up: dict[tuple[str, int], asyncio.Event] = {}  # per receiver: accepting?
        self._probes: set[asyncio.Task[None]] = set()

    async def __call__(self, event: Event) -> Delivery:
        body = orjson.dumps(
            {
                "account_id": event.account,
                "event_id": event.event_id,
                "seq": event.seq,
                "attempt": event.attempt,
                "payload": event.payload,
            }
        )
        url = (
            self._url.replace("{account_id}", str(event.account))
            if self._per_account
            else self._url
        )
        started = time.perf_counter()
        try:
            answer = await self._client.post(url, self.headers(event, body), body)
        except TimeoutError:
            delivery = Delivery("timeout", time.perf_counter() - started)
            raise Failed(
                f"timeout: no answer within {self._timeout_s:g} s (DELIVERY_TIMEOUT_SECONDS)",
                delivery=delivery,
            ) from None
        except (Unreachable, Broken) as exc:
            # unreachable: nothing reached the receiver, wait until it accepts again
            up = self._down(exc.host, exc.port).wait if isinstance(exc, Unreachable) else None
            raise Failed(
                f"connection: {exc}",
                retry_when=up,
                delivery=Delivery("connection", time.perf_counter() - started),
            ) from None
        except ValueError as exc:  # an event id that cannot travel in a header
            raise Failed(str(exc), permanent=True) from None
        status, text = answer.status, answer.head.decode(errors="replace")
        delivery = Delivery(f"{status // 100}xx", time.perf_counter() - started, status, text)
        if 200 <= status < 300:
            return delivery
        raise Failed(
            f"HTTP {status} in {delivery.latency_s * 1000:.0f} ms: {text}",
            permanent=400 <= status < 500 and status not in RETRYABLE,
            retry_after_s=retry_after_s(answer.retry_after),
            delivery=delivery,
        )

    def headers(self, event: Event, body: bytes) -> dict[str, str]:
        """The Standard Webhooks headers (signed now, so a late retry carries a fresh
        timestamp) and evq's: the account, seq, attempt and fencing token."""
        timestamp = str(int(time.time()))
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": event.event_id,
            "webhook-timestamp": timestamp,
            "evq-account": str(event.account),
            "evq-seq": str(event.seq),
            "evq-attempt": str(event.attempt),
            "evq-token": str(event.token),
        }
        if self._keys:
            headers["webhook-signature"] = sign(self._keys, event.event_id, timestamp, body)
        return headers

    def _down(self, host: str, port: int) -> asyncio.Event:
        """The event set once `host:port` accepts connections again; the first refusal of an
        outage starts a probe, every later one waits for the same."""
        up = self._up.get((host, port))
        if up is None or up.is_set():
            up = self._up[host, port] = asyncio.Event()
            probe = asyncio.create_task(_probe(host, port, up))
            self._probes.add(probe)
            probe.add_done_callback(self._probes.discard)
        return up

    async def aclose(self) -> None:
        for probe in self._probes:
            probe.cancel()
        self._client.close()


def sign(keys: list[bytes], message_id: str, timestamp: str, body: bytes) -> str:
    """`webhook-signature`: `v1,` and the base64 HMAC-SHA256 of `id.timestamp.body` under
    each key, space-separated (a receiver holding any one of them verifies)."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.digest(key, signed, "sha256")).decode() for key in keys
    )


def retry_after_s(value: str | None) -> float | None:
    """`Retry-After` in seconds: a number of seconds, or an HTTP date; None if absent or
    unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


async def _probe(host: str, port: int, up: asyncio.Event) -> None:
    """Connect to `host:port` every PROBE_S until it accepts, then set `up`."""
    while True:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), PROBE_S * 4)
        except (OSError, TimeoutError):
            await asyncio.sleep(PROBE_S)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        up.set()
        return
