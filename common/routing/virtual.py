"""Virtual models: names like ``auto``, ``fast`` and ``cheap`` that each call resolves to one concrete
alias of the registry, at the API, before its job is created — and the record of why.

The registry's ``virtual_models`` section names them (common/registry.py :class:`VirtualModel`): each
has a ``strategy`` and optional ``candidates`` (default: every chat model of a routable provider).
Resolving one (:meth:`VirtualRouter.resolve`):

1. **Eligibility.** A candidate must be routable and have what the request needs: ``tools`` (it offers
   tools), ``vision`` (an image part), ``json`` (a ``json_object``/``json_schema`` response format),
   room in its ``context_window`` for the estimated input tokens plus ``max_tokens``, and a
   ``max_output_tokens`` no smaller than ``max_tokens``. None eligible → 400 naming what each lacks.
2. **Ranking** by the strategy's weights (:data:`STRATEGIES`): each eligible candidate gets a penalty,
   the weighted sum of four terms in 0..1, lowest wins (ties: cheaper, then more capable, then the
   alias's name — the choice is deterministic):

   ========  =====================================================================================
   fit       how far the model's ``tier`` is from the classifier's tier for this prompt
             (common/routing/classifier.py): one tier too small 0.5, two 1.0; one too large 0.25,
             two 0.5 — an over-capable model still answers well, it only costs more
   cost      the candidate's place in the price order for *this* request (input + output tokens
             at its per-1M prices; output = ``max_tokens`` or 256): cheapest 0, dearest 1; a model
             without a ``price`` is free here as on its bills
   latency   ``1 - fastest/its`` measured time to first token (:class:`LatencyStats`); a candidate
             not measured yet counts 1 when others are measured (known-fast beats unknown)
   quality   ``1 - tier/2``: large 0, medium 0.5, small 1
   ========  =====================================================================================

   ========  ====  ====  =======  =======
   strategy  fit   cost  latency  quality
   ========  ====  ====  =======  =======
   balanced  0.6   0.3   0.1      0
   cost      0.4   0.6   0        0
   quality   0.25  0     0        0.75
   latency   0.25  0     0.75     0
   cheapest  0     1     0        0
   fastest   0     0     1        0
   ========  ====  ====  =======  =======

3. **Overrides** per request (:func:`parse_overrides`): ``x-routing-strategy`` (any strategy above)
   and ``x-prefer-provider`` (a provider of the registry: its eligible candidates rank first; if it
   has none, the ranking stands and the decision says so), as headers or as body fields.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from common.errors import InvalidRequest
from common.registry import Model, Registry, Tier, VirtualModel
from common.routing.classifier import TIER_ORDER, Complexity, classify, needs_vision
from common.tokens import counter_for, estimate_prompt_tokens
from common.types import ChatRequest

EXPECTED_OUTPUT_TOKENS = 256   # the answer's length for pricing when the caller sets no max_tokens
STRATEGY_FIELD = "x-routing-strategy"
PREFER_FIELD = "x-prefer-provider"
OVERRIDE_FIELDS = (STRATEGY_FIELD, PREFER_FIELD)


@dataclass(frozen=True)
class Weights:
    fit: float = 0.0
    cost: float = 0.0
    latency: float = 0.0
    quality: float = 0.0


#: each strategy's weights (the table in the module docstring); a new strategy is a new row here and in
#: common/registry.py's ``RoutingStrategy``
STRATEGIES: dict[str, Weights] = {
    # fit first: with one model per tier priced in tier order, a wrong tier loses by 0.15 or more, which
    # latency (0.1 at most) cannot make up; latency decides between models that fit alike
    "balanced": Weights(fit=0.6, cost=0.3, latency=0.1),
    "cost": Weights(fit=0.4, cost=0.6),
    "quality": Weights(fit=0.25, quality=0.75),
    "latency": Weights(fit=0.25, latency=0.75),
    "cheapest": Weights(cost=1.0),
    "fastest": Weights(latency=1.0),
}


class LatencyStats(Protocol):
    """Measured time to first token per alias (a decaying average); None when not measured lately."""

    def ttft_ms(self, alias: str) -> float | None: ...


class LatencySource(Protocol):
    """Where a router reads latency from: a consistent snapshot for the aliases of one decision."""

    def snapshot(self, aliases: Sequence[str]) -> LatencyStats: ...


@dataclass(frozen=True)
class MeasuredLatency:
    """Latencies held in memory: a snapshot read from Redis, or a test's table."""

    ms: Mapping[str, float] = field(default_factory=dict)

    def ttft_ms(self, alias: str) -> float | None:
        return self.ms.get(alias)

    def snapshot(self, aliases: Sequence[str]) -> MeasuredLatency:
        return self


@dataclass(frozen=True)
class Overrides:
    """A caller's routing wishes for one request (validated)."""

    strategy: str | None = None
    prefer_provider: str | None = None


def pop_overrides(body: Any) -> dict[str, Any]:
    """Take the routing override fields out of a JSON body (they must never reach an upstream)."""
    if not isinstance(body, MutableMapping):
        return {}
    return {name: body.pop(name) for name in OVERRIDE_FIELDS if name in body}


def parse_overrides(body_fields: Mapping[str, Any], headers: Mapping[str, str],
                    registry: Registry) -> Overrides:
    """The caller's overrides: a body field wins over the header of the same name. 400 naming the field
    for a strategy we do not have or a provider the registry does not know."""
    strategy = body_fields.get(STRATEGY_FIELD, headers.get(STRATEGY_FIELD)) or None  # "" = unset
    prefer = body_fields.get(PREFER_FIELD, headers.get(PREFER_FIELD)) or None
    if strategy is not None and (not isinstance(strategy, str) or strategy not in STRATEGIES):
        raise InvalidRequest(f"{STRATEGY_FIELD} must be one of {', '.join(STRATEGIES)}, got {strategy!r:.60}",
                             param=STRATEGY_FIELD, code="invalid_routing_strategy")
    if prefer is not None and (not isinstance(prefer, str) or prefer not in registry.providers):
        raise InvalidRequest(f"{PREFER_FIELD} must name a provider of this gateway "
                             f"({', '.join(registry.providers)}), got {prefer!r:.60}",
                             param=PREFER_FIELD, code="invalid_preferred_provider")
    return Overrides(strategy, prefer)


@dataclass(frozen=True)
class Decision:
    """Why a virtual model became ``alias`` for this call (answered as ``x-gateway-routing-decision``)."""

    virtual_model: str
    alias: str
    strategy: str
    tier: Tier
    score: int
    ranked: tuple[str, ...]                 # the eligible candidates, best first
    skipped: dict[str, str]                 # alias → why it was not eligible
    preferred: str | None = None            # the x-prefer-provider asked for ...
    preference_met: bool | None = None      # ... and whether the choice is one of its models

    def header(self) -> str:
        parts = [f"virtual={self.virtual_model}", f"alias={self.alias}", f"strategy={self.strategy}",
                 f"tier={self.tier}", f"score={self.score}"]
        if self.preferred is not None:
            parts.append(f"prefer={self.preferred}{'' if self.preference_met else ' (none eligible)'}")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"virtual_model": self.virtual_model, "alias": self.alias,
                               "strategy": self.strategy, "tier": self.tier, "score": self.score,
                               "ranked": list(self.ranked)}
        if self.skipped:
            out["skipped"] = dict(self.skipped)
        if self.preferred is not None:
            out["preferred_provider"] = self.preferred
            out["preference_met"] = self.preference_met
        return out


@dataclass(frozen=True)
class Contender:
    """One eligible alias, priced and timed for this request (an alias, not one of its deployments:
    which deployment serves it is decided after, by ``common/routing``)."""

    model: Model
    provider: str
    est_cost: Decimal
    ttft_ms: float | None


def missing(request: ChatRequest, model: Model, input_tokens: int) -> list[str]:
    """What ``model`` lacks to serve ``request`` (empty: it can)."""
    caps = model.capabilities
    lacks = [cap for cap, needed in (("chat", True), ("tools", bool(request.tools)),
                                     ("vision", needs_vision(request)),
                                     ("json", _wants_json(request))) if needed and cap not in caps]
    out_tokens = request.max_completion_tokens or request.max_tokens or 0
    if input_tokens + out_tokens > model.context_window:
        lacks.append(f"context window {model.context_window} < {input_tokens + out_tokens} tokens")
    if out_tokens and model.max_output_tokens and out_tokens > model.max_output_tokens:
        lacks.append(f"max output {model.max_output_tokens} < max_tokens {out_tokens}")
    return lacks


def _wants_json(request: ChatRequest) -> bool:
    return (request.response_format or {}).get("type") in ("json_object", "json_schema")


def rank(candidates: Sequence[Contender], weights: Weights, tier: Tier,
         prefer: str | None = None) -> list[Contender]:
    """``candidates`` best first by ``weights`` (the module docstring's terms); a preferred provider's
    candidates before all others. Deterministic: ties go to the cheaper, then the more capable, then the
    alias first in alphabetical order."""
    prices = sorted({c.est_cost for c in candidates})
    measured = [c.ttft_ms for c in candidates if c.ttft_ms is not None]
    fastest = min(measured) if measured else None
    need = TIER_ORDER.index(tier)

    def penalty(c: Contender) -> float:
        level = TIER_ORDER.index(c.model.tier)
        misfit = (need - level) / 2 if level < need else (level - need) / 4
        cost = prices.index(c.est_cost) / (len(prices) - 1) if len(prices) > 1 else 0.0
        if fastest is None:
            latency = 0.0
        elif c.ttft_ms is None:
            latency = 1.0
        else:
            latency = 1.0 - fastest / c.ttft_ms if c.ttft_ms > 0 else 0.0
        quality = 1.0 - level / 2
        total = (weights.fit * misfit + weights.cost * cost + weights.latency * latency
                 + weights.quality * quality)
        return round(total, 9)  # float noise must not break a tie the table says is one

    return sorted(candidates, key=lambda c: (prefer is not None and c.provider != prefer, penalty(c),
                                             c.est_cost, -TIER_ORDER.index(c.model.tier), c.model.alias))


class VirtualRouter:
    """Resolves the registry's virtual models; holds the registry and where latency is measured."""

    def __init__(self, registry: Registry, latency: LatencySource) -> None:
        self.registry = registry
        self.latency = latency

    def virtual(self, name: str) -> VirtualModel | None:
        return self.registry.virtual_models.get(name)

    def candidates(self, virtual: VirtualModel) -> list[Model]:
        """The virtual model's listed candidates, or every chat model of the registry."""
        models = self.registry.models
        if virtual.candidates:
            return [models[alias] for alias in virtual.candidates]
        return [m for m in models.values() if "chat" in m.capabilities]

    def resolve(self, name: str, request: ChatRequest, overrides: Overrides = Overrides(),
                allowed: Callable[[str], bool] = lambda alias: True) -> Decision:
        """The alias ``name`` means for ``request``, and why: among the candidates the caller is
        ``allowed`` to use (an API key's model scope). Raises :class:`InvalidRequest` (400) when no
        candidate is eligible, naming what each lacks."""
        virtual = self.registry.virtual_models[name]
        strategy = overrides.strategy or virtual.strategy
        weights = STRATEGIES[strategy]
        complexity = classify(request)
        eligible: list[Model] = []
        inputs: dict[str, int] = {}
        skipped: dict[str, str] = {}
        counted: dict[tuple[Callable[[str], int], int], int] = {}
        for model in self.candidates(virtual):
            if not allowed(model.alias):
                skipped[model.alias] = "not allowed for this API key"
                continue
            if not self.registry.serves(model):  # no deployment of it is configured
                providers = ", ".join(dict.fromkeys(d.provider for d in model.routes()))
                skipped[model.alias] = f"provider {providers} not configured"
                continue
            counter = counter_for(model)  # models sharing a tokenizer share one count (a big prompt
            if counter not in counted:     # costs ~0.1 s per MB per tokenizer)
                counted[counter] = estimate_prompt_tokens(request, model)
            inputs[model.alias] = counted[counter]
            lacks = missing(request, model, inputs[model.alias])
            if lacks:
                skipped[model.alias] = "lacks " + ", ".join(lacks)
            else:
                eligible.append(model)
        if not eligible:
            why = "; ".join(f"{alias} {reason}" for alias, reason in skipped.items()) or "no candidates"
            raise InvalidRequest(f"no model behind '{name}' can serve this request: {why}", param="model",
                                 code="no_eligible_model")
        stats = (self.latency.snapshot([m.alias for m in eligible]) if weights.latency
                 else MeasuredLatency())
        out_tokens = request.max_completion_tokens or request.max_tokens or EXPECTED_OUTPUT_TOKENS
        candidates = [Contender(m, m.provider, m.price.cost(inputs[m.alias], out_tokens),
                                _sane(stats.ttft_ms(m.alias))) for m in eligible]
        ranked = rank(candidates, weights, complexity.tier, overrides.prefer_provider)
        chosen = ranked[0]
        met = None if overrides.prefer_provider is None else chosen.provider == overrides.prefer_provider
        return _decision(name, chosen, strategy, complexity, ranked, skipped, overrides.prefer_provider, met)


def _sane(ms: float | None) -> float | None:
    return ms if ms is not None and math.isfinite(ms) and ms >= 0 else None


def _decision(name: str, chosen: Contender, strategy: str, complexity: Complexity, ranked: list[Contender],
              skipped: dict[str, str], preferred: str | None, met: bool | None) -> Decision:
    return Decision(name, chosen.model.alias, strategy, complexity.tier, complexity.score,
                    tuple(c.model.alias for c in ranked), skipped, preferred, met)
