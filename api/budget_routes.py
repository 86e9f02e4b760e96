"""``GET /v1/budget``: the calling key's budgets (its own and the gateway-wide ones) with what they
have spent and hold reserved this period, their limits and when they reset."""

from __future__ import annotations

from flask import Blueprint, Response, g, jsonify

from api.errors import install_error_handlers, openai_document
from api.requests import gateway

bp = Blueprint("budget", __name__)
install_error_handlers(bp, openai_document)


@bp.get("/v1/budget")
def my_budgets() -> Response:
    gate = gateway().budgets
    gate.book.forget()  # an operator's change shows at once here
    return jsonify({"object": "list", "key_id": g.api_key_id,
                    "data": gate.describe_all(gate.book.applicable(g.api_key_id))})
