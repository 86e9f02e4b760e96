"""OpenAI Chat Completions ⇄ canonical. Pure functions, no I/O."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from common.errors import InvalidRequest
from common.types import ChatRequest, EmbeddingsRequest

# Our extension fields: accepted in the body (openai SDK: ``extra_body={...}``), never sent upstream.
GATEWAY_FIELDS = ("max_wait",)


def parse_chat_request(body: Any) -> tuple[ChatRequest, dict[str, Any]]:
    """Validate an OpenAI chat body. Returns the canonical request and the gateway extension fields.

    Raises :class:`InvalidRequest` naming the offending parameter, in words a client can act on."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    extensions = {name: body[name] for name in GATEWAY_FIELDS if name in body}
    payload = {k: v for k, v in body.items() if k not in GATEWAY_FIELDS}
    try:
        return ChatRequest.model_validate(payload), extensions
    except ValidationError as exc:
        raise _invalid(exc) from None


def parse_embeddings_request(body: Any) -> tuple[EmbeddingsRequest, dict[str, Any]]:
    """Validate an OpenAI embeddings body (same rules and errors as chat bodies)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    extensions = {name: body[name] for name in GATEWAY_FIELDS if name in body}
    payload = {k: v for k, v in body.items() if k not in GATEWAY_FIELDS}
    try:
        request = EmbeddingsRequest.model_validate(payload)
    except ValidationError as exc:
        raise _invalid(exc) from None
    if request.input in ("", []):
        raise InvalidRequest("'input' must not be empty", param="input", code="invalid_value")
    return request, extensions


def _invalid(exc: ValidationError) -> InvalidRequest:
    first = exc.errors(include_url=False)[0]
    loc = first.get("loc", ())
    param = ".".join(str(p) for p in loc) or None
    if first.get("type") == "missing":
        message = f"missing required parameter: '{param}'"
    else:
        message = f"invalid value for '{param}': {first.get('msg')}"
    more = exc.error_count() - 1
    if more > 0:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return InvalidRequest(message, param=param, code="invalid_value" if first.get("type") != "missing"
                          else "missing_required_parameter")


def error_body(error_type: str, message: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
