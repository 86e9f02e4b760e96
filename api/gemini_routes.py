"""Gemini ingress: ``POST /v1beta/models/{model}:generateContent``, ``:streamGenerateContent`` and
``:countTokens``; ``GET /v1beta/models`` and ``GET /v1beta/models/{model}``.

The POST routes also answer under ``/v1`` (the version the google-genai SDK calls by default); ``GET
/v1/models`` stays OpenAI's. ``streamGenerateContent?alt=sse`` streams ``data: <response>`` events,
without ``alt=sse`` it streams one JSON array of responses, as Google does. Keys come as
``x-goog-api-key``, ``?key=`` (only on these routes) or ``Authorization: Bearer`` (``api/auth.py``).
Every error, including those raised before the view (authentication) and werkzeug's, is rendered by
this blueprint's own handlers in Google's shape ``{"error": {"code", "message", "status"}}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, g, jsonify, request

from api.errors import install_error_handlers
from api.requests import admit, gateway, idempotency, json_body, may_use, outcome_headers, resolve
from api.streaming import stream_response
from common.errors import GatewayError, NotFound
from common.protocols import gemini
from common.registry import Model
from common.tokens import estimate_prompt_tokens

bp = Blueprint("gemini", __name__)

VERSIONS = ("/v1beta", "/v1")  # Google serves both; the SDK's default is v1, most examples use v1beta
CHAT_METHODS = ["generateContent", "streamGenerateContent", "countTokens"]


def key_in_query() -> str | None:
    """Google's ``?key=`` API key, accepted on this blueprint's routes only: keys in URLs end up in
    access logs, and no other protocol sends them there."""
    return request.args.get("key") if request.blueprint == bp.name else None


def _model_method(method: str) -> Callable[[Callable[[str], Response]], Callable[[str], Response]]:
    """Register a view as ``POST <version>/models/<model>:<method>`` for every served version."""
    def register(view: Callable[[str], Response]) -> Callable[[str], Response]:
        for version in VERSIONS:
            bp.add_url_rule(f"{version}/models/<path:model>:{method}", f"{method}{version.replace('/', '_')}",
                            view, methods=["POST"])
        return view
    return register


def _max_wait(body: Any) -> Any:
    return body.get("max_wait") if isinstance(body, dict) else None


@_model_method("generateContent")
def generate_content(model: str) -> Response:
    body = json_body()
    idem = idempotency(body)
    chat = gemini.parse_request(body, model)
    call = admit(chat, _max_wait(body))
    outcome = call.gw.call(chat, call.route, max_wait=call.max_wait,
                           max_cost=call.max_cost, api_key_id=g.api_key_id, idem=idem)
    response = jsonify(gemini.render_response(outcome.result, chat.model))
    response.headers.update(outcome_headers(outcome))
    return response


@_model_method("streamGenerateContent")
def stream_generate_content(model: str) -> Response:
    body = json_body()
    chat = gemini.parse_request(body, model, stream=True)
    call = admit(chat, _max_wait(body))
    watch = call.gw.start(chat, call.route, max_wait=call.max_wait,
                          max_cost=call.max_cost, api_key_id=g.api_key_id)
    stream = GeminiSse(chat.model) if request.args.get("alt") == "sse" else GeminiJsonArray(chat.model)
    return stream_response(call.gw, watch, stream, call.headers)


@_model_method("countTokens")
def count_tokens(model: str) -> Response:
    """The gateway's estimate (the one TPM reservations use), not the provider's exact count. The body
    is ``{"contents": …}`` or ``{"generateContentRequest": {…}}``."""
    body = json_body()
    if isinstance(body, dict) and isinstance(body.get("generateContentRequest"), dict):
        body = body["generateContentRequest"]
    chat = gemini.parse_request(body, model)
    route = admit(chat, None).route  # a virtual model: counted for the alias it resolves to
    return jsonify({"totalTokens": estimate_prompt_tokens(chat, route.model)})


@bp.get("/v1beta/models")
def list_models() -> Response:
    """Every routable model, on one page (no ``nextPageToken``)."""
    registry = gateway().settings.registry
    return jsonify({"models": [_model_resource(alias, m) for alias, m in registry.models.items()
                               if registry.serves(m) and may_use(alias)]})


@bp.get("/v1beta/models/<path:model>")
def get_model(model: str) -> Response:
    route = resolve(model)
    return jsonify(_model_resource(model, route.model))


@bp.route("/v1beta/<path:anything>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def unknown(anything: str) -> Response:
    """Paths Google has and the gateway does not serve (files, caches, tuning, embeddings…)."""
    raise NotFound(f"the gateway does not serve /v1beta/{anything} (it serves generateContent, "
                   "streamGenerateContent, countTokens and the model list)")


def _model_resource(alias: str, model: Model) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "name": f"models/{alias}", "baseModelId": alias, "version": model.model, "displayName": alias,
        "inputTokenLimit": model.context_window,
        "supportedGenerationMethods": CHAT_METHODS if "chat" in model.capabilities else []}
    if model.max_output_tokens:
        resource["outputTokenLimit"] = model.max_output_tokens
    return resource


class GeminiSse:
    """``?alt=sse``: one ``data: <GenerateContentResponse>`` event per response. The keep-alive while
    the call waits in line is a bare blank line: the google-genai SDK reads any other non-``data``
    line (an SSE comment too) as JSON."""

    mimetype = "text/event-stream"

    def __init__(self, model_alias: str) -> None:
        self.renderer = gemini.StreamRenderer(model_alias)

    def _emit(self, documents: list[dict[str, Any]]) -> list[str]:
        return [f"data: {json.dumps(d, separators=(',', ':'))}\r\n\r\n" for d in documents]

    def chunk(self, chunk: dict[str, Any]) -> list[str]:
        return self._emit(self.renderer.feed(chunk))

    def done(self, meta: dict[str, Any]) -> list[str]:
        return self._emit(self.renderer.close())

    def error(self, error: GatewayError) -> list[str]:
        return self._emit([gemini.render_error(error.status, error.type, error.message, param=error.param)])

    def waiting(self, position: int | None) -> list[str]:
        return ["\r\n"]


class GeminiJsonArray(GeminiSse):
    """No ``alt``: the whole stream is one JSON array, ``[{…}`` then ``,\\r\\n{…}`` per response and
    ``]`` at the end (an error is its last element). The keep-alive is whitespace, which JSON allows
    before the array opens."""

    mimetype = "application/json"

    def __init__(self, model_alias: str) -> None:
        super().__init__(model_alias)
        self.opened = False

    def _emit(self, documents: list[dict[str, Any]]) -> list[str]:
        out = []
        for document in documents:
            out.append(("\r\n,\r\n" if self.opened else "[") + json.dumps(document, separators=(",", ":")))
            self.opened = True
        return out

    def done(self, meta: dict[str, Any]) -> list[str]:
        return super().done(meta) + ["]"]

    def error(self, error: GatewayError) -> list[str]:
        return super().error(error) + ["]"]


def gemini_document(exc: GatewayError) -> dict[str, Any]:
    """Any gateway error in Google's shape."""
    return gemini.render_error(exc.status, exc.type, exc.message, param=exc.param)


install_error_handlers(bp, gemini_document)
