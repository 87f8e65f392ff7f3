"""One log line per interval for a failure that repeats on every request (a full disk, Redis
down, a flood of refusals): loud enough to be seen, never one line per request."""

from __future__ import annotations

import time


class LogThrottle:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}

    def allow(self, kind: str = "", interval: float | None = None) -> bool:
        """True when a line of this kind may be written now (and starts its interval)."""
        now = time.monotonic()
        if now - self._last.get(kind, float("-inf")) < (self.interval if interval is None else interval):
            return False
        self._last[kind] = now
        return True
