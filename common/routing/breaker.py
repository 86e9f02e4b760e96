"""Circuit breakers, one per deployment, shared in Redis by every worker and API process, and the
decaying latency / error-rate averages of each deployment (``common/lua/breaker.lua`` owns both).

Keys (``P`` is the key prefix; ``<d>`` a deployment's ``provider/model``)::

    P:brk:<d>     hash  state (closed | open), until (ms: open until), probes (in flight), probe_until,
                        reason (failures | misconfigured), opened (times), lat / err (decaying averages),
                        calls
    P:brk:<d>:f   zset  the failures inside the window (closed state only)

What counts (:func:`verdict`): a connect error, timeout, 5xx or a 200 that is no answer is a
failure; a 401/403 marks the deployment misconfigured (open for ``misconfigured_open_s``); a 429 is
neither (the provider is up, only busy: the limiter's cooldown handles it); any other answer is a
success.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis

from common import lua
from common.errors import (
    GatewayError,
    UpstreamCredentialsRejected,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from common.registry import BreakerSettings
from common.routing import BreakerState, Load

PROBE_TTL_S = 60.0      # a probe whose worker died stops holding its slot after this long
AVERAGE_TAU_S = 30.0    # the averages halve an old sample's weight within about this long


class Verdict(StrEnum):
    OK = "ok"
    FAIL = "fail"
    MISCONFIGURED = "misconfigured"
    NEUTRAL = "neutral"


def verdict(error: GatewayError | None) -> Verdict:
    """What one call's outcome says about its deployment's health (see the module's docstring)."""
    if error is None:
        return Verdict.OK
    if isinstance(error, UpstreamCredentialsRejected):
        return Verdict.MISCONFIGURED
    if isinstance(error, UpstreamRateLimited) or not isinstance(error, UpstreamError):
        return Verdict.NEUTRAL
    if isinstance(error, UpstreamTimeout | UpstreamUnavailable):
        return Verdict.FAIL
    return Verdict.OK   # the upstream answered (a 4xx about the request): it is alive


class Gate(StrEnum):
    CALL = "call"      # closed: call
    PROBE = "probe"    # half-open: call, as one of the bounded probes (report it with probe=True)
    OPEN = "open"      # do not call; ask again after ``wait_s``


@dataclass(frozen=True)
class Admission:
    gate: Gate
    wait_s: float = 0.0


class Breakers:
    """Every deployment's breaker; thread/greenlet-safe (holds only a connection pool)."""

    def __init__(self, client: redis.Redis, prefix: str, config: BreakerSettings) -> None:
        self.redis = client
        self.prefix = prefix
        self.config = config
        self._script = lua.register(client, "breaker")

    def key(self, deployment: str) -> str:
        return f"{self.prefix}:brk:{deployment}"

    def _run(self, deployment: str, *extra: Any) -> list[Any]:
        c = self.config
        return list(self._script(keys=[self.key(deployment), self.key(deployment) + ":f"], args=[
            extra[0], c.failures, int(c.window_s * 1000), int(c.open_s * 1000),
            int(c.misconfigured_open_s * 1000), c.probes, int(PROBE_TTL_S * 1000), *extra[1:]]))

    def admit(self, deployment: str) -> Admission:
        """May a call go to ``deployment`` now? Closed: yes; half-open: yes as a probe while a probe
        slot is free (at most ``probes`` at once, across every process); otherwise not, for
        ``wait_s``."""
        gate, wait_ms = self._run(deployment, "admit")
        return Admission(Gate(gate.decode() if isinstance(gate, bytes) else gate), int(wait_ms) / 1000)

    def report(self, deployment: str, outcome: Verdict, *, probe: bool, latency_ms: float) -> None:
        """Record one call's outcome (and its latency if it succeeded); may open or close the breaker."""
        self._run(deployment, "report", outcome.value, 1 if probe else 0, int(latency_ms),
                  int(AVERAGE_TAU_S * 1000))


def read_load(raw: dict[Any, Any], now_ms: int, max_probes: int) -> Load:
    """The breaker half of a :class:`Load` from the breaker's hash as read at Redis time ``now_ms``."""
    h = {_text(k): _text(v) for k, v in raw.items()}
    latency = float(h["lat"]) if "lat" in h else None
    errors = float(h["err"]) if "err" in h else None
    if h.get("state", "closed") == "closed":
        return Load(latency_ms=latency, error_rate=errors)
    until = int(h.get("until", 0))
    if now_ms < until:
        return Load(BreakerState.OPEN, (until - now_ms) / 1000, False, h.get("reason", ""),
                    latency_ms=latency, error_rate=errors)
    probes = int(h.get("probes", 0)) if now_ms <= int(h.get("probe_until", 0)) else 0
    return Load(BreakerState.HALF_OPEN, 0.0, probes < max_probes, h.get("reason", ""),
                latency_ms=latency, error_rate=errors)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
