"""OpenAI Chat Completions ⇄ canonical. Pure functions, no I/O."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from common.errors import InvalidRequest
from common.types import ChatRequest, EmbeddingsRequest

# Our extension fields: accepted in the body (openai SDK: ``extra_body={...}``), never sent upstream.
GATEWAY_FIELDS = ("max_wait", "max_cost_usd")

# Body fields other clients and proxies use to pick the upstream, its credentials or its HTTP call.
# Unknown fields are otherwise passed on to OpenAI-format upstreams, so these are refused (400), not
# dropped: the caller learns the gateway, not the body, decides where a call goes and with what key.
STEERING_FIELDS = frozenset({
    "api_key", "api_base", "base_url", "api_version", "api_type", "organization", "project", "provider",
    "custom_llm_provider", "deployment_id", "extra_headers", "extra_query", "extra_body", "headers",
    "default_headers", "timeout", "request_timeout", "max_retries", "http_client", "azure_ad_token",
    "azure_endpoint", "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "aws_region_name",
    "vertex_project", "vertex_location", "vertex_credentials",
})
# Token counts above this are refused: no model comes near it, and larger ones overflow limit maths.
MAX_TOKENS_LIMIT = 10_000_000


def parse_chat_request(body: Any) -> tuple[ChatRequest, dict[str, Any]]:
    """Validate an OpenAI chat body. Returns the canonical request and the gateway extension fields.

    Raises :class:`InvalidRequest` naming the offending parameter, in words a client can act on."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    extensions, payload = _split(body)
    try:
        request = ChatRequest.model_validate(payload)
    except ValidationError as exc:
        raise _invalid(exc) from None
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(request, name)
        if value is not None and value > MAX_TOKENS_LIMIT:
            raise InvalidRequest(f"invalid value for '{name}': must be at most {MAX_TOKENS_LIMIT}",
                                 param=name,
                                 code="invalid_value")
    return request, extensions


def parse_embeddings_request(body: Any) -> tuple[EmbeddingsRequest, dict[str, Any]]:
    """Validate an OpenAI embeddings body (same rules and errors as chat bodies)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    extensions, payload = _split(body)
    try:
        request = EmbeddingsRequest.model_validate(payload)
    except ValidationError as exc:
        raise _invalid(exc) from None
    if request.input in ("", []):
        raise InvalidRequest("'input' must not be empty", param="input", code="invalid_value")
    return request, extensions


def _split(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(gateway extension fields, the rest); a field that would steer the upstream call is refused."""
    steering = sorted(STEERING_FIELDS.intersection(body))
    if steering:
        raise InvalidRequest(f"unsupported parameter: '{steering[0]}' — the gateway chooses the upstream, "
                             "its address and credentials; they cannot be set per request", param=steering[0],
                             code="unsupported_parameter")
    extensions = {name: body[name] for name in GATEWAY_FIELDS if name in body}
    return extensions, {k: v for k, v in body.items() if k not in GATEWAY_FIELDS}


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
