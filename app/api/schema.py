"""What the API and the stream take in and answer: one event's schema, and per-event results."""

import json
import math
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, JsonValue, StrictInt, field_validator

from app.engine import MAX_ACCOUNT_ID, NewEvent, PushResult

MAX_PAYLOAD_BYTES = 64 * 1024
MAX_BATCH = 1000
MAX_EVENT_ID_BYTES = 128


class EventIn(BaseModel):
    """One event to queue for an account."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"account_id": 42, "event_id": "order-7-paid", "payload": {"cents": 1999}}]
        },
    )

    account_id: StrictInt = Field(
        gt=0,
        le=MAX_ACCOUNT_ID,
        description="The account, a JSON integer; its events are handled in order.",
    )
    event_id: str = Field(
        min_length=1,
        max_length=MAX_EVENT_ID_BYTES,
        description=f"Idempotency key, 1 to {MAX_EVENT_ID_BYTES} bytes of UTF-8: re-sent within"
        " the dedupe window, the event is queued once.",
    )
    payload: JsonValue = Field(
        default=None, description="Any JSON with finite numbers, at most 64 KiB serialized."
    )

    @field_validator("event_id")
    @classmethod
    def _fits(cls, event_id: str) -> str:
        try:
            size = len(event_id.encode())
        except UnicodeEncodeError as exc:  # a lone surrogate escape, "\ud800"
            raise ValueError("event_id is not valid UTF-8 text") from exc
        if size > MAX_EVENT_ID_BYTES:
            raise ValueError(f"event_id is longer than {MAX_EVENT_ID_BYTES} bytes in UTF-8")
        return event_id

    @field_validator("payload")
    @classmethod
    def _storable(cls, payload: JsonValue) -> JsonValue:
        if not _finite(payload):
            raise ValueError(
                "payload has a number that is not finite (NaN, Infinity, or too large for a"
                " double, like 1e400): JSON cannot carry it"
            )
        try:
            size = len(orjson.dumps(payload))
        except orjson.JSONEncodeError as exc:  # integers beyond 64 bits
            raise ValueError(f"payload cannot be stored: {exc}") from exc
        if size > MAX_PAYLOAD_BYTES:
            raise ValueError(f"payload is larger than {MAX_PAYLOAD_BYTES} bytes serialized")
        return payload

    def new_event(self) -> NewEvent:
        return NewEvent(self.account_id, self.event_id, self.payload)


def _finite(value: JsonValue) -> bool:
    """Whether every number in `value` is finite (walked without recursion: a 64 KiB payload
    can nest thousands deep)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


class BatchIn(BaseModel):
    """Up to 1,000 events, validated as a whole before any is queued."""

    model_config = ConfigDict(extra="forbid")

    events: list[EventIn] = Field(min_length=1, max_length=MAX_BATCH)


class Accepted(BaseModel):
    """The result for one event: its seq, and whether it was a duplicate."""

    account_id: int
    event_id: str
    seq: int
    duplicate: bool = False


class Refused(BaseModel):
    """An event not queued: `error` says why (`backlog_full`: its account already has
    MAX_BACKLOG_PER_ACCOUNT events waiting; `unavailable`: the Redis master of its shard
    failed, so it is not stored or not known to be), `detail` says it for a person."""

    account_id: int
    event_id: str
    error: str
    detail: str


class BatchAccepted(BaseModel):
    """Per-event results in request order; refused and unavailable events are not stored,
    send them again later (Retry-After)."""

    accepted: int
    duplicates: int
    refused: int = 0
    unavailable: int = 0
    results: list[Accepted | Refused]


class Problem(BaseModel):
    """Every error: a message a person can act on."""

    error: str
    detail: list[dict[str, Any]] | None = None


def result_of(event: EventIn, result: PushResult) -> Accepted | Refused:
    """The answer for one event, from what push made of it."""
    if result.fault is not None:
        return Refused(
            account_id=event.account_id,
            event_id=event.event_id,
            error="unavailable",
            detail=f"the Redis of its shard failed ({result.fault}): not stored, or not known"
            " to be; send it again (a stored one is answered as a duplicate)"[:300],
        )
    if result.refused:
        return Refused(
            account_id=event.account_id,
            event_id=event.event_id,
            error="backlog_full",
            detail=f"account {event.account_id} already has MAX_BACKLOG_PER_ACCOUNT events"
            " waiting: this event was not queued; send it again later",
        )
    # Built without validating again: every field comes from a validated event or from Redis.
    return Accepted.model_construct(
        account_id=event.account_id,
        event_id=event.event_id,
        seq=result.seq,
        duplicate=result.duplicate,
    )


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        keys = [key for key, _ in pairs]
        repeated = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"the key {repeated!r} appears twice in one object")
    return found


def strict_loads(data: str | bytes) -> Any:
    """JSON as the API takes it: an object that names a key twice is refused, as a parser that
    keeps the last one could queue an event on another account than the sender meant.
    Raises json.JSONDecodeError."""
    try:
        return json.loads(data, object_pairs_hook=_no_repeated_keys)
    except json.JSONDecodeError:
        raise
    except ValueError as exc:
        text = data if isinstance(data, str) else data.decode("utf-8", "replace")
        raise json.JSONDecodeError(str(exc), text, 0) from None
