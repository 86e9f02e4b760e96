"""Ollama ingress: ``POST /api/chat``, ``POST /api/generate``, ``POST /api/embed``, ``GET /api/tags``,
``POST /api/show``, ``GET /api/version``. Streaming is Ollama's default (NDJSON); errors are
``{"error": "..."}``.

``/api/generate`` is a chat with one user turn (plus ``system``); its answers carry ``response``
instead of ``message``. Model management (pull, push, create, delete) is not a gateway's business:
those paths answer 404 in Ollama's shape.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request
from werkzeug.exceptions import MethodNotAllowed

from api.errors import install_error_handlers, ollama_document
from api.requests import admit, gateway, idempotency, json_body, may_use, outcome_headers, resolve
from api.streaming import stream_response
from common.errors import GatewayError, InvalidRequest, NotFound
from common.protocols import ollama
from common.protocols.openai import parse_embeddings_request
from common.types import ChatRequest

bp = Blueprint("ollama", __name__)
install_error_handlers(bp, ollama_document)

OLLAMA_API_VERSION = "0.12.0"  # the Ollama API version whose wire format we speak


@bp.post("/api/chat")
def chat() -> Response:
    body = json_body()
    return _serve(body, ollama.parse_request(body), lambda d: d)


@bp.post("/api/generate")
def generate() -> Response:
    body = json_body()
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise InvalidRequest("'prompt' must be a non-empty string (this gateway does not load or unload "
                             "models)",
                             param="prompt")
    turn: dict[str, Any] = {"role": "user", "content": prompt}
    if body.get("images"):
        turn["images"] = body["images"]
    system = [{"role": "system", "content": body["system"]}] if isinstance(body.get("system"), str) else []
    messages = system + [turn]
    chat_body = {k: body[k] for k in ("model", "stream", "options", "format") if k in body}
    return _serve(body, ollama.parse_request({**chat_body, "messages": messages}), _as_generate)


def _as_generate(document: dict[str, Any]) -> dict[str, Any]:
    """A chat-shaped Ollama object as /api/generate's: ``response`` text instead of ``message``."""
    out = {k: v for k, v in document.items() if k != "message"}
    out["response"] = (document.get("message") or {}).get("content") or ""
    return out


Shape = Callable[[dict[str, Any]], dict[str, Any]]


def _serve(body: Any, chat_request: ChatRequest, shape: Shape) -> Response:
    idem = idempotency(body)
    call = admit(chat_request, body.get("max_wait") if isinstance(body, dict) else None)
    started = time.monotonic_ns()
    if chat_request.stream:
        watch = call.gw.start(chat_request, call.route, max_wait=call.max_wait,
                              max_cost=call.max_cost, api_key_id=g.api_key_id,
                              idem=idem)
        return stream_response(call.gw, watch, OllamaStream(chat_request.model, shape, started), call.headers)
    outcome = call.gw.call(chat_request, call.route, max_wait=call.max_wait,
                           max_cost=call.max_cost, api_key_id=g.api_key_id,
                           idem=idem)
    document = ollama.render_response(outcome.result, chat_request.model,
                                      elapsed_ns=time.monotonic_ns() - started)
    response = jsonify(shape(document))
    response.headers.update(outcome_headers(outcome))
    return response


class OllamaStream:
    """NDJSON, one object per line. Ollama clients parse every line as JSON, so there is no keep-alive
    line to send while the call waits in line."""

    mimetype = "application/x-ndjson"

    def __init__(self, model_alias: str, shape: Shape, started_ns: int) -> None:
        self.renderer = ollama.StreamRenderer(model_alias)
        self.shape = shape
        self.started_ns = started_ns

    def _lines(self, documents: list[dict[str, Any]]) -> list[str]:
        return [json.dumps(self.shape(d), separators=(",", ":")) + "\n" for d in documents]

    def chunk(self, chunk: dict[str, Any]) -> list[str]:
        return self._lines(self.renderer.feed(chunk))

    def done(self, meta: dict[str, Any]) -> list[str]:
        return self._lines(self.renderer.close(elapsed_ns=time.monotonic_ns() - self.started_ns))

    def error(self, error: GatewayError) -> list[str]:
        return [json.dumps(ollama.render_error(error.status, error.type, error.message)) + "\n"]

    def waiting(self, position: int | None) -> list[str]:
        return []


@bp.post("/api/embed")
def embed() -> Response:
    body = json_body()
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    request_body = {"model": body.get("model"), "input": body.get("input"), "encoding_format": "float"}
    if body.get("dimensions") is not None:
        request_body["dimensions"] = body["dimensions"]
    embed_request, _ = parse_embeddings_request(request_body)
    call = admit(embed_request, body.get("max_wait"))
    started = time.monotonic_ns()
    outcome = call.gw.call(embed_request, call.route, max_wait=call.max_wait,
                           max_cost=call.max_cost, api_key_id=g.api_key_id)
    data = sorted(outcome.result.get("data") or [], key=lambda d: d.get("index", 0))
    usage = outcome.result.get("usage") or {}
    elapsed = time.monotonic_ns() - started
    return jsonify({"model": embed_request.model, "embeddings": [d["embedding"] for d in data],
                    "total_duration": elapsed, "load_duration": 0,
                    "prompt_eval_count": int(usage.get("prompt_tokens") or 0)})


@bp.get("/api/tags")
def tags() -> Response:
    registry = gateway().settings.registry
    models = [{"name": alias, "model": alias, "modified_at": "1970-01-01T00:00:00Z", "size": 0,
               "digest": "", "details": {"format": "", "family": m.provider, "families": [m.provider],
                                         "parameter_size": "", "quantization_level": ""}}
              for alias, m in registry.models.items() if registry.serves(m) and may_use(alias)]
    return jsonify({"models": models})


@bp.post("/api/show")
def show() -> Response:
    body = json_body()
    name = body.get("model") or body.get("name") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name:
        raise InvalidRequest("'model' is required", param="model")
    route = resolve(name)
    m = route.model
    capabilities = ["completion"] + (["tools"] if "tools" in m.capabilities else []) + (
        ["vision"] if "vision" in m.capabilities else [])
    return jsonify({"modelfile": "", "parameters": "", "template": "",
                    "details": {"format": "", "family": route.provider.name,
                                "families": [route.provider.name],
                                "parameter_size": "", "quantization_level": ""},
                    "model_info": {"general.architecture": route.provider.kind,
                                   f"{route.provider.kind}.context_length": m.context_window},
                    "capabilities": capabilities})


@bp.get("/api/version")
def version() -> Response:
    return jsonify({"version": OLLAMA_API_VERSION})


@bp.route("/api/<path:rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def elsewhere(rest: str) -> Response:
    """Every other path under ``/api/`` is Ollama's too, so its errors come in Ollama's shape: a
    known path called with the wrong method is 405, anything else (model management) 404."""
    path = f"/api/{rest}"
    allowed = {m for r in current_app.url_map.iter_rules() if r.rule == path for m in r.methods or ()}
    if allowed:
        raise MethodNotAllowed(valid_methods=sorted(allowed))
    raise NotFound(f"{request.method} {path} is not served by this gateway (it does not manage models)")
