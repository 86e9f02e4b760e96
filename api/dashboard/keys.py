"""The Keys page: list, create (the secret shown once), edit, revoke — each a call into
:class:`common.apikeys.KeyService` with a body validated by ``common/keyschema.py``, exactly what
``/admin/keys`` does with a JSON body. A form is turned into that body here; a bad field is shown
on the page with the service's own message."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import current_app, render_template, request
from werkzeug.datastructures import MultiDict

from api.dashboard import bp
from common.apikeys import PAGE_MAX, KeyService, key_view
from common.errors import GatewayError, InvalidRequest
from common.keyschema import ROLES, KeyCreate, KeyUpdate, parse_body, parse_expiry
from common.limits import LIMIT_KINDS


def _service() -> KeyService:
    return current_app.extensions["keys"]


def body_of(form: MultiDict[str, str], *, creating: bool) -> dict[str, Any]:
    """A key body from the page's form: ``allowed_models`` comma-separated (empty: every model), each
    limit a number (empty: none; no limit at all: the registry's default), ``expires`` a duration
    (``30d``) or an RFC 3339 time (empty: never; kept as it is when editing)."""
    body: dict[str, Any] = {"name": form.get("name", "").strip(), "role": form.get("role", "client"),
                            "team": form.get("team", "").strip() or None}
    models = [m.strip() for m in form.get("allowed_models", "").split(",") if m.strip()]
    body["allowed_models"] = models or None
    limits = {}
    for kind in LIMIT_KINDS:
        raw = form.get(f"limit_{kind.name}", "").strip()
        if raw:
            if not raw.isdigit():
                raise InvalidRequest(f"limits.{kind.name}: a whole number ({kind.unit}), not {raw[:20]!r}",
                                     param=f"limits.{kind.name}")
            limits[kind.name] = int(raw)
    body["limits"] = limits or None
    expires = form.get("expires", "").strip()
    if expires:
        body["expires_at"] = parse_expiry(expires, datetime.now(UTC)).isoformat()
    elif creating or form.get("clear_expiry"):
        body["expires_at"] = None
    return body


def _page(status: int = 200, **extra: Any) -> tuple[str, int]:
    keys = [key_view(row) for row in _service().list(limit=PAGE_MAX).keys]
    keys.sort(key=lambda k: (k["revoked_at"] is not None, k["created_at"] or ""), reverse=False)
    context: dict[str, Any] = {"keys": keys, "roles": ROLES, "kinds": [k.name for k in LIMIT_KINDS],
                               "created": None, "error": None, "form": {}}
    context.update(extra)
    return render_template("keys.html", **context), status


@bp.get("/keys")
def keys_page() -> tuple[str, int]:
    return _page()


@bp.post("/keys")
def create_key() -> tuple[str, int]:
    try:
        row, secret = _service().create(parse_body(KeyCreate, body_of(request.form, creating=True)))
    except GatewayError as exc:
        return _page(exc.status, error=exc.message, form=request.form)
    return _page(201, created={**key_view(row), "secret": secret})


@bp.post("/keys/<key_id>/revoke")
def revoke_key(key_id: str) -> tuple[str, int]:
    try:
        row = _service().revoke(key_id)
    except GatewayError as exc:
        return _page(exc.status, error=exc.message)
    return _page(notice=f"Revoked {row.name} ({row.id}). Calls with it now get 401.")


@bp.get("/keys/<key_id>")
def edit_key(key_id: str) -> tuple[str, int]:
    try:
        key = key_view(_service().get(key_id))
    except GatewayError as exc:
        return _page(exc.status, error=exc.message)
    return render_template("key_edit.html", key=key, roles=ROLES, kinds=[k.name for k in LIMIT_KINDS],
                           error=None), 200


@bp.post("/keys/<key_id>")
def update_key(key_id: str) -> tuple[str, int]:
    try:
        row = _service().update(key_id, parse_body(KeyUpdate, body_of(request.form, creating=False)))
    except GatewayError as exc:
        try:
            key = key_view(_service().get(key_id))
        except GatewayError:
            return _page(exc.status, error=exc.message)
        return render_template("key_edit.html", key=key, roles=ROLES, kinds=[k.name for k in LIMIT_KINDS],
                               error=exc.message), exc.status
    return _page(notice=f"Saved {row.name} ({row.id}).")
