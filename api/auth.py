"""Who is calling: ``Authorization: Bearer <key>``, ``x-api-key: <key>`` or ``x-goog-api-key: <key>`` (or
a key the route takes from its URL, Gemini's ``?key=``), checked against the SHA-256 hashes in Postgres
(cached per process for a few seconds).

``GATEWAY_AUTH``: ``required`` — every call needs an active key; ``off`` — no checks;
``auto`` (default) — required as soon as at least one key exists, open on a fresh install.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from common.apikeys import hash_secret
from common.errors import AuthenticationFailed

CACHE_SECONDS = 5.0        # a revoked key stops working within this long
MISS_RELOAD_SECONDS = 0.1  # an unknown key triggers a reload at most this often (10/s), so new keys work at once


class Authenticator:
    def __init__(self, mode: str, load_hashes: Callable[[], dict[str, str]]) -> None:
        self.mode = mode
        self._load = load_hashes
        self._hashes: dict[str, str] = {}
        self._loaded_at = float("-inf")
        self._lock = threading.Lock()

    def _active(self, max_age: float = CACHE_SECONDS) -> dict[str, str]:
        if time.monotonic() - self._loaded_at > max_age:
            with self._lock:
                if time.monotonic() - self._loaded_at > max_age:
                    self._hashes = self._load()
                    self._loaded_at = time.monotonic()
        return self._hashes

    def authenticate(self, headers: Mapping[str, str], query_key: str | None = None) -> str | None:
        """The caller's key id (None when auth is off or open). ``query_key``: a key the caller put in
        the URL, for the routes that accept one. Raises AuthenticationFailed."""
        if self.mode == "off":
            return None
        active = self._active()
        if self.mode == "auto" and not active:
            return None
        secret = _presented_key(headers) or query_key
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


def _presented_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return headers.get("x-api-key") or headers.get("x-goog-api-key") or None
