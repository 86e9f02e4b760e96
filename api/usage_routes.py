"""``GET /v1/usage``: the calling key's own usage, from the rollups (``common/usage``).

Parameters and defaults: ``common/usage/query.py``. With auth open, the caller is ``anonymous`` and
sees what anonymous calls used. Errors in OpenAI's shape (this path belongs to no other protocol).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from flask import Blueprint, Response, current_app, g, jsonify, request

from common.usage import UsageQuery, as_csv, as_json, csv_filename, parse_query, report

bp = Blueprint("usage", __name__)


def query_args() -> dict[str, str]:
    """The request's parameters; a repeated one (``group_by=day&group_by=key``) joined with commas."""
    return {name: ",".join(request.args.getlist(name)) for name in request.args}


def usage_response(query: UsageQuery) -> Response:
    """The report ``query`` asks for, as JSON or as a CSV download."""
    result = report(current_app.extensions["gateway"].sessions, query)
    if query.format == "csv":
        return Response(as_csv(result), mimetype="text/csv", headers={
            "Content-Disposition": f'attachment; filename="{csv_filename(result)}"'})
    return jsonify(as_json(result))


@bp.get("/v1/usage")
def own_usage() -> Response:
    query = parse_query(query_args(), datetime.now(UTC), filters=("model", "provider"))
    return usage_response(replace(query, keys=(g.api_key_id,)))
