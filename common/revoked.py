"""Which API keys are revoked, as a worker process sees it: a job accepted before its key was revoked
and still queued must not start (a leaked key's queued work stops with the key).

The set is Postgres's (``api_keys.revoked_at``), cached per process and reloaded when the key-change
counter (``common/apikeys.py``) moves — read at most every :data:`CHECK_SECONDS`, from the job's own
path, no thread — so a revoke reaches every worker within about a second. Whatever fails (Redis,
Postgres) the last set loaded keeps answering, with one log line per outage; :data:`RELOAD_SECONDS`
bounds how stale it gets once the signal is unreadable.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

import redis
import sqlalchemy.exc

log = logging.getLogger(__name__)

CHECK_SECONDS = 0.25
RELOAD_SECONDS = 30.0


class RevokedKeys:
    """``load`` returns the ids of every revoked key; ``version`` the key-change counter."""

    def __init__(self, load: Callable[[], set[str]], version: Callable[[], str | None], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._load = load
        self._version = version
        self._clock = clock
        self._ids: set[str] = set()
        self._seen: str | None = None
        self._loaded_at = -math.inf
        self._checked_at = -math.inf
        self._failing = False
        self._lock = threading.Lock()

    def __call__(self, key_id: str | None) -> bool:
        """Whether ``key_id`` was revoked (as of at most about a second ago)."""
        if key_id is None:
            return False
        # one refresh at a time; the others use the set they have — unless none was loaded yet: then
        # they wait for the refresh in progress (a job must not start on an empty set by accident)
        never_loaded = self._loaded_at == -math.inf
        if (never_loaded or self._due()) and self._lock.acquire(blocking=never_loaded):
            try:
                if self._due():
                    self._refresh(self._clock())
            finally:
                self._lock.release()
        return key_id in self._ids

    def _due(self) -> bool:
        return self._clock() - self._checked_at >= CHECK_SECONDS

    def _refresh(self, now: float) -> None:
        self._checked_at = now
        try:
            version = self._version()
            if version != self._seen or now - self._loaded_at >= RELOAD_SECONDS:
                self._ids, self._seen, self._loaded_at = self._load(), version, now
        except (redis.RedisError, sqlalchemy.exc.SQLAlchemyError, OSError) as exc:
            if not self._failing:
                log.warning("revoked API keys not refreshed (%s); the last set loaded answers",
                            type(exc).__name__)
            self._failing = True
            return
        if self._failing:
            log.warning("revoked API keys refreshed again")
        self._failing = False
