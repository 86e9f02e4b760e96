"""Outages are not bugs: one log line per kind of outage per interval, not one per request or job."""

from __future__ import annotations

import logging
import math
import threading
import time

log = logging.getLogger(__name__)

OUTAGE_LOG_INTERVAL_S = 30.0


class OutageLog:
    """One log line per kind of outage per interval, however many requests hit it."""

    def __init__(self, interval: float = OUTAGE_LOG_INTERVAL_S) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def warn(self, kind: str, exc: BaseException, consequence: str = "answering 503") -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -math.inf) < self.interval:
                return
            self._last[kind] = now
        first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
        log.warning("%s unreachable (%s: %s); %s (logged at most every %gs)",
                    kind, type(exc).__name__, first_line, consequence, self.interval)
