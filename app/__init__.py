"""evq: per-account ordered event processing on Redis."""

from app.engine import Event, PushResult, Queue
from app.settings import Settings

__all__ = ["Event", "PushResult", "Queue", "Settings"]
