"""``/admin/keys``: API keys over REST (JSON), for admins only (api/admin/__init__.py guards it).

    POST   /admin/keys                 create; 201 with the key and its ``secret`` (shown this once)
    GET    /admin/keys?limit=&after=   list in creation order: {"object": "list", "data": [...],
                                       "has_more", "next_cursor"}; pass next_cursor as ``after``
    GET    /admin/keys/<id>            one key, with its ``budgets`` and their figures (as /admin/budgets)
    PATCH  /admin/keys/<id>            change name, role, allowed_models, expires_at, metadata, limits, team,
                                       budgets (the list replaces the key's set, matched by name; left
                                       out: unchanged)
    DELETE /admin/keys/<id>            revoke (also POST /admin/keys/<id>/revoke); idempotent

Fields and their rules: ``common/keyschema.py``. Every handler is a call into
:class:`common.apikeys.KeyService` (with its budgets, :class:`common.keybudgets.KeyBudgets`) — the CLI
calls the same ones. Create, get and update answer with the key's ``budgets``; the list does not.
"""

from __future__ import annotations

from typing import Any

from flask import Response, current_app, jsonify, request

from api.admin import admin_blueprint
from api.requests import gateway, json_body
from common.apikeys import PAGE_DEFAULT, KeyService, key_view
from common.db import ApiKey
from common.errors import InvalidRequest
from common.keybudgets import KeyBudgets
from common.keyschema import KeyCreate, KeyUpdate, parse_body

bp = admin_blueprint("admin_keys", __name__)


def service() -> KeyService:
    return current_app.extensions["keys"]


def with_budgets() -> KeyBudgets:
    gate = gateway().budgets
    return KeyBudgets(service(), gate.rows, gate.state, gate.book)


def full_view(row: ApiKey) -> dict[str, Any]:
    """The key and its budgets with this period's figures (spent, reserved, limit, resets_at)."""
    gate = gateway().budgets
    return {**key_view(row), "budgets": gate.describe_all(gate.rows.of_key(row.id))}


@bp.post("/keys")
def create() -> tuple[Response, int]:
    row, secret = with_budgets().create(parse_body(KeyCreate, json_body()))
    return jsonify({**full_view(row), "secret": secret}), 201


@bp.get("/keys")
def list_keys() -> Response:
    page = service().list(limit=_int_arg("limit", PAGE_DEFAULT), after=request.args.get("after") or None)
    data: dict[str, Any] = {"object": "list", "data": [key_view(row) for row in page.keys],
                            "has_more": page.has_more, "next_cursor": page.next_cursor}
    return jsonify(data)


@bp.get("/keys/<key_id>")
def get(key_id: str) -> Response:
    return jsonify(full_view(service().get(key_id)))


@bp.patch("/keys/<key_id>")
def update(key_id: str) -> Response:
    return jsonify(full_view(with_budgets().update(key_id, parse_body(KeyUpdate, json_body()))))


@bp.delete("/keys/<key_id>")
@bp.post("/keys/<key_id>/revoke")
def revoke(key_id: str) -> Response:
    return jsonify(key_view(service().revoke(key_id)))


def _int_arg(name: str, default: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer, got {raw!r}", param=name) from None
