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

import time
from collections.abc import Callable
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
from common.lua import ScriptBatch
from common.registry import BreakerSettings
from common.routing import BreakerState, Load

PROBE_TTL_S = 60.0      # a probe whose worker died stops holding its slot after this long
AVERAGE_TAU_S = 30.0    # the averages halve an old sample's weight within about this long
CLOSED_FRESH_S = 0.25   # a worker that heard 'closed' skips admit this long (:class:`ClosedMemo`)


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

    def _keys(self, deployment: str) -> list[str]:
        return [self.key(deployment), self.key(deployment) + ":f"]

    def _args(self, *extra: Any) -> list[Any]:
        c = self.config
        return [extra[0], c.failures, int(c.window_s * 1000), int(c.open_s * 1000),
                int(c.misconfigured_open_s * 1000), c.probes, int(PROBE_TTL_S * 1000), *extra[1:]]

    def _run(self, deployment: str, *extra: Any) -> list[Any]:
        return list(self._script(keys=self._keys(deployment), args=self._args(*extra)))

    def admit(self, deployment: str) -> Admission:
        """May a call go to ``deployment`` now? Closed: yes; half-open: yes as a probe while a probe
        slot is free (at most ``probes`` at once, across every process); otherwise not, for
        ``wait_s``."""
        gate, wait_ms = self._run(deployment, "admit")
        return Admission(Gate(_text(gate)), int(wait_ms) / 1000)

    def report(self, deployment: str, outcome: Verdict, *, probe: bool, latency_ms: float) -> str:
        """Record one call's outcome (and its latency if it succeeded); may open or close the breaker.
        Returns the breaker's state after it (``closed`` | ``open``)."""
        return state_of(self._run(deployment, *self._report_args(outcome, probe, latency_ms)))

    def report_in(self, batch: ScriptBatch, deployment: str, outcome: Verdict, *, probe: bool,
                  latency_ms: float) -> int:
        """:meth:`report`, queued on ``batch``; returns its reply's index (read it with :func:`state_of`)."""
        return batch.script(self._script, self._keys(deployment),
                            self._args(*self._report_args(outcome, probe, latency_ms)))

    @staticmethod
    def _report_args(outcome: Verdict, probe: bool, latency_ms: float) -> tuple[Any, ...]:
        return "report", outcome.value, 1 if probe else 0, int(latency_ms), int(AVERAGE_TAU_S * 1000)


def state_of(reply: Any) -> str:
    """The state a ``report`` reply says the breaker is in after it (``""`` for an error reply)."""
    return _text(reply[0]) if isinstance(reply, list | tuple) and reply else ""


class ClosedMemo:
    """What one process last heard a breaker say, kept for a moment: "closed, as of ``fresh_s`` ago".

    In the closed state ``admit`` is a read with no side effect, yet it costs a Redis round trip
    before every call. A process that just reported a success and heard back ``closed`` may skip
    it for :data:`CLOSED_FRESH_S`. What that trades, and why it is not material:

    * Only ``closed`` is remembered; open and half-open always ask Redis, so probes stay bounded
      (a probe slot is taken only by ``admit`` in Redis) and an open breaker's wait is Redis's.
    * A failure (or any outcome but a success) this process sees forgets the deployment at once:
      its own next call asks Redis, as before.
    * Another process opening the breaker is seen here at most ``fresh_s`` after this process sent
      the report that heard ``closed`` (the memo is dated from the send, and a reply to a report
      sent before a failure this process saw is ignored: greenlets' replies race). Meanwhile this
      process's calls there are the calls a breaker lets through while it is being opened anyway:
      a non-probe call's failure on an open breaker changes nothing (``breaker.lua``), its success
      does not close it, and its first failure here ends the memo. It never moves the
      ``failures``-in-a-window threshold (failures are counted by Redis, from every process).
    * Nothing else reads it: ``/admin/routing``, the dashboard and the API's routing read Redis.
    """

    def __init__(self, fresh_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.fresh_s = fresh_s
        self.clock = clock
        self._heard: dict[str, float] = {}    # deployment → when the report that heard 'closed' was sent
        self._forgot: dict[str, float] = {}   # deployment → when this process last saw anything else

    def closed(self, deployment: str) -> bool:
        """True while this process heard ``closed`` for ``deployment`` less than ``fresh_s`` ago."""
        heard = self._heard.get(deployment)
        return heard is not None and self.clock() - heard < self.fresh_s

    def heard(self, deployment: str, outcome: Verdict, state: str, *, asked: float) -> None:
        """A report's outcome and the state Redis answered (the report sent at ``asked``, this
        memo's clock): remember ``closed`` after a success, forget the deployment after anything
        else. A reply to a report sent before the last failure this process saw is no news: it is
        not remembered (greenlets' replies may come back in any order)."""
        if (outcome is Verdict.OK and state == BreakerState.CLOSED.value and self.fresh_s > 0
                and asked > self._forgot.get(deployment, float("-inf"))):
            self._heard[deployment] = asked
        elif outcome is not Verdict.OK or state != BreakerState.CLOSED.value:
            self._heard.pop(deployment, None)
            self._forgot[deployment] = self.clock()


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
