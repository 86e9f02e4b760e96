"""OpenAI ingress: ``POST /v1/chat/completions``, ``GET /v1/models``."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, g, jsonify

from api.errors import install_error_handlers, openai_document
from api.gateway import Outcome
from api.requests import (
    admit,
    gateway,
    gateway_object,
    idempotency,
    json_body,
    may_use,
    outcome_headers,
    resolve,
)
from api.streaming import stream_response
from common.errors import GatewayError
from common.protocols.openai import error_body, parse_chat_request, parse_embeddings_request

bp = Blueprint("openai", __name__)
install_error_handlers(bp, openai_document)


@bp.post("/v1/chat/completions")
def chat_completions() -> Response:
    body = json_body()
    idem = idempotency(body)
    chat, extensions = parse_chat_request(body)
    call = admit(chat, extensions.get("max_wait"))
    if chat.stream:
        include_usage = bool((chat.model_extra or {}).get("stream_options", {}).get("include_usage"))
        watch = call.gw.start(chat, call.route, max_wait=call.max_wait,
                              max_cost=call.max_cost, api_key_id=g.api_key_id, idem=idem)
        return stream_response(call.gw, watch, OpenAIStream(include_usage), call.headers)
    return completion_response(call.gw.call(chat, call.route, max_wait=call.max_wait, max_cost=call.max_cost,
                                            api_key_id=g.api_key_id, idem=idem))


_FRAME = ("id", "object", "created", "model")   # what the gateway's last chunk copies from the stream's


class OpenAIStream:
    """OpenAI's SSE: ``data: <chunk>`` per chunk, ``data: [DONE]``; the usage chunk only if asked for.

    The last chunk carries the ``x-gateway`` object (job id, provider, deployment, routing decision,
    attempts, fallback used, cost…), as a whole answer's body does. That is the usage chunk if the
    caller asked for it, else the chunk with the ``finish_reason`` — so both are held until the stream's
    end, which follows them at once (a chunk after a held one releases it first). A stream without
    either ends with one more chunk whose only choice has an empty delta."""

    mimetype = "text/event-stream"

    def __init__(self, include_usage: bool) -> None:
        self.include_usage = include_usage
        self.last: dict[str, Any] = {}              # the last chunk: its id, model, created
        self.held: dict[str, Any] | None = None     # the finish_reason chunk, perhaps the last
        self.usage: dict[str, Any] | None = None    # the usage chunk (only if asked for)

    def chunk(self, chunk: dict[str, Any]) -> list[str]:
        self.last = chunk
        if not chunk.get("choices") and chunk.get("usage"):
            # kept for the end if asked for; else dropped: we ask upstream for usage only to bill
            self.usage = chunk if self.include_usage else None
            return []
        if not self.include_usage:
            chunk = {k: v for k, v in chunk.items() if k != "usage"}
        out = self._release()
        if any(choice.get("finish_reason") for choice in chunk.get("choices") or ()):
            self.held = chunk
            return out
        return out + [_sse(chunk)]

    def _release(self) -> list[str]:
        held, self.held = self.held, None
        return [] if held is None else [_sse(held)]

    def done(self, meta: dict[str, Any]) -> list[str]:
        if self.usage is not None:
            return self._release() + [_sse({**self.usage, "x-gateway": meta}), "data: [DONE]\n\n"]
        if self.held is not None:
            held, self.held = self.held, None
            return [_sse({**held, "x-gateway": meta}), "data: [DONE]\n\n"]
        frame: dict[str, Any] = {k: v for k, v in self.last.items() if k in _FRAME}
        empty = [] if self.include_usage else [{"index": 0, "delta": {}, "finish_reason": None}]
        final = {**frame, "choices": empty, **({"usage": None} if self.include_usage else {})}
        return [_sse({**final, "x-gateway": meta}), "data: [DONE]\n\n"]

    def error(self, error: GatewayError) -> list[str]:
        body = error_body(error.type, error.message, error.code, error.param)
        return self._release() + [f"data: {json.dumps(body)}\n\n"]

    def waiting(self, position: int | None) -> list[str]:
        return [f": waiting in line{'' if position is None else f', position {position}'}\n\n"]


def _sse(chunk: dict[str, Any]) -> str:
    return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"


def completion_response(outcome: Outcome) -> Response:
    body = dict(outcome.result)
    body["x-gateway"] = gateway_object(outcome)
    response = jsonify(body)
    response.headers.update(outcome_headers(outcome))
    return response


@bp.post("/v1/embeddings")
def embeddings() -> Response:
    embed, extensions = parse_embeddings_request(json_body())
    call = admit(embed, extensions.get("max_wait"))
    return completion_response(call.gw.call(embed, call.route, max_wait=call.max_wait, max_cost=call.max_cost,
                                            api_key_id=g.api_key_id))


@bp.get("/v1/models")
def list_models() -> Response:
    registry = gateway().settings.registry
    data = [{"id": alias, "object": "model", "created": 0, "owned_by": m.provider,
             "context_window": m.context_window, "capabilities": list(m.capabilities)}
            for alias, m in registry.models.items() if registry.serves(m) and may_use(alias)]
    data += [_virtual_model(name) for name in registry.virtual_models]
    return jsonify({"object": "list", "data": data})


def _virtual_model(name: str) -> dict[str, Any]:
    """A virtual model as a model object, with its strategy and its routable candidates."""
    router = gateway().virtual
    virtual = router.registry.virtual_models[name]
    candidates = [m.alias for m in router.candidates(virtual)
                  if router.registry.serves(m) and may_use(m.alias)]
    return {"id": name, "object": "model", "created": 0, "owned_by": "llm-gateway", "virtual": True,
            "strategy": virtual.strategy, "candidates": candidates}


@bp.get("/v1/models/<path:alias>")
def get_model(alias: str) -> Response:
    if alias in gateway().settings.registry.virtual_models:
        return jsonify(_virtual_model(alias))
    route = resolve(alias)
    return jsonify({"id": alias, "object": "model", "created": 0, "owned_by": route.provider.name})
