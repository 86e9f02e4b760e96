"""``/admin/keys``: API keys over REST (JSON), for admins only (api/admin/__init__.py guards it).

    POST   /admin/keys                 create; 201 with the key and its ``secret`` (shown this once)
    GET    /admin/keys?limit=&after=   list in creation order: {"object": "list", "data": [...],
                                       "has_more", "next_cursor"}; pass next_cursor as ``after``
    GET    /admin/keys/<id>            one key
    PATCH  /admin/keys/<id>            change name, role, allowed_models, expires_at, metadata, limits, team
    DELETE /admin/keys/<id>            revoke (also POST /admin/keys/<id>/revoke); idempotent

Fields and their rules: ``common/keyschema.py``. Every handler is a call into
:class:`common.apikeys.KeyService` — the CLI calls the same one.
"""

from __future__ import annotations

from typing import Any

from flask import Response, current_app, jsonify, request

from api.admin import admin_blueprint
from api.requests import json_body
from common.apikeys import PAGE_DEFAULT, KeyService, key_view
from common.errors import InvalidRequest
from common.keyschema import KeyCreate, KeyUpdate, parse_body

bp = admin_blueprint("admin_keys", __name__)


def service() -> KeyService:
    return current_app.extensions["keys"]


@bp.post("/keys")
def create() -> tuple[Response, int]:
    row, secret = service().create(parse_body(KeyCreate, json_body()))
    return jsonify({**key_view(row), "secret": secret}), 201


@bp.get("/keys")
def list_keys() -> Response:
    page = service().list(limit=_int_arg("limit", PAGE_DEFAULT), after=request.args.get("after") or None)
    data: dict[str, Any] = {"object": "list", "data": [key_view(row) for row in page.keys],
                            "has_more": page.has_more, "next_cursor": page.next_cursor}
    return jsonify(data)


@bp.get("/keys/<key_id>")
def get(key_id: str) -> Response:
    return jsonify(key_view(service().get(key_id)))


@bp.patch("/keys/<key_id>")
def update(key_id: str) -> Response:
    return jsonify(key_view(service().update(key_id, parse_body(KeyUpdate, json_body()))))


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
