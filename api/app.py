"""The Flask app factory. Collaborators are built here from settings (or passed in by tests)."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime

import redis
from flask import Flask, Response, g, request

from api import (
    anthropic_routes,
    budget_routes,
    gemini_routes,
    health,
    jobs_routes,
    metrics_route,
    observe,
    ollama_routes,
    openai_routes,
)
from api.admin import PREFIX as ADMIN_PREFIX
from api.admin import budgets as admin_budgets
from api.admin import keys as admin_keys
from api.admin import routing as admin_routing
from api.admin.usage import bp as admin_usage_bp
from api.auth import Authenticator, LastUsed
from api.dashboard import PREFIX as DASHBOARD_PREFIX
from api.dashboard import install as install_dashboard
from api.dispatcher import ReplyDispatcher
from api.errors import install_error_handlers, openai_document
from api.gateway import Gateway
from api.redeliver import SyncRedelivery
from api.usage_routes import bp as usage_bp
from common.apikeys import ANONYMOUS, KeyService
from common.db import make_session_factory
from common.errors import NotFound
from common.jobs import JobStore
from common.keyschema import KeyRecord
from common.registry import Limits
from common.settings import Settings

PUBLIC_PATHS = frozenset({"/health", "/metrics"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# control characters and what undecodable bytes become: no route has them, Postgres cannot hold NUL
_BAD_PATH = re.compile("[\x00-\x1f\x7f\ud800-\udfff\ufffd]")


def create_app(settings: Settings) -> Flask:
    if settings.redis_url is None or settings.database_url is None:
        raise ValueError("the API needs REDIS_URL and DATABASE_URL")
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["GATEWAY_CLIENT_TIMEOUT"] = settings.client_timeout  # read by api.gunicorn_worker
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.json.compact = True  # type: ignore[attr-defined]

    # bounded: thousands of held requests share these, none holds one while it waits
    pool = redis.BlockingConnectionPool.from_url(settings.redis_url, max_connections=64, timeout=10,
                                                 health_check_interval=30)
    store = JobStore(redis.Redis(connection_pool=pool), settings.key_prefix)
    sessions = make_session_factory(settings.database_url, pool_size=5)
    gateway = Gateway(settings, store, sessions, ReplyDispatcher(store, SyncRedelivery(store, settings)))
    keys = KeyService(sessions, store.redis, settings.key_prefix)
    authenticator = Authenticator(settings.auth_mode, keys.records, version=keys.version,
                                  stale_limit=settings.auth_stale_limit)
    last_used = LastUsed(keys.touch)
    app.extensions["gateway"] = gateway
    app.extensions["keys"] = keys
    # called by api.gunicorn_worker on SIGTERM / Ctrl-C: held callers get the drain time, then a 503
    app.extensions["begin_stop"] = lambda: gateway.begin_stop(settings.drain_timeout)
    observe.install(app, settings)
    app.config["GATEWAY_ADMIN_KEY"] = settings.admin_key

    def admin_identify(secret: str) -> tuple[str, bool] | None:
        record = authenticator.identify(secret)
        if record is None:
            return None
        record.check_usable(datetime.now(UTC))
        last_used.mark(record.id)
        return record.id, record.is_admin

    def own_limits(key_id: str | None) -> Limits | None:
        """The calling key's own limits (its job spec carries them to the workers)."""
        record: KeyRecord | None = g.get("api_key")
        return record.limits if record is not None and record.id == key_id else None

    app.extensions["admin_identify"] = admin_identify
    gateway.key_limits = own_limits

    @app.before_request
    def _identify() -> None:
        observe.begin()
        if _BAD_PATH.search(request.path):
            raise NotFound("no such path (it contains control characters or invalid UTF-8)")
        incoming = request.headers.get("x-request-id", "")
        g.request_id = incoming if _REQUEST_ID.match(incoming) else "req_" + secrets.token_hex(12)
        g.api_key_id, g.api_key = None, None
        # /admin and /dashboard check their own callers (an admin key; the dashboard's session)
        if request.path not in PUBLIC_PATHS and not request.path.startswith(
                (ADMIN_PREFIX + "/", DASHBOARD_PREFIX + "/")):
            record = authenticator.authenticate(request.headers, gemini_routes.key_in_query())
            if record is not None:
                record.check_usable(datetime.now(UTC))
                last_used.mark(record.id)
                g.api_key = record
            # auth is open: the caller owns what anonymous callers own
            g.api_key_id = record.id if record is not None else ANONYMOUS

    @app.after_request
    def _tag(response: Response) -> Response:
        response.headers["x-request-id"] = g.get("request_id", "")
        return observe.finish(response)

    # paths of no protocol blueprint (unknown paths, /health, /v1/jobs) answer in OpenAI's shape;
    # each protocol blueprint installs its own handlers with its own shape
    install_error_handlers(app, openai_document)
    app.register_blueprint(openai_routes.bp)
    app.register_blueprint(jobs_routes.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(metrics_route.bp)
    app.register_blueprint(anthropic_routes.bp)
    app.register_blueprint(ollama_routes.bp)
    app.register_blueprint(gemini_routes.bp)
    app.register_blueprint(usage_bp)
    app.register_blueprint(admin_usage_bp)
    app.register_blueprint(admin_keys.bp)
    app.register_blueprint(budget_routes.bp)
    app.register_blueprint(admin_budgets.bp)
    app.register_blueprint(admin_routing.bp)
    install_dashboard(app, settings)
    return app
