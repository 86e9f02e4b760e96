"""How each provider's upstream has been answering lately, shared by every worker process (Redis).

Workers record every upstream attempt (:meth:`UpstreamHealth.record_success` /
:meth:`UpstreamHealth.record_failure`); ``GET /health`` and ``llm-gateway providers`` read
:meth:`UpstreamHealth.snapshot`. This module is the only owner of these keys::

    <prefix>:upstream:<provider>:<minute>  hash ok / err / err:<status class>: that UTC minute's counts,
                                           expiring after the window (at most WINDOW_MINUTES+1 per provider)
    <prefix>:upstream:<provider>           hash last_ok_at, last_error (JSON: at, status_class, message),
                                           expiring a day after the provider's last attempt

Recording is one pipelined round trip of a few O(1) commands per attempt (no reads), and best effort:
a Redis error while counting is logged at debug and does not change the call's own outcome (the
settle path that follows reports a Redis outage). The messages
kept are the gateway's own error messages, which never quote key material (``workers/adapters``
do not echo an upstream's 401/403); :func:`scrub` removes the provider's key from them anyway.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import Any

import redis

from common.errors import (
    UpstreamBadResponse,
    UpstreamCredentialsRejected,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamStreamBroken,
    UpstreamTimeout,
    UpstreamUnavailable,
)

log = logging.getLogger(__name__)

WINDOW_MINUTES = 5           # the error rate /health shows is over the last this many minutes
LAST_SEEN_TTL_S = 86_400     # the last error / success are kept this long after the last attempt
MESSAGE_LIMIT = 300          # characters of an error message kept

#: An upstream error's status class: the first row whose class it is an instance of (subclasses first).
STATUS_CLASSES: tuple[tuple[type[UpstreamError], str], ...] = (
    (UpstreamCredentialsRejected, "credentials_rejected"),  # 401/403: the operator's key is wrong
    (UpstreamBadResponse, "bad_response"),                  # a 200 that is no answer
    (UpstreamStreamBroken, "stream_broken"),                # the stream broke off after chunks went out
    (UpstreamUnavailable, "unavailable"),                   # 5xx, connection refused or reset
    (UpstreamTimeout, "timeout"),                           # no answer within the provider's deadlines
    (UpstreamRateLimited, "rate_limited"),                  # the upstream's own 429
    (UpstreamRejected, "rejected"),                         # another 4xx: the request itself
)


def status_class(error: UpstreamError) -> str:
    """The bounded label of ``error`` (a metric/log label, and what /health shows)."""
    for cls, label in STATUS_CLASSES:
        if isinstance(error, cls):
            return label
    return "error"


def scrub(message: str, secret: str | None) -> str:
    """``message`` shortened to ``MESSAGE_LIMIT`` characters, with ``secret`` (the provider's key) cut
    out should it ever appear: what is logged and stored must never carry credentials."""
    if secret and len(secret) >= 4:
        message = message.replace(secret, "***")
    return message[:MESSAGE_LIMIT]


def provider_status(attempts: int, errors: int, last_error: dict[str, Any] | None,
                    last_ok_at: float | None) -> str:
    """One word for a provider's recent health: ``credentials_rejected`` (its last failure was a
    401/403 and nothing succeeded since), ``failing`` (at least half the window's attempts failed),
    ``degraded`` (some failed), else ``ok`` (also when it had no calls)."""
    if last_error is not None and last_error.get("status_class") == "credentials_rejected" and (
            last_ok_at is None or last_ok_at < float(last_error.get("at", 0))):
        return "credentials_rejected"
    if attempts and errors * 2 >= attempts:
        return "failing"
    return "degraded" if errors else "ok"


class UpstreamHealth:
    """Counts of upstream attempts per provider and minute, and each provider's last error."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix

    def _key(self, provider: str) -> str:
        return f"{self.prefix}:upstream:{provider}"

    def _bucket(self, provider: str, minute: int) -> str:
        return f"{self._key(provider)}:{minute}"

    def record_success(self, provider: str, now: float | None = None) -> None:
        pipe = self.redis.pipeline(transaction=False)
        self.success_in(pipe, provider, now)
        self._execute(pipe, provider)

    def success_in(self, pipe: Any, provider: str, now: float | None = None) -> None:
        """Queue a successful attempt's count on ``pipe`` (a pipeline, or a
        :class:`~common.lua.ScriptBatch`'s): the worker sends it with the rest of a call's
        bookkeeping, after the caller's answer (``workers/aftercall.py``)."""
        now = time.time() if now is None else now
        self._count(pipe, provider, now, ("ok",))
        pipe.hset(self._key(provider), "last_ok_at", repr(now))
        pipe.expire(self._key(provider), LAST_SEEN_TTL_S)

    def record_failure(self, provider: str, error: UpstreamError, message: str,
                       now: float | None = None) -> str:
        """Count a failed attempt and keep it as the provider's last error; returns its status class.
        ``message`` must already be scrubbed (:func:`scrub`)."""
        now = time.time() if now is None else now
        label = status_class(error)
        pipe = self.redis.pipeline(transaction=False)
        self._count(pipe, provider, now, ("err", f"err:{label}"))
        pipe.hset(self._key(provider), "last_error",
                  json.dumps({"at": now, "status_class": label, "message": message}))
        pipe.expire(self._key(provider), LAST_SEEN_TTL_S)
        self._execute(pipe, provider)
        return label

    @staticmethod
    def _execute(pipe: Any, provider: str) -> None:
        try:
            pipe.execute()
        except redis.RedisError as exc:
            log.debug("provider %s: an upstream attempt was not counted (%s)", provider, exc)

    def _count(self, pipe: Any, provider: str, now: float, fields: Iterable[str]) -> None:
        minute = int(now // 60)
        bucket = self._bucket(provider, minute)
        for name in fields:
            pipe.hincrby(bucket, name, 1)
        pipe.expire(bucket, (WINDOW_MINUTES + 1) * 60)

    def snapshot(self, providers: Iterable[str], now: float | None = None) -> dict[str, dict[str, Any]]:
        """Each provider's attempts and errors over the last ``WINDOW_MINUTES`` minutes (the current
        one included), its error rate, errors by status class, last error and status word — in one
        round trip."""
        names = list(providers)
        now = time.time() if now is None else now
        minutes = range(int(now // 60) - WINDOW_MINUTES + 1, int(now // 60) + 1)
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self._key(name))
            for minute in minutes:
                pipe.hgetall(self._bucket(name, minute))
        answers = iter(pipe.execute())
        result: dict[str, dict[str, Any]] = {}
        for name in names:
            seen = {k.decode(): v.decode() for k, v in next(answers).items()}
            counts: dict[str, int] = {}
            for _ in minutes:
                for field, value in next(answers).items():
                    counts[field.decode()] = counts.get(field.decode(), 0) + int(value)
            errors = counts.get("err", 0)
            attempts = counts.get("ok", 0) + errors
            last_error = json.loads(seen["last_error"]) if "last_error" in seen else None
            last_ok_at = float(seen["last_ok_at"]) if "last_ok_at" in seen else None
            result[name] = {
                "status": provider_status(attempts, errors, last_error, last_ok_at),
                "window_s": WINDOW_MINUTES * 60,
                "attempts": attempts,
                "errors": errors,
                "error_rate": round(errors / attempts, 3) if attempts else 0.0,
                "errors_by_class": {k[4:]: v for k, v in sorted(counts.items()) if k.startswith("err:")},
                "last_error": _described(last_error, now),
            }
        return result


def _described(error: dict[str, Any] | None, now: float) -> dict[str, Any] | None:
    """The stored last error with its time as UTC ISO 8601 and how long ago it was."""
    if error is None:
        return None
    at = float(error.get("at", 0))
    return {**error, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)),
            "seconds_ago": round(max(0.0, now - at), 1)}
