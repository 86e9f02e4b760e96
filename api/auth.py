"""Who is calling: ``Authorization: Bearer <key>``, ``x-api-key: <key>`` or ``x-goog-api-key: <key>`` (or
a key the route takes from its URL, Gemini's ``?key=``), checked against the SHA-256 hashes in Postgres
(cached per process; reloaded within about a second of a change, see below).

Changes: every key change bumps a Redis counter (``common/apikeys.py``); each process compares it at
most every :data:`VERSION_CHECK_SECONDS` and reloads when it moved, so a new, changed or revoked key
takes effect within about a second everywhere. Whatever happens to that signal (Redis down), the set
is also reloaded every :data:`CACHE_SECONDS`.

Last use: a key's ``last_used_at`` is written in batches, at most every :data:`LAST_USED_FLUSH_SECONDS`
per process, off the request's path — never one database write per request.

``GATEWAY_AUTH``: ``required`` — every call needs an active key; ``off`` — no checks;
``auto`` (default) — required as soon as at least one key exists (revoked ones count: revoking the
last key does not reopen the gateway), open on a fresh install.

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
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Generic, TypeVar

import redis
import sqlalchemy.exc
from werkzeug.datastructures import Headers

from api.errors import OUTAGE_RETRY_AFTER_S, STORE_DOWN
from common.apikeys import hash_secret
from common.errors import AuthenticationFailed, StoreUnavailable

log = logging.getLogger(__name__)

CACHE_SECONDS = 5.0        # the set is reloaded at least this often, whatever the change signal says
MISS_RELOAD_SECONDS = 0.1  # an unknown key reloads at most this often (10/s), so new keys work at once
OUTAGE_RETRY_SECONDS = 1.0  # while Postgres is down, try to reload the keys at most this often
VERSION_CHECK_SECONDS = 0.25  # how often the key-change counter is read (one Redis GET per process)
LAST_USED_FLUSH_SECONDS = 5.0  # last_used_at is written at most this often per process

#: what the key set maps a secret's hash to (the key id, or a record about the key)
V = TypeVar("V")


class Authenticator(Generic[V]):
    """``load_hashes`` returns ``{sha256(secret): value}`` for every key it knows (whether a found key
    may be used — not revoked, not expired — is the caller's check on the value); ``version``
    (optional) returns the key-change counter, and may raise redis errors (then only the periodic
    reload runs)."""

    def __init__(self, mode: str, load_hashes: Callable[[], dict[str, V]], *,
                 stale_limit: float = 300.0, clock: Callable[[], float] = time.monotonic,
                 version: Callable[[], str | None] | None = None) -> None:
        self.mode = mode
        self.stale_limit = stale_limit
        self._clock = clock
        self._load = load_hashes
        self._version = version
        self._seen_version: str | None = None   # the counter as it was when the set was loaded
        self._version_checked_at = -math.inf
        self._version_down = False
        self._hashes: dict[str, V] = {}
        self._loaded_at = -math.inf     # when the key set was last loaded (monotonic)
        self._retry_at = -math.inf      # during an outage: no reload before this
        self._down_since: float | None = None
        self._stale_logged = False
        self._lock = threading.Lock()

    def _active(self, max_age: float = CACHE_SECONDS, *, miss: bool = False) -> dict[str, V]:
        """The key set, reloaded when older than ``max_age`` or when the change counter moved.
        During an outage: the last good set while it is younger than the stale limit, else
        :class:`StoreUnavailable`. ``miss``: an unknown secret — read the change counter now and wait
        for a reload in progress (a key created a moment ago must work at once)."""
        now = self._clock()
        moved = self._moved(now, force=miss)
        if self._stale(now, max_age, moved):
            have_set = self._loaded_at > -math.inf
            # one reload at a time; the others use the set they have (a miss waits for the new one)
            if self._lock.acquire(blocking=not have_set or miss):
                try:
                    if self._stale(self._clock(), max_age, moved):
                        self._reload()
                finally:
                    self._lock.release()
        if self._down_since is not None:
            self._check_stale()
        return self._hashes

    def _stale(self, now: float, max_age: float, moved: str | None) -> bool:
        """Whether the set needs a reload: older than ``max_age``, or loaded before the change counter
        reached ``moved`` — and no outage holds reloads back."""
        if now < self._retry_at:
            return False
        return now - self._loaded_at > max_age or (moved is not None and moved != self._seen_version)

    def _moved(self, now: float, force: bool = False) -> str | None:
        """The key-change counter if it moved since the set was loaded, else None. Read at most every
        VERSION_CHECK_SECONDS unless ``force`` (the first caller in a period reads it, the others go
        on); an unknown secret forces a read: one Redis GET, and a reload only if a key changed."""
        if self._version is None or (not force and now - self._version_checked_at < VERSION_CHECK_SECONDS):
            return None
        self._version_checked_at = now
        try:
            current = self._version()
        except redis.RedisError as exc:
            if not self._version_down:
                self._version_down = True
                log.warning("key-change signal unreadable (Redis: %s); key changes take effect within "
                            "%gs instead", type(exc).__name__, CACHE_SECONDS)
            return None
        self._version_down = False
        return current if current != self._seen_version else None

    def _reload(self) -> None:
        try:
            version = self._version() if self._version is not None and not self._version_down else None
        except redis.RedisError:
            version = None
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
        self._seen_version = version if version is not None else self._seen_version
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

    def authenticate(self, headers: Headers | Mapping[str, str], query_key: str | None = None) -> V | None:
        """The caller's key (None when auth is off or open). ``query_key``: a key the caller put in
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
        found = active.get(digest)
        if found is None:
            found = self._active(MISS_RELOAD_SECONDS, miss=True).get(digest)
        if found is None:
            raise AuthenticationFailed("invalid or revoked API key")
        return found

    def identify(self, secret: str) -> V | None:
        """The key whose secret this is, whatever the mode (the admin API's check)."""
        digest = hash_secret(secret)
        return self._active().get(digest) or self._active(MISS_RELOAD_SECONDS, miss=True).get(digest)


class LastUsed:
    """Which keys were used since the last flush. :meth:`mark` costs a set insertion; a thread (started
    at the first mark) writes the batch with ``touch`` every LAST_USED_FLUSH_SECONDS while there is one.
    A failed write is logged and its batch dropped: ``last_used_at`` is a hint, not worth a retry."""

    def __init__(self, touch: Callable[[Iterable[str], datetime], None], *,
                 interval: float = LAST_USED_FLUSH_SECONDS) -> None:
        self._touch = touch
        self._interval = interval
        self._pending: set[str] = set()
        self._started = False

    def mark(self, key_id: str) -> None:
        self._pending.add(key_id)
        if not self._started:
            self._started = True
            threading.Thread(target=self._loop, name="keys-last-used", daemon=True).start()

    def flush(self) -> None:
        batch, self._pending = self._pending, set()
        if not batch:
            return
        try:
            self._touch(batch, datetime.now(UTC))
        except (sqlalchemy.exc.SQLAlchemyError, OSError) as exc:   # wider than STORE_DOWN: any failure
            # a hint, not worth a retry: the next use marks the key again
            log.warning("last_used_at of %d keys not recorded (%s)", len(batch), type(exc).__name__)

    def _loop(self) -> None:
        while True:
            time.sleep(self._interval)
            self.flush()


def presented_key(headers: Headers | Mapping[str, str]) -> str | None:
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return headers.get("x-api-key") or headers.get("x-goog-api-key") or None
