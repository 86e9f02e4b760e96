"""Anthropic ingress: ``POST /v1/messages`` (streaming included) and ``POST /v1/messages/count_tokens``.

Any ``anthropic-version`` is accepted; keys come as ``x-api-key`` or ``Authorization: Bearer``
(``api/auth.py``); errors use Anthropic's ``{"type": "error", "error": {...}}`` (this blueprint's handlers).
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, g, jsonify

from api.errors import anthropic_document, install_error_handlers
from api.requests import admit, idempotency, json_body, outcome_headers
from api.streaming import stream_response
from common.errors import GatewayError
from common.protocols import anthropic
from common.tokens import estimate_prompt_tokens

bp = Blueprint("anthropic", __name__)
install_error_handlers(bp, anthropic_document)


@bp.post("/v1/messages")
def messages() -> Response:
    body = json_body()
    idem = idempotency(body)
    chat = anthropic.parse_request(body)
    call = admit(chat, body.get("max_wait") if isinstance(body, dict) else None)
    if chat.stream:
        watch = call.gw.start(chat, call.route, max_wait=call.max_wait,
                              max_cost=call.max_cost, api_key_id=g.api_key_id, idem=idem)
        stream = AnthropicStream(chat.model, estimate_prompt_tokens(chat, call.route.model))
        return stream_response(call.gw, watch, stream, call.headers)
    outcome = call.gw.call(chat, call.route, max_wait=call.max_wait,
                           max_cost=call.max_cost, api_key_id=g.api_key_id, idem=idem)
    response = jsonify(anthropic.render_response(outcome.result, chat.model))
    response.headers.update(outcome_headers(outcome))
    return response


@bp.post("/v1/messages/count_tokens")
def count_tokens() -> Response:
    """The gateway's estimate (the one TPM reservations use), not the provider's exact count."""
    body = json_body()
    if isinstance(body, dict):
        body.setdefault("max_tokens", 1)  # count_tokens bodies carry no max_tokens; messages bodies must
    chat = anthropic.parse_request(body)
    route = admit(chat, None).route  # a virtual model: counted for the alias it resolves to
    return jsonify({"input_tokens": estimate_prompt_tokens(chat, route.model)})


class AnthropicStream:
    """Anthropic's SSE: ``event: <name>`` + ``data: <json>`` per event, ``ping`` while waiting."""

    mimetype = "text/event-stream"

    def __init__(self, model_alias: str, input_tokens: int) -> None:
        self.renderer = anthropic.StreamRenderer(model_alias, input_tokens=input_tokens)

    @staticmethod
    def _sse(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
        return [f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
                for name, data in events]

    def chunk(self, chunk: dict[str, Any]) -> list[str]:
        return self._sse(self.renderer.feed(chunk))

    def done(self, meta: dict[str, Any]) -> list[str]:
        return self._sse(self.renderer.close())

    def error(self, error: GatewayError) -> list[str]:
        return self._sse([("error", anthropic.render_error(error.status, error.type, error.message))])

    def waiting(self, position: int | None) -> list[str]:
        return self._sse([("ping", {"type": "ping"})])
