"""``GET /metrics``: Prometheus's text format — every process's samples on this host (multiprocess
mode) plus each provider's queue, line and limiter state read from Redis now. Public, like
``/health``; what it shows is in docs/metrics.md."""

from __future__ import annotations

from typing import Any

import redis
from flask import Blueprint, Response

from api.requests import gateway
from common.observability.metrics import CONTENT_TYPE, StateCollector, exposition

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def scrape() -> Response:
    gw = gateway()

    def state() -> dict[str, Any]:
        try:
            return gw.limits()
        except redis.RedisError:  # Redis down: the counters still answer; /health says why
            return {}

    body = exposition(gw.settings.observability.metrics_dir, [StateCollector(state)])
    return Response(body, mimetype=CONTENT_TYPE.split(";")[0], headers={"Content-Type": CONTENT_TYPE})
