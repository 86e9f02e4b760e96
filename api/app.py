"""The Flask app factory. Collaborators are built here from settings (or passed in by tests)."""

from __future__ import annotations

import re
import secrets

import redis
from flask import Flask, Response, g, request

from api import anthropic_routes, gemini_routes, health, jobs_routes, ollama_routes, openai_routes
from api.admin import PREFIX as ADMIN_PREFIX
from api.admin import routing as admin_routing
from api.auth import Authenticator
from api.dispatcher import ReplyDispatcher
from api.errors import install_error_handlers, openai_document
from api.gateway import Gateway
from common.apikeys import ANONYMOUS, active_key_hashes
from common.db import make_session_factory
from common.errors import NotFound
from common.jobs import JobStore
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
    gateway = Gateway(settings, store, sessions, ReplyDispatcher(store))
    authenticator = Authenticator(settings.auth_mode, lambda: active_key_hashes(sessions),
                                  stale_limit=settings.auth_stale_limit)
    app.extensions["gateway"] = gateway
    app.config["GATEWAY_ADMIN_KEY"] = settings.admin_key
    # no key has the admin role yet: the admin API answers to GATEWAY_ADMIN_KEY only
    app.extensions["admin_identify"] = lambda secret: (
        None if (key_id := authenticator.identify(secret)) is None else (key_id, False))

    @app.before_request
    def _identify() -> None:
        if _BAD_PATH.search(request.path):
            raise NotFound("no such path (it contains control characters or invalid UTF-8)")
        incoming = request.headers.get("x-request-id", "")
        g.request_id = incoming if _REQUEST_ID.match(incoming) else "req_" + secrets.token_hex(12)
        g.api_key_id = None
        if request.path not in PUBLIC_PATHS and not request.path.startswith(ADMIN_PREFIX + "/"):
            g.api_key_id = (authenticator.authenticate(request.headers, gemini_routes.key_in_query())
                            or ANONYMOUS)  # auth is open: the caller owns what anonymous callers own

    @app.after_request
    def _tag(response: Response) -> Response:
        response.headers["x-request-id"] = g.get("request_id", "")
        return response

    # paths of no protocol blueprint (unknown paths, /health, /v1/jobs) answer in OpenAI's shape;
    # each protocol blueprint installs its own handlers with its own shape
    install_error_handlers(app, openai_document)
    app.register_blueprint(openai_routes.bp)
    app.register_blueprint(jobs_routes.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(anthropic_routes.bp)
    app.register_blueprint(ollama_routes.bp)
    app.register_blueprint(gemini_routes.bp)
    app.register_blueprint(admin_routing.bp)
    return app
