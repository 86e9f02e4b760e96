"""Rendering errors in the caller's own protocol. Never a stack trace, never a bare 500 page."""

from __future__ import annotations

import logging
import math

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from common.errors import GatewayError, PayloadTooLarge
from common.protocols import anthropic, ollama
from common.protocols.openai import error_body

log = logging.getLogger(__name__)


def error_document(exc: GatewayError, path: str) -> dict[str, object]:
    """The error in the shape of the protocol the caller speaks, chosen by the path it called."""
    if path.startswith("/v1/messages"):
        return anthropic.render_error(exc.status, exc.type, exc.message)
    if path.startswith("/api/"):
        return ollama.render_error(exc.status, exc.type, exc.message)
    return error_body(exc.type, exc.message, exc.code, exc.param)


def openai_error_response(exc: GatewayError) -> Response:
    response = jsonify(error_document(exc, request.path))
    response.status_code = exc.status
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return response


def install_error_handlers(app: Flask) -> None:
    @app.errorhandler(GatewayError)
    def _gateway_error(exc: GatewayError) -> Response:
        return openai_error_response(exc)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge) -> Response:
        limit = app.config.get("MAX_CONTENT_LENGTH")
        return openai_error_response(PayloadTooLarge(f"request body exceeds the limit of {limit} bytes"))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.code or 0, "http_error")
        error = GatewayError(exc.description or exc.name, status=exc.code or 400, code=code)
        return openai_error_response(error)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return openai_error_response(GatewayError("internal error in the gateway; it has been logged",
                                                  status=500, code="internal_error"))
