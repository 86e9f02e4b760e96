"""The admin surface, ``/admin/...``: one blueprint per resource (keys, budgets, usage), each guarded by
:func:`install_admin_guard`.

Who may call it: the bearer of ``GATEWAY_ADMIN_KEY``, or an API key whose role is ``admin``. A valid
client key gets 403; no key or an unknown one gets 401. Errors come in OpenAI's shape, as on every
path of no other protocol. The CLI and the dashboard call the same service functions these routes
call (``common/…``), never their own SQL.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from flask import Blueprint, current_app, g, request

from api.auth import presented_key
from api.errors import install_error_handlers, openai_document
from common.errors import AuthenticationFailed, PermissionDenied

#: ``identify(secret) -> (key_id, is_admin)`` for an active key, None for an unknown one; set by
#: ``create_app`` in ``app.extensions["admin_identify"]``
Identify = Callable[[str], "tuple[str, bool] | None"]

PREFIX = "/admin"


def admin_blueprint(name: str, import_name: str) -> Blueprint:
    """A blueprint under ``/admin`` that only admins may call, answering errors in OpenAI's shape."""
    bp = Blueprint(name, import_name, url_prefix=PREFIX)
    install_error_handlers(bp, openai_document)
    bp.before_request(require_admin)
    return bp


def require_admin() -> None:
    """Admit the request if its key is the admin key or an admin-role key; sets ``g.admin_id``."""
    secret = presented_key(request.headers)
    if not secret:
        raise AuthenticationFailed("the admin API needs 'Authorization: Bearer <admin key>'")
    g.admin_id = admin_of(secret)


def admin_of(secret: str) -> str:
    """Who ``secret`` is as an admin: ``"admin"`` for ``GATEWAY_ADMIN_KEY``, else the id of an active
    admin-role key. Raises :class:`AuthenticationFailed` (unknown or revoked) or
    :class:`PermissionDenied` (a client key). The dashboard's login calls it too."""
    admin_key: str | None = current_app.config.get("GATEWAY_ADMIN_KEY")
    if admin_key and hmac.compare_digest(secret.encode(), admin_key.encode()):
        return "admin"
    identify: Identify = current_app.extensions["admin_identify"]
    found = identify(secret)
    if found is None:
        raise AuthenticationFailed("invalid or revoked admin key")
    key_id, is_admin = found
    if not is_admin:
        raise PermissionDenied("this API key has no admin role; the admin API needs GATEWAY_ADMIN_KEY "
                               "or a key created with the admin role")
    return key_id
