"""Measured time to first token per model alias, shared by every process through Redis.

Workers feed each successful call's time to first token (:meth:`RedisLatencyStats.observe`, one Lua
call: ``common/lua/ttft.lua``) — for a stream, until its first chunk; for a whole answer, the whole
call, which is when its first token reaches the caller. Each alias keeps a decaying average: a new
sample weighs :data:`ALPHA`, and an old average fades by half every :data:`HALF_LIFE_S` of silence, so
a model that was slow an hour ago is not judged by it. The API reads the averages of a decision's
candidates in one ``HMGET`` (:meth:`RedisLatencyStats.snapshot`); an average older than
:data:`MAX_AGE_S` counts as not measured.

Key: ``P:routing:ttft`` — one hash, one field per alias the workers serve (bounded by the registry),
expiring after :data:`MAX_AGE_S` without a sample.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import redis

from common.lua import ScriptBatch, register
from common.outage import OutageLog
from common.routing.virtual import MeasuredLatency

log = logging.getLogger(__name__)

ALPHA = 0.3            # a new sample's weight in the average
HALF_LIFE_S = 300.0    # an old average's weight halves every 5 minutes without samples
MAX_AGE_S = 3600       # an average not fed for an hour is no measurement
_outages = OutageLog()


class RedisLatencyStats:
    """The shared decaying averages; thread/greenlet-safe (holds only its client and script)."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        self.key = f"{prefix}:routing:ttft"
        self._feed = register(client, "ttft")

    def observe(self, alias: str, ttft_ms: float) -> None:
        """Feed one sample. Never raises for Redis being down: a lost sample only blurs the average,
        and must not fail the job that produced it."""
        try:
            self._feed(keys=[self.key], args=self._args(alias, ttft_ms))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            _outages.warn("redis", exc, "time-to-first-token samples are dropped until it is back")

    def observe_in(self, batch: ScriptBatch, alias: str, ttft_ms: float) -> None:
        """:meth:`observe`, queued on ``batch`` (its reply is nothing anyone waits for)."""
        batch.script(self._feed, [self.key], self._args(alias, ttft_ms))

    @staticmethod
    def _args(alias: str, ttft_ms: float) -> list[str | float]:
        return [alias, max(0.0, ttft_ms), ALPHA, HALF_LIFE_S, MAX_AGE_S]

    def ttft_ms(self, alias: str) -> float | None:
        return self.snapshot([alias]).ttft_ms(alias)

    def snapshot(self, aliases: Sequence[str]) -> MeasuredLatency:
        """The current averages of ``aliases`` (one Redis call); unmeasured or stale ones left out."""
        if not aliases:
            return MeasuredLatency()
        values = self.redis.hmget(self.key, list(aliases))
        now = time.time()
        out: dict[str, float] = {}
        for alias, raw in zip(aliases, values, strict=True):
            parsed = _parse(raw)
            if parsed is not None and now - parsed[1] <= MAX_AGE_S:
                out[alias] = parsed[0]
        return MeasuredLatency(out)


def _parse(raw: bytes | str | None) -> tuple[float, float] | None:
    """``"<ms> <at_s>"`` as numbers; None for a missing or unreadable field."""
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else raw
    try:
        ms, at = text.split(" ", 1)
        return float(ms), float(at)
    except ValueError:
        return None
