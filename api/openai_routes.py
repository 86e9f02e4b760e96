"""OpenAI ingress: ``POST /v1/chat/completions``, ``GET /v1/models``."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from api.gateway import Gateway, Outcome
from api.streaming import stream_response
from common.errors import GatewayError, InvalidRequest
from common.protocols.openai import error_body, parse_chat_request, parse_embeddings_request

bp = Blueprint("openai", __name__)


def gateway() -> Gateway:
    return current_app.extensions["gateway"]


def json_body() -> Any:
    raw = request.get_data(cache=False)
    if not raw:
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None


@bp.post("/v1/chat/completions")
def chat_completions() -> Response:
    chat, extensions = parse_chat_request(json_body())
    gw = gateway()
    route = gw.route(chat.model)
    max_wait = gw.max_wait(request.headers.get("x-gateway-max-wait"), extensions.get("max_wait"),
                           gw.settings.default_max_wait)
    if chat.stream:
        include_usage = bool((chat.model_extra or {}).get("stream_options", {}).get("include_usage"))
        watch = gw.start(chat, route, max_wait=max_wait, api_key_id=g.api_key_id)
        return stream_response(gw, watch, OpenAIStream(include_usage),
                               {"x-gateway-provider": route.provider.name, "x-gateway-model": route.model.model})
    outcome = gw.call(chat, route, max_wait=max_wait, api_key_id=g.api_key_id)
    return completion_response(outcome)


class OpenAIStream:
    """OpenAI's SSE: ``data: <chunk>`` per chunk, ``data: [DONE]``; the usage chunk only if asked for."""

    mimetype = "text/event-stream"

    def __init__(self, include_usage: bool) -> None:
        self.include_usage = include_usage

    def chunk(self, chunk: dict[str, Any]) -> list[str]:
        if not self.include_usage:
            if not chunk.get("choices") and chunk.get("usage"):
                return []  # we always ask upstream for usage (to bill); this caller did not
            chunk = {k: v for k, v in chunk.items() if k != "usage"}
        return [f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"]

    def done(self) -> list[str]:
        return ["data: [DONE]\n\n"]

    def error(self, error: GatewayError) -> list[str]:
        body = error_body(error.type, error.message, error.code, error.param)
        return [f"data: {json.dumps(body)}\n\n"]

    def waiting(self, position: int | None) -> list[str]:
        return [f": waiting in line{'' if position is None else f', position {position}'}\n\n"]


def completion_response(outcome: Outcome) -> Response:
    body = dict(outcome.result)
    body["x-gateway"] = {"job_id": outcome.job_id, **outcome.meta}
    response = jsonify(body)
    for name, key in (("x-gateway-provider", "provider"), ("x-gateway-model", "provider_model"),
                      ("x-gateway-queue-wait-ms", "queue_wait_ms"), ("x-gateway-cost-usd", "cost_usd")):
        if key in outcome.meta:
            response.headers[name] = str(outcome.meta[key])
    response.headers["x-gateway-job-id"] = outcome.job_id
    return response


@bp.post("/v1/embeddings")
def embeddings() -> Response:
    embed, extensions = parse_embeddings_request(json_body())
    gw = gateway()
    route = gw.route(embed.model)
    max_wait = gw.max_wait(request.headers.get("x-gateway-max-wait"), extensions.get("max_wait"),
                           gw.settings.default_max_wait)
    return completion_response(gw.call(embed, route, max_wait=max_wait, api_key_id=g.api_key_id))


@bp.get("/v1/models")
def list_models() -> Response:
    registry = gateway().settings.registry
    data = [{"id": alias, "object": "model", "created": 0, "owned_by": m.provider,
             "context_window": m.context_window, "capabilities": list(m.capabilities)}
            for alias, m in registry.models.items() if registry.provider_of(m).routable]
    return jsonify({"object": "list", "data": data})


@bp.get("/v1/models/<path:alias>")
def get_model(alias: str) -> Response:
    route = gateway().route(alias)
    return jsonify({"id": alias, "object": "model", "created": 0, "owned_by": route.provider.name})
