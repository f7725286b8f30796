"""The engine: everything that talks to Redis. Callers use this face; which file inside holds
what is the engine's own business."""

from app.engine.connection import TRANSIENT, UNREACHABLE, Nodes
from app.engine.events import (
    MAX_ACCOUNT_ID,
    ClaimInterrupted,
    Event,
    LayoutMismatch,
    NewEvent,
    Next,
    PushResult,
    RedisFull,
    Step,
    UnsafeRedis,
    Won,
)
from app.engine.queue import Queue, open_queue

__all__ = [
    "MAX_ACCOUNT_ID",
    "TRANSIENT",
    "UNREACHABLE",
    "ClaimInterrupted",
    "Event",
    "LayoutMismatch",
    "NewEvent",
    "Next",
    "Nodes",
    "PushResult",
    "Queue",
    "RedisFull",
    "Step",
    "UnsafeRedis",
    "Won",
    "open_queue",
]
