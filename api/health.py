"""``GET /health``: can we reach Redis and Postgres, which providers can take calls (and why not), and
how each provider's upstream answered lately (``status``: ok | degraded | failing |
credentials_rejected; error rate and last error over the last few minutes, from every worker).

The answer's HTTP status follows the gateway's own parts only (Redis, Postgres): a failing upstream
does not make the gateway unhealthy to a load balancer — it is shown per provider."""

from __future__ import annotations

from typing import Any

import redis
from flask import Blueprint, Response, g, jsonify
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from api.requests import gateway
from common.upstream_health import UpstreamHealth

bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> Response:
    gw = gateway()
    checks: dict[str, str] = {}
    try:
        gw.store.redis.ping()
        checks["redis"] = "ok"
    except redis.RedisError as exc:
        checks["redis"] = f"error: {type(exc).__name__}"
    try:
        with gw.sessions() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except SQLAlchemyError as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    registry = gw.settings.registry
    upstream = _upstream(gw.store.redis, gw.settings.key_prefix, gw.settings.routable_providers()
                         if checks["redis"] == "ok" else [])
    providers = {}
    for name, p in registry.providers.items():
        models = [a for a, m in registry.models.items() if m.provider == name]
        entry: dict[str, object] = {"kind": p.kind, "routable": p.routable,
                                    "queue": gw.settings.queue_for(name), "models": models}
        if not p.routable:
            entry["status"] = "not_configured"
            entry["reason"] = p.unroutable_reason
        elif checks["redis"] == "ok":
            entry["queue_depth"] = gw.queue_depth(p)
        if name in upstream:  # how its upstream answered lately: status, error rate, last error
            entry.update(upstream[name])
        providers[name] = entry
    healthy = all(v == "ok" for v in checks.values())
    response = jsonify({"status": "ok" if healthy else "degraded", **checks, "providers": providers})
    response.status_code = 200 if healthy else 503
    return response


def _upstream(client: redis.Redis, prefix: str, names: list[str]) -> dict[str, dict[str, Any]]:
    """Each provider's recent upstream record (common/upstream_health.py); none if Redis fails now."""
    try:
        return UpstreamHealth(client, prefix).snapshot(names)
    except redis.RedisError:
        return {}  # the "redis" check above already says Redis is unwell


@bp.get("/v1/limits")
def limits() -> Response:
    """Every provider's configured limits, use over the last 60 s, jobs waiting in line and in the
    broker queue, and any cooldown an upstream 429 imposed; and the calling API key's own quota
    (``key_limits``), its use and how long it is blocked at that quota."""
    gw = gateway()
    body: dict[str, Any] = {"providers": gw.limits()}
    key_id = g.get("api_key_id") or "-"
    key_limits = gw.limits_of_key(key_id)
    if key_limits.any:
        body["api_key"] = {"id": key_id, **gw.limiter.key_use(key_id, key_limits)}
    return jsonify(body)
