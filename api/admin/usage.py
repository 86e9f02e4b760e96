"""``GET /admin/usage`` (and ``/admin/usage.csv``): everyone's usage, filtered by key, model, provider.

Parameters and defaults: ``common/usage/query.py``; the report itself: ``common/usage/report.py``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Response

from api.admin import admin_blueprint
from api.usage_routes import query_args, usage_response
from common.usage import FILTERS, parse_query

bp = admin_blueprint("admin_usage", __name__)


@bp.get("/usage")
def usage() -> Response:
    return usage_response(parse_query(query_args(), datetime.now(UTC), filters=FILTERS))


@bp.get("/usage.csv")
def usage_csv() -> Response:
    """The same report as a CSV download (``format`` may be left out)."""
    return usage_response(parse_query({**query_args(), "format": "csv"}, datetime.now(UTC), filters=FILTERS))
