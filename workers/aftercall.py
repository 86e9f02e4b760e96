"""A successful upstream call's bookkeeping, done after the caller has its answer, in one round trip.

A success changes nothing the caller's answer depends on, only what later calls read: the provider's
counts that ``/health`` shows (``common/upstream_health.py``), the deployment's breaker and its
latency average (``common/routing/breaker.py``: ``lowest-latency`` routing) and the alias's time to
first token (``common/routing/ttft.py``: the ``fast`` and ``auto`` virtual models). So the worker
settles the job first (``emit.lua`` tells the waiter) and then sends all three as one pipelined
:class:`~common.lua.ScriptBatch` — where each used to be its own round trip, two of them between the
upstream's answer and the caller's.

What stays on the critical path, because a decision depends on it: every failure's report (the
breaker must count it before the worker decides to retry or move the job) and a half-open probe's
success (it closes the breaker, which calls waiting for the probe are held back by) — see
``workers/runner.py``.

Best effort, like each of its parts before: a Redis error here is logged (once per outage) and never
fails the job, which is settled already.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

from common.lua import ScriptBatch
from common.outage import OutageLog
from common.routing.ttft import RedisLatencyStats
from common.upstream_health import UpstreamHealth
from workers.failover import Failover

log = logging.getLogger(__name__)
_outages = OutageLog()


@dataclass(frozen=True)
class Success:
    """What a successful call leaves to record: where it ran, how long it took, and — for a chat
    call — its time to first token (``None``: an embeddings call feeds no TTFT average)."""

    provider: str
    deployment: str
    alias: str
    latency_ms: int
    reported: bool        # its breaker heard it already (a probe's success is reported at once)
    ttft_ms: float | None


class AfterCall:
    """Records :class:`Success` es; thread/greenlet-safe (holds only its collaborators)."""

    def __init__(self, client: redis.Redis, upstream: UpstreamHealth, failover: Failover,
                 ttft: RedisLatencyStats) -> None:
        self.redis = client
        self.upstream = upstream
        self.failover = failover
        self.ttft = ttft

    def record(self, success: Success) -> None:
        batch = ScriptBatch(self.redis)
        self.upstream.success_in(batch.pipe, success.provider)
        heard = (None if success.reported
                 else self.failover.report_in(batch, success.deployment, latency_ms=success.latency_ms))
        if success.ttft_ms is not None:
            self.ttft.observe_in(batch, success.alias, success.ttft_ms)
        try:
            replies = batch.execute()
        except redis.RedisError as exc:
            _outages.warn("redis", exc, "successful calls are not counted (/health, breakers, latency "
                                        "averages) until it is back")
            return
        for reply in replies:
            if isinstance(reply, Exception):
                log.warning("a successful call's bookkeeping failed in part: %s", reply)
        if heard is not None:
            heard(replies)
