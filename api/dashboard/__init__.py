"""``/dashboard``: the operator's view in the browser — server-rendered HTML, a little vanilla JS and
inline SVG charts, nothing fetched from the internet.

Login takes the admin key (``GATEWAY_ADMIN_KEY`` or an admin-role API key, checked exactly as the admin
API checks it: :func:`api.admin.admin_of`) from a form and sets a signed session cookie
(``session.py``); the key itself is never stored, logged or put in a URL. Every page reads through
the same service code the admin API and the CLI use (``common/apikeys``, ``common/usage``,
``common/requestlog``, ``common/queueview``, ``Gateway.limits``) — no SQL here.

Pages: ``pages.py`` (overview, queues, usage, requests, jobs, playground), ``keys.py`` (keys).
"""

from __future__ import annotations

import logging
from decimal import Decimal
from urllib.parse import urlsplit

import redis
from flask import Blueprint, Flask, Response, current_app, g, redirect, render_template, request, url_for
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.wrappers import Response as BaseResponse

from api.admin import admin_of
from api.dashboard.session import COOKIE, MAX_AGE_S, Sessions, signing_secret
from common.apikeys import KeyService
from common.errors import AuthenticationFailed, NotFound, PermissionDenied
from common.settings import Settings

log = logging.getLogger(__name__)
PREFIX = "/dashboard"
bp = Blueprint("dashboard", __name__, url_prefix=PREFIX, template_folder="templates",
               static_folder="static", static_url_path="/static")
OPEN_ENDPOINTS = frozenset({"dashboard.login", "dashboard.static"})


def install(app: Flask, settings: Settings) -> None:
    """Register the dashboard on ``app`` with its session signer and its settings."""
    app.extensions["dashboard_sessions"] = Sessions(signing_secret(settings.dashboard_secret,
                                                                   settings.state_dir))
    app.extensions["dashboard_flower"] = settings.flower_url
    app.extensions["dashboard_flower_port"] = settings.flower_port
    import api.dashboard.keys  # noqa: F401  (their routes join bp)
    import api.dashboard.pages  # noqa: F401

    app.register_blueprint(bp)


def _sessions() -> Sessions:
    return current_app.extensions["dashboard_sessions"]


@bp.before_request
def require_session() -> BaseResponse | None:
    """Pages need a live session; a form post must also come from this dashboard (the cookie is
    SameSite=Strict already; a foreign ``Origin`` is refused as well)."""
    if request.endpoint in OPEN_ENDPOINTS:
        return None
    admin = _sessions().read(request.cookies.get(COOKIE))
    if admin is not None and admin != "admin" and not _still_admin(admin):
        admin = None
    if admin is None:
        if request.method == "GET" and not request.path.endswith("/live"):
            return redirect(url_for("dashboard.login", next=request.full_path.rstrip("?")))
        return Response("your dashboard session ended; log in again", status=401, mimetype="text/plain")
    if request.method == "POST" and not _same_origin():
        return Response("cross-site form posts are refused", status=403, mimetype="text/plain")
    g.admin_id = admin
    return None


def _still_admin(key_id: str) -> bool:
    """A session opened with an admin-role key ends when that key is revoked, expires or loses the role."""
    keys: KeyService = current_app.extensions["keys"]
    try:
        row = keys.get(key_id)
    except NotFound:
        return False
    return row.revoked_at is None and row.role == "admin"


def _same_origin() -> bool:
    origin = request.headers.get("Origin")
    return origin in (None, "null") or urlsplit(origin).netloc == request.host


def _safe_next(raw: str | None) -> str:
    """Only a path inside the dashboard (never another site): an open redirect would aid phishing."""
    if raw and raw.startswith(PREFIX + "/") and not raw.startswith("//"):
        return raw
    return url_for("dashboard.overview")


@bp.route("/login", methods=["GET", "POST"])
def login() -> BaseResponse | str | tuple[str, int]:
    no_admin_key = not current_app.config.get("GATEWAY_ADMIN_KEY")
    if request.method == "GET":
        return render_template("login.html", error=None, next=request.args.get("next", ""),
                               no_admin_key=no_admin_key)
    secret = request.form.get("key", "").strip()
    try:
        if not secret:
            raise AuthenticationFailed("enter the admin key")
        admin = admin_of(secret)
    except (AuthenticationFailed, PermissionDenied) as exc:
        status = 403 if isinstance(exc, PermissionDenied) else 401
        return render_template("login.html", error=exc.message, next=request.form.get("next", ""),
                               no_admin_key=no_admin_key), status
    response = redirect(_safe_next(request.form.get("next")))
    response.set_cookie(COOKIE, _sessions().issue(admin), max_age=MAX_AGE_S, httponly=True,
                        samesite="Strict", secure=request.is_secure, path=PREFIX)
    return response


@bp.post("/logout")
def logout() -> BaseResponse:
    response = redirect(url_for("dashboard.login"))
    response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="Strict")
    return response


@bp.errorhandler(redis.RedisError)
@bp.errorhandler(SQLAlchemyError)
def store_unavailable(exc: Exception) -> tuple[str, int]:
    """Redis or Postgres down: a page that says so (the gateway's own outage rules are elsewhere)."""
    store = "Redis" if isinstance(exc, redis.RedisError) else "PostgreSQL"
    log.warning("dashboard: %s unavailable: %s", store, type(exc).__name__)
    return render_template("unavailable.html", store=store), 503


@bp.context_processor
def _nav() -> dict[str, object]:
    """Every page's header: who is logged in and where Flower is (GATEWAY_FLOWER_URL, else this host
    on GATEWAY_FLOWER_PORT, as ``llm-gateway up`` serves it)."""
    flower = current_app.extensions.get("dashboard_flower")
    if not flower:
        host = request.host.rsplit(":", 1)[0]
        flower = f"{request.scheme}://{host}:{current_app.extensions['dashboard_flower_port']}/"
    return {"flower_url": flower, "admin_id": g.get("admin_id"),
            "ms": fmt_ms, "usd": fmt_usd, "secs": fmt_secs}


def fmt_ms(value: float | None) -> str:
    """Milliseconds for people: ``—`` for none, ``840 ms``, ``2.4 s``."""
    if value is None:
        return "—"
    return f"{value:.0f} ms" if value < 1000 else f"{value / 1000:.1f} s"


def fmt_secs(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.0f} min"


def fmt_usd(value: Decimal | float) -> str:
    """Dollars with cents, or four significant places under a cent (LLM calls cost fractions of one)."""
    amount = float(value)
    if amount == 0:
        return "$0.00"
    if abs(amount) >= 0.01:
        return f"${amount:,.2f}"
    return f"${amount:.10f}".rstrip("0") if abs(amount) >= 1e-10 else "<$0.0000000001"
