"""Rendering errors in the caller's own protocol. Never a stack trace, never a bare 500 page.

Each blueprint installs the handlers with its protocol's renderer (:func:`install_error_handlers`),
so whatever is raised inside its routes — a :class:`GatewayError`, a werkzeug ``HTTPException``
(404/405/413), a lost Postgres or Redis connection, a bug — answers in that protocol's shape. The
app installs the same handlers with OpenAI's renderer for everything that belongs to no blueprint
(unknown paths, ``/health``, ``/v1/jobs``).

Outages are not bugs: a lost Postgres connection becomes :class:`StoreUnavailable`, a lost Redis
connection :class:`QueueUnavailable` (both 503 with ``Retry-After``), logged as one line at most
every :data:`OUTAGE_LOG_INTERVAL_S` seconds per kind instead of a traceback per request.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import redis
import sqlalchemy.exc
from flask import Blueprint, Flask, Response, current_app, jsonify
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from common.errors import GatewayError, InternalError, PayloadTooLarge, QueueUnavailable, StoreUnavailable
from common.outage import OutageLog
from common.protocols import anthropic, ollama
from common.protocols.openai import error_body

log = logging.getLogger(__name__)

Render = Callable[[GatewayError], dict[str, Any]]

#: what SQLAlchemy raises when Postgres cannot be reached (as opposed to a bad statement: a bug)
STORE_DOWN: tuple[type[Exception], ...] = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                                           sqlalchemy.exc.DisconnectionError, sqlalchemy.exc.TimeoutError)
#: what redis-py raises when Redis cannot be reached
QUEUE_DOWN: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)
OUTAGE_RETRY_AFTER_S = 2
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout"}


def openai_document(exc: GatewayError) -> dict[str, Any]:
    return error_body(exc.type, exc.message, exc.code, exc.param)


def anthropic_document(exc: GatewayError) -> dict[str, Any]:
    return anthropic.render_error(exc.status, exc.type, exc.message)


def ollama_document(exc: GatewayError) -> dict[str, Any]:
    return ollama.render_error(exc.status, exc.type, exc.message)


def error_response(exc: GatewayError, render: Render) -> Response:
    response = jsonify(render(exc))
    response.status_code = exc.status
    response.headers.update(exc.headers())
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return response


def from_http_exception(exc: HTTPException) -> GatewayError:
    """A werkzeug HTTP error (routing's 404/405, a body over the limit) as one of ours."""
    if exc.code == 413:
        limit = current_app.config.get("MAX_CONTENT_LENGTH")
        return PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    code = _HTTP_CODES.get(exc.code or 0, "http_error")
    return GatewayError(exc.description or exc.name, status=exc.code or 400, code=code)


_outages = OutageLog()


def store_unavailable(exc: BaseException) -> StoreUnavailable:
    _outages.warn("postgres", exc)
    return StoreUnavailable("the gateway's database is unreachable; nothing was recorded, retry shortly",
                            retry_after=OUTAGE_RETRY_AFTER_S)


def queue_unavailable(exc: BaseException) -> QueueUnavailable:
    _outages.warn("redis", exc)
    return QueueUnavailable("the gateway's queue is unreachable; retry shortly",
                            retry_after=OUTAGE_RETRY_AFTER_S)


def install_error_handlers(target: Flask | Blueprint, render: Render) -> None:
    """Answer every error raised in ``target``'s routes (a blueprint) or anywhere else (the app) with
    ``render``'s shape. Handlers are registered by class, never by status code, so a blueprint's
    handler wins over the app's for everything raised inside its routes."""

    def gateway_error(exc: GatewayError) -> Response:
        return error_response(exc, render)

    def http_error(exc: HTTPException) -> Response:
        response = error_response(from_http_exception(exc), render)
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    def store_down(exc: Exception) -> Response:
        return error_response(store_unavailable(exc), render)

    def queue_down(exc: Exception) -> Response:
        return error_response(queue_unavailable(exc), render)

    def unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(InternalError("internal error in the gateway; it has been logged"), render)

    target.register_error_handler(GatewayError, gateway_error)
    target.register_error_handler(HTTPException, http_error)
    for cls in STORE_DOWN:
        target.register_error_handler(cls, store_down)
    for cls in QUEUE_DOWN:
        target.register_error_handler(cls, queue_down)
    target.register_error_handler(Exception, unexpected)
