"""What every ingress blueprint does with a request before and after the gateway handles it:
read its body safely (:func:`json_body`), resolve its model and max_wait (:func:`admit`), and tag
its answer (:func:`outcome_headers`). Protocol-independent; errors are raised, and each blueprint's
handler renders them in its own shape.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import gevent
from flask import Response, after_this_request, current_app, g, request
from gunicorn.http.errors import ParseException

from api.gateway import Gateway, Outcome, Route
from api.gunicorn_worker import CLOSE_CONNECTION
from api.idempotency import HEADER, IdemCall
from common.budgets import parse_max_cost, remaining_headers
from common.errors import InvalidRequest, PayloadTooLarge, RequestTimeout
from common.keyschema import KeyRecord, model_allowed
from common.protocols import safejson
from common.routing.virtual import OVERRIDE_FIELDS, Decision, parse_overrides, pop_overrides
from common.types import ChatRequest, EmbeddingsRequest

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
DECISION_HEADER = "x-gateway-routing-decision"


def gateway() -> Gateway:
    return current_app.extensions["gateway"]


@dataclass(frozen=True)
class Admitted:
    """A call resolved for queueing, whatever protocol it came in: its route, its max_wait, its
    per-request cost cap and, for a virtual model, the decision that chose the route."""

    gw: Gateway
    route: Route
    max_wait: float
    max_cost: Decimal | None = None
    decision: Decision | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"x-gateway-provider": self.route.provider.name, "x-gateway-model": self.route.model.model}


def admit(call: ChatRequest | EmbeddingsRequest, body_max_wait: Any,
          default: float | None = None) -> Admitted:
    """Resolve the call's model to its route (404/503 in the caller's shape if it cannot be served) and
    the caller's max_wait: the body's ``max_wait``, else the ``x-gateway-max-wait`` header, else
    ``default`` (the sync default). The cost cap: the body's ``max_cost_usd``, else the
    ``x-gateway-max-cost`` header. A virtual model is first resolved to an alias (:func:`resolve_virtual`)."""
    gw = gateway()
    decision = resolve_virtual(gw, call)
    route = resolve(call.model if decision is None else decision.alias)
    max_wait = gw.max_wait(request.headers.get("x-gateway-max-wait"), body_max_wait,
                           gw.settings.default_max_wait if default is None else default)
    body = g.get("request_body")
    body_cap = body.get("max_cost_usd") if isinstance(body, dict) else None
    max_cost = parse_max_cost(body_cap if body_cap is not None else request.headers.get("x-gateway-max-cost"))
    return Admitted(gw, route, max_wait, max_cost, decision)


def resolve(model: str) -> Route:
    """The route of ``model`` for the calling key: 404 unknown, 403 outside the key's allowed models."""
    return gateway().route(model, g.get("api_key"))


def may_use(alias: str) -> bool:
    """Whether the calling key may use the model ``alias`` (what model listings show)."""
    key: KeyRecord | None = g.get("api_key")
    return key is None or model_allowed(key.allowed_models, alias)


def resolve_virtual(gw: Gateway, call: ChatRequest | EmbeddingsRequest) -> Decision | None:
    """For a virtual model (``auto``, ``fast``, ``cheap``…): the alias it means for this call, with the
    caller's overrides (``x-routing-strategy``, ``x-prefer-provider``: body fields taken out by
    :func:`json_body`, else headers). Every answer to the call — success, stream or error — then carries
    ``x-gateway-routing-decision``. None for a concrete alias."""
    if gw.virtual.virtual(call.model) is None:
        return None
    if not isinstance(call, ChatRequest):
        raise InvalidRequest(f"'{call.model}' is a virtual model and chooses among chat models; name an "
                             "embeddings model", param="model", code="virtual_model_chat_only")
    headers = {name: value for name in OVERRIDE_FIELDS if (value := request.headers.get(name)) is not None}
    overrides = parse_overrides(g.get("routing_fields") or {}, headers, gw.settings.registry)
    decision = gw.virtual.resolve(call.model, call, overrides, allowed=may_use)
    g.routing_decision = decision
    log.info("routing: %s", decision.header())

    @after_this_request
    def _tag(response: Response) -> Response:
        # a decision taken after this one (which deployment of the alias) keeps its place, after ours
        later = response.headers.get(DECISION_HEADER)
        response.headers[DECISION_HEADER] = decision.header() + (f"; then={later}" if later else "")
        return response

    return decision


def gateway_object(outcome: Outcome) -> dict[str, Any]:
    """The ``x-gateway`` object of a body format that has room for one: the job's metadata, and the
    routing decision of a virtual model."""
    decision: Decision | None = g.get("routing_decision")
    out = {"job_id": outcome.job_id, **outcome.meta}
    if decision is not None:
        later = out.get("routing_decision")  # what was decided after it, if anything: kept inside it
        out["routing_decision"] = {**decision.as_dict(), **({"then": later} if later else {})}
    return out


def idempotency(body: Any) -> IdemCall | None:
    """The call's ``Idempotency-Key`` (400 if malformed), with its owner, this route and the body's
    fingerprint; None without the header."""
    return IdemCall.of(request.headers.get(HEADER), g.api_key_id, request.path, body)


def outcome_headers(outcome: Outcome) -> dict[str, str]:
    """What every non-streamed answer says about its job, in any protocol."""
    return {"x-gateway-provider": str(outcome.meta.get("provider", "")),
            "x-gateway-model": str(outcome.meta.get("provider_model", "")),
            "x-gateway-job-id": outcome.job_id,
            "x-gateway-queue-wait-ms": str(outcome.meta.get("queue_wait_ms", "")),
            "x-gateway-cost-usd": str(outcome.meta.get("cost_usd", "")),
            **remaining_headers(outcome.budget, outcome.meta.get("cost_usd"),
                                (outcome.result.get("usage") or {}).get("total_tokens")),
            # routing (common/routing): what was decided, where it ran, how many upstream calls, fallback?
            "x-gateway-deployment": str(outcome.meta.get("deployment", "")),
            "x-gateway-routing-decision": str(outcome.meta.get("routing_decision", "")),
            "x-gateway-attempts": str(outcome.meta.get("attempts", "")),
            "x-gateway-fallback-used": "true" if outcome.meta.get("fallback_used") else "false"}


def json_body() -> Any:
    """The request's JSON body, decoded by :func:`common.protocols.safejson.loads` (depth, number
    and string checks). 413 above ``GATEWAY_MAX_BODY_BYTES`` whether or not the body is chunked;
    408 if it does not arrive within ``GATEWAY_CLIENT_TIMEOUT``."""
    settings = gateway().settings
    raw = read_body(settings.max_body_bytes, settings.client_timeout)
    if not raw:
        raise InvalidRequest("the request body is empty; send a JSON object")
    g.request_body = safejson.loads(raw, max_depth=settings.max_json_depth)
    g.routing_fields = pop_overrides(g.request_body)  # routing overrides are ours: never sent upstream
    return g.request_body


def read_body(limit: int, timeout: float) -> bytes:
    """At most ``limit`` bytes of body, all of it within ``timeout`` seconds (a total deadline, so a
    client dripping one byte at a time cannot hold the request open). A body declared larger than
    ``limit`` by its Content-Length is refused before anything is read; a chunked one is counted as it
    arrives. Whenever the body is left half-read the connection is closed after the
    answer (:data:`CLOSE_CONNECTION`)."""
    if request.content_length is not None and request.content_length > limit:
        request.environ[CLOSE_CONNECTION] = True  # not worth draining
        raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    chunked = request.content_length is None and request.environ.get("wsgi.input_terminated")
    # werkzeug's stream stops at Content-Length; a chunked body ends where gunicorn's decoder says
    stream = request.environ["wsgi.input"] if chunked else request.stream
    chunks: list[bytes] = []
    size = 0
    deadline = gevent.Timeout(timeout)
    deadline.start()
    try:
        while chunk := stream.read(min(READ_CHUNK, limit + 1 - size)):
            size += len(chunk)
            chunks.append(chunk)
            if size > limit:
                request.environ[CLOSE_CONNECTION] = True
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    except gevent.Timeout as exc:
        if exc is not deadline:
            raise
        request.environ[CLOSE_CONNECTION] = True
        raise RequestTimeout(f"the request body did not arrive within {timeout:g}s") from None
    except (ParseException, OSError) as exc:  # broken chunk framing, a connection cut mid-body
        request.environ[CLOSE_CONNECTION] = True
        raise InvalidRequest(f"the request body could not be read: {type(exc).__name__}") from None
    finally:
        deadline.close()
    return b"".join(chunks)
