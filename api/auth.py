"""Who is calling: ``Authorization: Bearer <key>``, ``x-api-key: <key>`` or ``x-goog-api-key: <key>`` (or
a key the route takes from its URL, Gemini's ``?key=``), checked against the SHA-256 hashes in Postgres
(cached per process for a few seconds).

``GATEWAY_AUTH``: ``required`` — every call needs an active key; ``off`` — no checks;
``auto`` (default) — required as soon as at least one key exists, open on a fresh install.

Postgres outages: the last key set loaded keeps answering for up to ``GATEWAY_AUTH_STALE_LIMIT``
seconds (300 by default; a key revoked during the outage works until it ends or the limit passes).
Past that limit, or when no key set was ever loaded, calls get 503 with ``Retry-After``. While
Postgres is down a reload is tried at most every :data:`OUTAGE_RETRY_SECONDS`, never by more than
one request at a time, and the outage is logged once when it starts, once if the key set goes past
its limit, and once when it ends — never a traceback per request.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping

from werkzeug.datastructures import Headers

from api.errors import OUTAGE_RETRY_AFTER_S, STORE_DOWN
from common.apikeys import hash_secret
from common.errors import AuthenticationFailed, StoreUnavailable

log = logging.getLogger(__name__)

CACHE_SECONDS = 5.0        # a revoked key stops working within this long
MISS_RELOAD_SECONDS = 0.1  # an unknown key reloads at most this often (10/s), so new keys work at once
OUTAGE_RETRY_SECONDS = 1.0  # while Postgres is down, try to reload the keys at most this often


class Authenticator:
    def __init__(self, mode: str, load_hashes: Callable[[], dict[str, str]], *,
                 stale_limit: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = mode
        self.stale_limit = stale_limit
        self._clock = clock
        self._load = load_hashes
        self._hashes: dict[str, str] = {}
        self._loaded_at = -math.inf     # when the key set was last loaded (monotonic)
        self._retry_at = -math.inf      # during an outage: no reload before this
        self._down_since: float | None = None
        self._stale_logged = False
        self._lock = threading.Lock()

    def _active(self, max_age: float = CACHE_SECONDS) -> dict[str, str]:
        """The active key set, reloaded when older than ``max_age``. During an outage: the last good
        set while it is younger than the stale limit, else :class:`StoreUnavailable`."""
        now = self._clock()
        if now - self._loaded_at > max_age and now >= self._retry_at:
            have_set = self._loaded_at > -math.inf
            # one reload at a time; the others use the set they have
            if self._lock.acquire(blocking=not have_set):
                try:
                    if self._clock() - self._loaded_at > max_age and self._clock() >= self._retry_at:
                        self._reload()
                finally:
                    self._lock.release()
        if self._down_since is not None:
            self._check_stale()
        return self._hashes

    def _reload(self) -> None:
        try:
            hashes = self._load()
        except STORE_DOWN as exc:
            self._retry_at = self._clock() + OUTAGE_RETRY_SECONDS
            if self._down_since is None:
                self._down_since = self._clock()
                log.warning("API key store (Postgres) unreachable (%s); checking keys against the last set "
                            "loaded for up to %gs after it was loaded", type(exc).__name__, self.stale_limit)
            return
        if self._down_since is not None:
            log.warning("API key store (Postgres) reachable again after %.1fs",
                        self._clock() - self._down_since)
        self._hashes, self._loaded_at = hashes, self._clock()
        self._down_since, self._stale_logged, self._retry_at = None, False, -math.inf

    def _check_stale(self) -> None:
        age = self._clock() - self._loaded_at
        if age <= self.stale_limit:
            return
        if not self._stale_logged:
            self._stale_logged = True
            log.warning("no API key set younger than %gs and Postgres is still down: answering 503",
                        self.stale_limit)
        raise StoreUnavailable("the gateway cannot check API keys right now (its database is unreachable); "
                               "retry shortly", retry_after=OUTAGE_RETRY_AFTER_S)

    def authenticate(self, headers: Headers | Mapping[str, str], query_key: str | None = None) -> str | None:
        """The caller's key id (None when auth is off or open). ``query_key``: a key the caller put in
        the URL, for the routes that accept one. Raises AuthenticationFailed, or StoreUnavailable when
        no trustworthy key set is at hand."""
        if self.mode == "off":
            return None
        active = self._active()
        secret = presented_key(headers) or query_key
        if self.mode == "auto" and not active and secret:
            # the set we hold says "no keys yet" but the caller shows one: the first key may have been
            # created since (up to CACHE_SECONDS ago) — its calls must not be taken as anonymous
            active = self._active(MISS_RELOAD_SECONDS)
        if self.mode == "auto" and not active:
            return None
        if not secret:
            raise AuthenticationFailed("missing API key: send 'Authorization: Bearer <key>', 'x-api-key' "
                                       "or 'x-goog-api-key'")
        digest = hash_secret(secret)
        key_id = active.get(digest)
        if key_id is None:
            key_id = self._active(MISS_RELOAD_SECONDS).get(digest)
        if key_id is None:
            raise AuthenticationFailed("invalid or revoked API key")
        return key_id

    def identify(self, secret: str) -> str | None:
        """The id of the active key whose secret this is, whatever the mode (the admin API's check)."""
        digest = hash_secret(secret)
        return self._active().get(digest) or self._active(MISS_RELOAD_SECONDS).get(digest)


def presented_key(headers: Headers | Mapping[str, str]) -> str | None:
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return headers.get("x-api-key") or headers.get("x-goog-api-key") or None
