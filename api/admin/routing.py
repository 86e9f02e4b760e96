"""``GET /admin/routing``: every deployment as routing sees it now — breaker state (and why, and when
it lets a probe through), decaying error rate and latency, jobs waiting for its provider and when a
new one would start, and its provider's limits with their current use (headroom) — plus each alias's
strategy, deployments and fallback chain."""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify

from api.admin import admin_blueprint
from api.requests import gateway
from common.routing import candidates

bp = admin_blueprint("admin_routing", __name__)


@bp.get("/routing")
def routing() -> Response:
    gw = gateway()
    registry = gw.settings.registry
    limits = gw.limits()
    seen: dict[str, Any] = {}
    models: dict[str, Any] = {}
    for alias, model in registry.models.items():
        chain = candidates(registry, alias)
        models[alias] = {"strategy": registry.strategy_of(model),
                         "deployments": [d.name for d in model.routes()],
                         "fallbacks": list(registry.fallbacks_of(model)),
                         "routable": bool(chain)}
        for candidate, load in gw.router.observe([c for c in chain if c.alias == alias]):
            d = candidate.deployment
            seen.setdefault(d.name, {
                "provider": d.provider, "provider_model": d.model, "weight": d.weight,
                "price": {"input": str(d.price.input), "output": str(d.price.output)} if d.price else None,
                "context_window": d.context_window,
                "breaker": load.breaker.value, "reason": load.reason or None,
                "reopens_in_s": round(load.reopens_in_s, 2), "probe_free": load.probe_free,
                "error_rate": None if load.error_rate is None else round(load.error_rate, 4),
                "latency_ms": None if load.latency_ms is None else round(load.latency_ms, 1),
                "waiting": load.waiting,
                "start_in_s": None if load.start_in_s is None else round(load.start_in_s, 2),
                "limits": limits.get(d.provider, {})})
    return jsonify({"models": models, "deployments": seen})
