"""Routing: which deployment serves a call, and where a job goes when that one cannot.

The types every side shares (the API picks the first deployment, the worker the next one; the
virtual models ``auto``/``fast``/``cheap`` rank the same candidates)::

    Candidate     one deployment of one alias, in the order routing may use them: the alias's own
                  deployments first, then each fallback alias's (``fallback=True``), nested fallbacks
                  flattened, each alias once
    Load          what Redis says about a deployment now: breaker state, jobs waiting for its provider,
                  completion rate, measured latency and error rate (``common/routing/observe.py``)
    Trail         what routing decided for a job and what happened since; it travels in the job's
                  spec (``JobSpec.trail``) when the job moves, and ends in the answer's metadata
    candidates()  the ordered candidates for an alias and a request (deployments whose context
                  window is too small for the request are left out before anything is called)
    choose()      the strategy's pick among the usable candidates (``common/routing/strategies.py``)

Breakers (``common/routing/breaker.py``) are one per deployment, shared in Redis by every process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from common.registry import Deployment, Model, Registry


class BreakerState(StrEnum):
    CLOSED = "closed"            # calls go through
    OPEN = "open"                # out of routing until ``reopens_in_s`` passes
    HALF_OPEN = "half_open"      # its open time passed: a bounded number of probe calls go through


@dataclass(frozen=True)
class Candidate:
    """``deployment`` of ``alias`` (``fallback``: reached through a fallback alias)."""

    alias: str
    deployment: Deployment
    fallback: bool = False

    @property
    def name(self) -> str:
        return self.deployment.name

    @property
    def provider(self) -> str:
        return self.deployment.provider


@dataclass(frozen=True)
class Load:
    """One deployment as Redis saw it a moment ago. ``start_in_s``: when a job joining its provider's
    queue now would likely start (the Retry-After estimate; None when nothing completed lately);
    ``latency_ms`` / ``error_rate``: decaying averages of its recent calls (None: never measured)."""

    breaker: BreakerState = BreakerState.CLOSED
    reopens_in_s: float = 0.0
    probe_free: bool = True          # half-open: a probe slot is free
    reason: str = ""                 # why it is open ("failures", "misconfigured")
    waiting: int = 0                 # jobs in its provider's broker queue + line
    start_in_s: float | None = 0.0
    latency_ms: float | None = None
    error_rate: float | None = None

    @property
    def usable(self) -> bool:
        """Routing may send a job here now: closed, or half-open with a probe slot free."""
        return self.breaker is BreakerState.CLOSED or (self.breaker is BreakerState.HALF_OPEN
                                                        and self.probe_free)


@dataclass
class Trail:
    """A job's routing story: the alias the caller asked for, the strategy's decision, the
    deployments tried so far (in order) and whether a fallback alias serves it now."""

    requested: str
    decision: str = ""
    tried: list[str] = field(default_factory=list)
    fallback_used: bool = False
    calls: int = 0            # upstream calls made for the job before its current deployment
    moved_at: int = 0         # the claim attempt that ended by moving the job (not a lost attempt)

    def to_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "decision": self.decision, "tried": list(self.tried),
                "fallback_used": self.fallback_used, "calls": self.calls, "moved_at": self.moved_at}

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Trail:
        return cls(str(data.get("requested", "")), str(data.get("decision", "")),
                   [str(t) for t in data.get("tried") or []], bool(data.get("fallback_used")),
                   int(data.get("calls") or 0), int(data.get("moved_at") or 0))


Fits = Callable[[Model, Deployment], bool]


def serving(model: Model, deployment: str | None, provider: str) -> Deployment:
    """The deployment of ``model`` a job's spec names; for a spec that names none (one rebuilt from
    its Postgres row, which keeps alias and provider), the alias's deployment on ``provider``; else
    the alias's first."""
    routes = model.routes()
    named = next((d for d in routes if d.name == deployment), None) if deployment else None
    return named or next((d for d in routes if d.provider == provider), routes[0])


def candidates(registry: Registry, alias: str, fits: Fits | None = None) -> list[Candidate]:
    """Every deployment that may serve ``alias``, in routing order: its own, then its fallbacks'
    (each fallback's own fallbacks after it, depth first; an alias is visited once, so cycles end).
    Deployments whose provider is not routable, or that ``fits`` refuses (the request does not fit
    their context window), are left out."""
    out: list[Candidate] = []
    seen: set[str] = set()

    def visit(name: str, fallback: bool) -> None:
        model = registry.model(name)
        if model is None or name in seen:
            return
        seen.add(name)
        for d in model.routes():
            if registry.providers[d.provider].routable and (fits is None or fits(model, d)):
                out.append(Candidate(name, d, fallback))
        for nxt in registry.fallbacks_of(model):
            visit(nxt, True)

    visit(alias, False)
    return out


def first_tier(options: list[tuple[Candidate, Load]]) -> list[tuple[Candidate, Load]]:
    """The usable options of the first alias in the chain that has any (the alias's own deployments
    before its first fallback's, and so on); empty if none is usable."""
    for alias in dict.fromkeys(c.alias for c, _ in options):
        tier = [(c, load) for c, load in options if c.alias == alias and load.usable]
        if tier:
            return tier
    return []


def soonest_reopening(options: list[tuple[Candidate, Load]]) -> tuple[Candidate, Load] | None:
    """When nothing is usable: the option whose breaker lets a probe through first (a job waits in
    its line for that probe rather than failing)."""
    return min(options, key=lambda o: o[1].reopens_in_s, default=None)


def fitting(prompt_tokens: Callable[[Model], int], completion_tokens: int) -> Fits:
    """A :data:`Fits` that keeps deployments whose context window holds the prompt (counted for the
    deployment's own model: ``prompt_tokens(model served there)``) plus the completion the caller
    asked for (``max_tokens``; 0 if it set none)."""
    def fits(model: Model, deployment: Deployment) -> bool:
        served = model.on(deployment)
        return prompt_tokens(served) + completion_tokens <= served.context_window
    return fits
