"""``GET /health``: can we reach Redis and Postgres, and which providers can take calls (and why not)."""

from __future__ import annotations

from typing import Any

import redis
from flask import Blueprint, Response, g, jsonify
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from api.requests import gateway

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
    providers = {}
    for name, p in gw.settings.registry.providers.items():
        models = [a for a, m in gw.settings.registry.models.items() if m.provider == name]
        entry: dict[str, object] = {"kind": p.kind, "routable": p.routable,
                                    "queue": gw.settings.queue_for(name), "models": models}
        if not p.routable:
            entry["reason"] = p.unroutable_reason
        elif checks["redis"] == "ok":
            entry["queue_depth"] = gw.queue_depth(p)
        providers[name] = entry
    healthy = all(v == "ok" for v in checks.values())
    response = jsonify({"status": "ok" if healthy else "degraded", **checks, "providers": providers})
    response.status_code = 200 if healthy else 503
    return response


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
